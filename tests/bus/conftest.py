"""The API fixture, for the tests that check real notifications against the bus contract."""

from tests.api.conftest import api  # noqa: F401 - a fixture, used by name
