#!/usr/bin/env python3
"""Keep one process of ``make run`` up: start it again, with a backoff, when it dies on its own.

``make run`` runs web, worker and beat under honcho, which stops the whole group as soon as one
process exits. A Celery worker's main process can die of a bug (a pool process killed while
the broker restarts used to do it), and then the API went down with it. Each Procfile line runs
its command under this wrapper instead: an exit nobody asked for is logged in one line and the
command starts again after 1, 2, 4 ... up to 30 seconds (back to 1 once it stayed up for a
minute), while the other processes keep serving.

A stop request (SIGTERM from honcho, SIGINT, SIGHUP) goes to the command's main process only, so
a Celery worker does its warm shutdown; then this wrapper exits with the command's status. A
command that keeps dying within seconds of its start (a broken configuration, such as a
malformed SAGA_FAULTS) is given up after ``--give-up-after`` such exits in a row, and this
wrapper exits with its status, which stops ``make run`` as before.

Usage: ``supervise.py NAME [--give-up-after N] -- COMMAND ARGS...`` (standard library only).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
#: Up this long, the command counts as having started fine: the backoff starts over.
STABLE_AFTER = 60.0
#: An exit this soon after the start counts towards giving up.
QUICK_EXIT = 10.0


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Supervisor:
    def __init__(self, name: str, argv: list[str], give_up_after: int) -> None:
        self.name = name
        self.argv = argv
        self.give_up_after = give_up_after
        self.child: subprocess.Popen | None = None
        self.stopping = False

    def say(self, message: str) -> None:
        print(f"sagarunner: {self.name}: {message}", file=sys.stderr, flush=True)

    def on_stop(self, signum: int, _frame: object) -> None:
        """Forward the stop to the command's main process (its own warm shutdown)."""
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, deadline - time.monotonic()))

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_stop)
        backoff, quick_exits, restarts = BACKOFF_START, 0, 0
        while True:
            started = time.monotonic()
            self.child = subprocess.Popen(self.argv)
            returncode = self.child.wait()
            while returncode is None:  # pragma: no cover - wait() returns an int
                returncode = self.child.wait()
            if self.stopping:
                return 0 if returncode in (0, -signal.SIGTERM) else returncode
            up = time.monotonic() - started
            if up >= STABLE_AFTER:
                backoff, quick_exits = BACKOFF_START, 0
            quick_exits = quick_exits + 1 if up < QUICK_EXIT else 0
            if quick_exits >= self.give_up_after:
                self.say(
                    f"exited ({describe(returncode)}) {quick_exits} times in a row within "
                    f"{QUICK_EXIT:g}s of starting; giving up (check its configuration above)"
                )
                return returncode or 1
            restarts += 1
            self.say(
                f"exited unexpectedly ({describe(returncode)}) after {up:.1f}s; "
                f"starting it again in {backoff:g}s (restart {restarts})"
            )
            self.sleep(backoff)
            if self.stopping:
                return 0
            backoff = min(backoff * 2, BACKOFF_MAX)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: supervise.py NAME [--give-up-after N] -- COMMAND ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the name in log lines (worker, beat, web)")
    parser.add_argument("--give-up-after", type=int, default=5, metavar="N")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("a command to run is required after --")
    return Supervisor(args.name, command, args.give_up_after).run()


if __name__ == "__main__":
    sys.exit(main())
