"""Helpers shared by the ``issue_token`` and ``seed_demo`` commands."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission, User

OPS_GROUP = "ops"


def ensure_user(username: str) -> User:
    """The user named ``username``, created (without a usable password) if missing."""
    user, created = get_user_model().objects.get_or_create(username=username)
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def make_ops_staff(user: User) -> None:
    """Staff flag plus the "ops" group (support staff who may operate sagas)."""
    if not user.is_staff:
        user.is_staff = True
        user.save(update_fields=["is_staff"])
    # The group comes from a sagas migration; get_or_create keeps this working on a database
    # where it was removed by hand.
    group, _ = Group.objects.get_or_create(name=OPS_GROUP)
    operate = Permission.objects.filter(
        content_type__app_label="sagas", codename="operate_saga"
    ).first()
    if operate is not None:
        group.permissions.add(operate)
    user.groups.add(group)
