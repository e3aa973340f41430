"""Django's admin app with the audited site (:mod:`audit.console`) as its default site.

Listed in ``INSTALLED_APPS`` in place of ``django.contrib.admin`` (Django's documented way to
override the default site), so ``admin.site`` and ``@admin.register`` everywhere, third-party
apps included, use it. A module of its own: settings import it before any model exists.
"""

from __future__ import annotations

from django.contrib.admin.apps import AdminConfig


class AuditedAdminConfig(AdminConfig):
    default_site = "audit.console.AuditedAdminSite"
