"""``manage.py check_invariants``: guarantees 2 to 4 over the database.

Prints each violation on its own line, then what a person vouched for by hand that would
otherwise be one (a cancelled order's open authorization after its saga was resolved accepting
the effects in place, say: listed, not counted), then a one-line summary; exit status 1 if any
violation. With
``--require-settled`` an order still in flight is a violation too (guarantee 1): use it once
the workers have had time to settle everything, as the chaos run and the tests do. How each
guarantee is checked (and why stock needs no baseline) is in :mod:`orders.invariants`.
"""

from django.core.management.base import BaseCommand, CommandError

from orders.invariants import check_invariants


class Command(BaseCommand):
    help = (
        "Check the money, stock and shipping guarantees over the whole database; print each "
        "violation; exit 1 if any."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--require-settled",
            action="store_true",
            help="Also report orders that are still processing or cancelling (guarantee 1).",
        )

    def handle(self, *args, require_settled: bool = False, **options):
        report = check_invariants(require_settled=require_settled)
        for violation in report.violations:
            self.stdout.write(str(violation))
        for accepted in report.vouched:
            self.stdout.write(f"vouched for by hand, not counted: {accepted}")
        self.stdout.write(report.summary())
        if not report.ok:
            count = len(report.violations)
            raise CommandError(
                f"{count} invariant violation{'s' if count != 1 else ''}", returncode=1
            )
