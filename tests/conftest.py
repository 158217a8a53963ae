"""
Root conftest: Hypothesis profiles and the service fixture plugins.

Real services only (DEVELOPERS.md): a missing service is a failure, never a
skip, when ``CI`` or ``DELIVERY_REQUIRE_SERVICES=1`` is set.
"""

import os

from hypothesis import HealthCheck, settings

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.nats",
    "tests.fixtures.http",
    "tests.fixtures.sockets",
]

settings.register_profile("dev", max_examples=150, deadline=None)
settings.register_profile(
    "ci",
    max_examples=600,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def services_required() -> bool:
    """True when a missing PostgreSQL or NATS must fail the run instead of skipping."""
    return bool(os.environ.get("CI")) or os.environ.get("DELIVERY_REQUIRE_SERVICES") == "1"
