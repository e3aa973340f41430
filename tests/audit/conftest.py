"""The ops console and API fixtures, shared with the audit tests."""

from tests.admin.conftest import ops_user  # noqa: F401 - a fixture
from tests.api.conftest import staff, staff_api  # noqa: F401 - fixtures
