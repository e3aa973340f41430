"""Stacks of real processes for tests, the chaos run and the benchmarks, on psutil.

One way to start a process (its own session and process group, its output appended to a log
file), find its children (the prefork pool, gunicorn's workers), SIGKILL it or one of them,
stop it (SIGTERM, then SIGKILL of whatever is left of its group), and read its log. A
:class:`Supervisor` remembers every process it ever started, so :meth:`Supervisor.stop_all` also
reaps the pool children of a worker whose main process was killed.

No Django here: the test harness imports it before Django's settings load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent


def children_of(pid: int) -> list[int]:
    """Direct and indirect children of ``pid`` (empty if it is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def rss_kib(pid: int) -> int | None:
    """Resident set size of one process in KiB, or None if it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss // 1024
    except psutil.Error:
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (zombies count as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True  # someone else's process: it exists
    except psutil.Error:
        return False


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to one process; False if it was already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


class Process:
    """One child process in its own process group, its output appended to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path,
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own group: Ctrl-C in a terminal reaches only us, and a group kill reaches
                # children its main process no longer knows about.
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def children(self) -> list[int]:
        """The pids of its children (a worker's pool processes), while it runs."""
        return children_of(self.pid) if self.alive else []

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the main process only (its children see what it makes of it)."""
        if self.popen is not None:
            kill_pid(self.popen.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for it to exit; its exit status, or None."""
        if self.popen is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.popen.wait(timeout)
        return None

    def kill(self, timeout: float = 10) -> None:
        """SIGKILL the whole process group at once (main process and children) and reap it."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.wait(timeout)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (a warm shutdown), wait, then SIGKILL whatever is left of the group."""
        if self.alive:
            self.signal(signal.SIGTERM)
            self.wait(timeout)
        self.kill()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def __repr__(self) -> str:
        pid = self.popen.pid if self.popen is not None else None
        return f"<Process {self.name} pid={pid} alive={self.alive}>"


class Supervisor:
    """The processes of one stack: started here, every one of them stopped by :meth:`stop_all`.

    ``log_dir`` holds one log per process name (a restarted process appends to its log).
    ``env`` is read each time a process starts, not copied here: a stack that learns its
    broker's URL after it was created (its own Redis) sets it there and the next start sees it.
    """

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.env = os.environ.copy() if env is None else env
        self.procs: list[Process] = []
        self._lock = threading.Lock()

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        log_name: str | None = None,
    ) -> Process:
        """Start ``argv`` as ``name`` (the stack's environment unless ``env`` is given)."""
        proc = Process(
            name,
            argv,
            env=self.env if env is None else env,
            log_path=self.log_dir / (log_name or f"{name}.log"),
        )
        with self._lock:
            self.procs.append(proc)
        return proc.start()

    def alive(self) -> list[Process]:
        with self._lock:
            return [p for p in self.procs if p.alive]

    def stop_all(self, order: Iterable[str] = (), timeout: float = 8) -> None:
        """Stop every process ever started; names in ``order`` first, in that order."""
        rank = {name: i for i, name in enumerate(order)}
        with self._lock:
            procs = sorted(self.procs, key=lambda p: rank.get(p.name, len(rank)))
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop(timeout=timeout)

    def kill_all(self) -> None:
        """SIGKILL every process group at once (no warm shutdown)."""
        with self._lock:
            procs = list(self.procs)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.kill()

    def logs(self, chars: int = 3000) -> dict[str, str]:
        """The tail of each process's log, by name (the last started wins for a reused name)."""
        with self._lock:
            procs = list(self.procs)
        return {p.name: p.log_tail(chars) for p in procs}
