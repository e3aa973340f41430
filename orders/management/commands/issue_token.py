"""``manage.py issue_token USERNAME [--staff]``: print the user's API token, and only that.

Creates the user if missing. The token is stable: running the command again prints the same
key, so scripts can call it freely (``TOKEN=$(python manage.py issue_token alice)``).
"""

from django.core.management.base import BaseCommand
from django.db import transaction

from orders.management.commands._accounts import ensure_user, make_ops_staff, token_for


class Command(BaseCommand):
    help = "Create USERNAME if missing and print only its API token. --staff: ops staff."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--staff",
            action="store_true",
            help='make the user staff and a member of the "ops" group',
        )

    def handle(self, *args, username: str, staff: bool, **options) -> None:
        with transaction.atomic():
            user = ensure_user(username)
            if staff:
                make_ops_staff(user)
            key = token_for(user)
        self.stdout.write(key)
