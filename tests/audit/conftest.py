"""The ops console fixtures, shared with the audit tests."""

from tests.admin.conftest import ops_user  # noqa: F401 - a fixture
