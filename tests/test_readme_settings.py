"""Every environment variable ``config/settings.py`` reads is in the README's configuration
table, so an operator can find each knob (and its default) in one place."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT

#: Read by settings for the test harness only (the per-session test database's name).
HARNESS_ONLY = {"TEST_DATABASE_NAME"}


def test_every_setting_read_from_the_environment_is_in_the_readme_table():
    settings_py = (REPO_ROOT / "config" / "settings.py").read_text()
    read = set(re.findall(r"\benv(?:\.\w+)?\(\s*\"([A-Z][A-Z0-9_]*)\"", settings_py))
    assert {"DATABASE_URL", "WEBHOOKS_ALLOW_PRIVATE"} <= read  # the pattern finds them
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row)}
    assert sorted(read - HARNESS_ONLY - documented) == []
