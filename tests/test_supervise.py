"""``make run`` keeps its processes up: scripts/supervise.py restarts one that dies on its own,
and ``make chaos`` counts every exit it did not cause as a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lab.chaos import Chaos, Summary, Tally
from lab.stack import Stack
from lab.supervisor import Process
from tests.conftest import REPO_ROOT

SUPERVISE = [sys.executable, str(REPO_ROOT / "scripts" / "supervise.py")]

# Dies twice (exit 1, then SIGKILL of itself), then stays up: each start appends a line.
FLAKY = """
import os, signal, sys
path = sys.argv[1]
with open(path, "a") as f:
    f.write("start\\n")
starts = open(path).read().count("start")
if starts == 1:
    sys.exit(1)
if starts == 2:
    os.kill(os.getpid(), signal.SIGKILL)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()  # until the supervisor's SIGTERM
"""


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*SUPERVISE, *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        start_new_session=True,
    )


def test_a_process_that_dies_is_started_again_with_a_log_line(tmp_path, wait_for):
    """Two unplanned exits: two log lines naming the cause and the backoff, three starts; a
    SIGTERM then stops the command and the supervisor exits 0."""
    starts, log = tmp_path / "starts", tmp_path / "log"
    sup = start(["worker", "--", sys.executable, "-c", FLAKY, str(starts)], log)
    try:
        wait_for(lambda: starts.exists() and starts.read_text().count("start") == 3, timeout=60)
        text = log.read_text()
        assert "sagarunner: worker: exited unexpectedly (exit status 1)" in text, text
        assert "(killed by SIGKILL)" in text and "starting it again in 2s (restart 2)" in text
        assert sup.poll() is None
    finally:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(30) == 0, log.read_text()


def test_a_command_that_keeps_failing_at_start_is_given_up(tmp_path):
    """A broken configuration is not restarted forever: after N quick exits it gives up with
    the command's status and says so."""
    log = tmp_path / "log"
    sup = start(["beat", "--give-up-after", "2", "--", sys.executable, "-c", "exit(3)"], log)
    assert sup.wait(60) == 3
    assert "exited (exit status 3) 2 times in a row" in log.read_text()


def test_make_run_supervises_web_worker_and_beat():
    """Every Procfile line runs under the supervisor; the worker without gossip and mingle."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import run
    finally:
        sys.path.pop(0)
    lines = dict(line.split(": ", 1) for line in run.procfile(8000).splitlines())
    for name in ("web", "worker", "beat"):
        assert f"supervise.py {name} -- " in lines[name], lines[name]
    assert "--without-gossip --without-mingle" in lines["worker"]


def test_chaos_counts_exits_it_did_not_cause(tmp_path):
    """A worker killed by the run is planned; beat (or a worker) exiting on its own is an
    unplanned exit: listed with its status and log, and the summary fails."""

    class _Stack(Stack):
        def start_worker(self, slot: str, **_kw) -> Process:
            return self.supervisor.start(slot, ["sleep", "60"])

    stack = _Stack(env=dict(os.environ), log_dir=tmp_path, queue="q")
    try:
        chaos = Chaos.__new__(Chaos)
        Chaos.__init__(chaos, _config(), stack, None, Tally(), progress=lambda: 0.0)
        beat = stack.supervisor.start(
            "beat", [sys.executable, "-c", "print('CRITICAL boom'); exit(2)"]
        )
        beat.wait(30)
        killed = chaos.workers["w1"]
        chaos.planned_exits.add(killed.pid)
        killed.signal(signal.SIGKILL)
        killed.wait(30)
        chaos.watch()
        chaos.watch()  # reported once
        assert len(chaos.unplanned_exits) == 1, chaos.unplanned_exits
        assert chaos.unplanned_exits[0].startswith(f"beat (pid {beat.pid}) exited with status 2")
        assert "CRITICAL boom" in chaos.unplanned_exits[0]
        summary = Summary(mode="quick", seed=1, broker="x", unplanned_exits=chaos.unplanned_exits)
        assert not summary.ok
        assert "unplanned exits:  1" in summary.render() and "chaos: FAIL" in summary.render()
    finally:
        stack.close()


def _config():
    from lab.chaos import ChaosConfig

    return ChaosConfig.quick()
