"""``manage.py saga_migrate TYPE --from N --to M [--apply]``: move unfinished sagas between
definition versions, planned first (see :mod:`sagas.versions`)."""

from __future__ import annotations

import getpass
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sagas.models import SagaEvent
from sagas.versions import MigrationRefused, Plan, apply_migration, plan_migration

#: The longest actor name the timeline keeps.
MAX_ACTOR: int = SagaEvent._meta.get_field("actor").max_length or 0
assert MAX_ACTOR > 0, "the timeline's actor column has a length"


class Command(BaseCommand):
    help = (
        "Move the unfinished sagas of a type from definition version N to M. Without --apply "
        "it prints the plan: per state and current step, how many move and where they land "
        "(by step name), the steps they skip or gain, every step row the move removes "
        "(with what it records), and which cannot move and why. "
        "With --apply it moves them in batches, each fenced on its version, never while a "
        "step is in flight, each with a timeline event naming the actor."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("saga_type", metavar="TYPE")
        parser.add_argument("--from", dest="from_version", type=int, required=True, metavar="N")
        parser.add_argument("--to", dest="to_version", type=int, required=True, metavar="M")
        parser.add_argument("--apply", action="store_true", help="move them (default: plan)")
        parser.add_argument("--batch", type=int, default=500, help="sagas per transaction")
        parser.add_argument(
            "--actor",
            default="",
            help="who moves them, for the timeline (default: cli:<login name>)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        saga_type = options["saga_type"]
        source, target = options["from_version"], options["to_version"]
        if options["batch"] < 1:
            raise CommandError("--batch must be at least 1.")
        if len(options["actor"].strip()) > MAX_ACTOR:
            # Refused before anything moves: the timeline would keep only part of the name.
            raise CommandError(f"--actor may be at most {MAX_ACTOR} characters.")
        try:
            plan = plan_migration(saga_type, source, target)
        except MigrationRefused as exc:
            raise CommandError(str(exc)) from None
        self._print_plan(plan, applying=options["apply"])
        if not options["apply"]:
            return
        actor = options["actor"].strip() or f"cli:{_login()}"
        done = apply_migration(
            saga_type, source, target, actor=actor, batch=options["batch"], progress=None
        )
        self.stdout.write(
            f"\nMoved {done.moved} saga{_s(done.moved)} from v{source} to v{target} "
            f"(actor {actor})."
        )
        if done.in_flight:
            n = sum(done.in_flight.values())
            self.stdout.write(
                f"{n} saga{_s(n)} had a step in flight and stayed on v{source}: "
                "run the command again once it has finished."
            )
        if done.held:
            n = done.held
            self.stdout.write(
                f"{n} saga{_s(n)} {'was' if n == 1 else 'were'} held by another transaction "
                f"(a worker recording a step, say) and stayed on v{source}: "
                "run the command again."
            )
        if done.blocked:
            self.stdout.write(f"{done.blocked} saga{_s(done.blocked)} cannot move (see above).")

    def _print_plan(self, plan: Plan, *, applying: bool) -> None:
        src, tgt = plan.source, plan.target
        w = self.stdout.write
        mode = "moving" if applying else "plan only; add --apply to move them"
        w(f"saga_migrate {plan.saga_type}: v{src.version} -> v{tgt.version} ({mode})")
        w(f"  v{src.version}: {_shape(src)}")
        w(f"  v{tgt.version}: {_shape(tgt)}")
        total = plan.movable + plan.blocked + sum(plan.in_flight.values())
        w(f"Unfinished sagas on v{src.version}: {total}")
        w(f"\nWill move: {plan.movable}")
        for (state, step, lands, skips, gains, drops), n in sorted(plan.moves.items()):
            line = (
                f"  {n:>7}  {state} at {step} (step {src.index_of(step) + 1})"
                f" -> {lands} (step {tgt.index_of(lands) + 1})"
            )
            if skips:
                line += f"; skips {', '.join(skips)}"
            if gains:
                line += f"; gains {', '.join(gains)}"
            if drops:
                line += f"; drops {', '.join(drops)}"
            w(line)
        if plan.in_flight:
            w(f"\nStep in flight now (left for a later run): {sum(plan.in_flight.values())}")
            for (state, step), n in sorted(plan.in_flight.items()):
                w(f"  {n:>7}  {state} at {step}")
        w(f"\nCannot move: {plan.blocked}")
        for (state, step, reason), n in sorted(plan.refused.items()):
            w(f"  {n:>7}  {state} at {step}: {reason}")


def _shape(definition: Any) -> str:
    parts = []
    for step in definition.steps:
        marks = []
        if step.pivot:
            marks.append("pivot")
        elif step.compensate is None:
            marks.append("no undo")
        parts.append(step.name + (f" [{', '.join(marks)}]" if marks else ""))
    return ", ".join(parts)


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in a bare container
        return "unknown"
