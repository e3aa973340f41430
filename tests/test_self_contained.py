"""The repository explains itself: no comment, docstring or page cites a document it lacks."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO_ROOT

# Built from parts so this file does not match itself.
OUTSIDE_DOCUMENT = re.compile(r"\b(" + "GUI" + "DE|CONT" + r"RACT)( sections?)? \d")


def test_no_reference_to_documents_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.html", "*.toml", "*.yml", "Makefile", ".ci/run"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    hits = [
        f"{path}:{n}: {line.strip()}"
        for path in tracked
        for n, line in enumerate((REPO_ROOT / path).read_text(errors="replace").splitlines(), 1)
        if OUTSIDE_DOCUMENT.search(line)
    ]
    assert hits == []
