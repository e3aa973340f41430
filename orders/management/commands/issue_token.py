"""``manage.py issue_token USERNAME [--staff] [--expires-days N]``: print a new API token.

Creates the user if missing. Each run issues a new token (stored hashed, so it can only be shown
now) valid for N days (default ``API_TOKEN_TTL_DAYS``, 90); the user's earlier tokens stay valid
until they expire or are revoked, so a client can switch to the new one without downtime
(``TOKEN=$(python manage.py issue_token alice)``). The issue is in the audit log.

``--demo`` issues the token ``make run`` prints: it revokes the user's earlier demo tokens, so
one run's token replaces any earlier run's (one still running on the same database included),
and leaves the user's other tokens alone. When it revoked some it says so on stderr, stdout
still being the token alone: a client still using one gets 401 from now on.
"""

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import models, transaction

from accounts.tokens import demo_token_issue, token_issue
from orders.management.commands._accounts import ensure_user, make_ops_staff

#: Ten years: a longer-lived token is a password in all but name (and far enough out, the
#: expiry date no longer fits a date).
MAX_EXPIRES_DAYS = 3650


class Command(BaseCommand):
    help = "Create USERNAME if missing and print only a new API token. --staff: ops staff."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--staff",
            action="store_true",
            help='make the user staff and a member of the "ops" group',
        )
        parser.add_argument(
            "--expires-days",
            type=int,
            default=None,
            metavar="N",
            help="days the token stays valid (default: API_TOKEN_TTL_DAYS, 90)",
        )
        parser.add_argument(
            "--demo",
            action="store_true",
            help="a demo token (make run's): revokes the user's earlier demo tokens only",
        )

    def handle(
        self,
        *args,
        username: str,
        staff: bool,
        expires_days: int | None,
        demo: bool,
        **options,
    ) -> None:
        if expires_days is not None and not 1 <= expires_days <= MAX_EXPIRES_DAYS:
            raise CommandError(f"--expires-days must be between 1 and {MAX_EXPIRES_DAYS}.")
        field = get_user_model()._meta.get_field(get_user_model().USERNAME_FIELD)
        assert isinstance(field, models.Field)  # a column, not a relation
        try:
            field.clean(username, None)  # the rules the admin applies: length, characters
        except ValidationError as exc:
            raise CommandError(f"Not a valid username {username!r}: {' '.join(exc.messages)}")
        with transaction.atomic():
            user = ensure_user(username)
            if staff:
                make_ops_staff(user)
            if demo:
                _, token, revoked = demo_token_issue(
                    user=user, expires_days=expires_days, actor_name="cli"
                )
            else:
                _, token = token_issue(user=user, expires_days=expires_days, actor_name="cli")
                revoked = 0
        self.stdout.write(token)
        if revoked:
            many = revoked > 1
            self.stderr.write(
                f"Revoked {revoked} earlier demo token{'s' if many else ''} of {username}: a "
                f"client still using {'one' if many else 'it'}, such as another `make run` on "
                "this database, now gets 401.",
                style_func=self.style.WARNING,
            )
