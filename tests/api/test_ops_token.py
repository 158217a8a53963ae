"""
``DELIVERY_OPS_TOKEN``: unset, ``/metrics`` and the OpenAPI pages are open (local use);
set, they need the token as a bearer or as the Basic password (the browser's way into
``/docs``), on the real server under uvicorn.
"""

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from delivery.clock import ManualClock
from delivery.settings import Settings
from tests.api.server import serve_api

TOKEN = "ops-token-0123456789abcdef"
OPS_PATHS = ("/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
START = datetime(2026, 5, 1, tzinfo=UTC)


def test_unset_leaves_metrics_and_docs_open(database_url: str) -> None:
    """Without an ops token every operator endpoint answers 200 to anyone, as before."""
    with serve_api(database_url, ManualClock(START)) as served:
        for path in OPS_PATHS:
            assert httpx.get(served.base_url + path).status_code == 200, path


def test_set_requires_the_token_on_metrics_and_docs(database_url: str) -> None:
    """
    With an ops token, each operator endpoint is 401 UNAUTHORIZED (offering Bearer and
    Basic) without it, with a wrong one or with a tenant key, and 200 with it; /health
    stays open and the token opens no tenant route.
    """
    settings = Settings(subject_prefix="test", ops_token=TOKEN)
    with serve_api(database_url, ManualClock(START), settings=settings) as served:
        base = served.base_url
        tenant_key = served.keys["alpha"]
        for path in OPS_PATHS:
            for headers in (
                {},
                {"Authorization": "Bearer not-the-token-at-all"},
                {"Authorization": f"Bearer {tenant_key}"},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": "Basic !!not-base64"},
                {"Authorization": f"Token {TOKEN}"},
            ):
                denied = httpx.get(base + path, headers=headers)
                assert denied.status_code == 401, (path, headers)
                body = denied.json()
                assert body["code"] == "UNAUTHORIZED", (path, headers)
                assert "DELIVERY_OPS_TOKEN" in body["message"]
                assert body["errors"] == []
                challenges = denied.headers.get_list("www-authenticate")
                assert [c.split()[0] for c in challenges] == ["Bearer", "Basic"]
            allowed = httpx.get(base + path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert allowed.status_code == 200, path

        scraped = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert "delivery_database_up 1.0" in scraped.text
        # The denied scrapes were counted too: the request-context layer sits outside.
        assert 'route="unmatched",status="401"' in scraped.text

        assert httpx.get(base + "/health").status_code == 200
        tenant_route = base + "/api/v1/agents/a1/notifications"
        ops_as_key = httpx.get(tenant_route, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ops_as_key.status_code == 401
        assert httpx.get(tenant_route, headers={"Authorization": f"Bearer {tenant_key}"}).is_success


def test_set_the_docs_page_works_with_basic_credentials(database_url: str) -> None:
    """
    A browser's way in: Basic with any user name and the token as password opens /docs,
    and the same credentials fetch the /openapi.json that the page loads.
    """
    settings = Settings(subject_prefix="test", ops_token=TOKEN)
    with (
        serve_api(database_url, ManualClock(START), settings=settings) as served,
        httpx.Client(base_url=served.base_url, auth=("operator", TOKEN)) as browser,
    ):
        page = browser.get("/docs")
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        assert "/openapi.json" in page.text
        spec = browser.get("/openapi.json")
        assert spec.status_code == 200
        assert "/api/v1/agents/{agent_id}/wakeups" in spec.json()["paths"]
        assert httpx.get(served.base_url + "/redoc", auth=("", TOKEN)).status_code == 200
        wrong = httpx.get(served.base_url + "/docs", auth=("operator", "nope-" + TOKEN))
        assert wrong.status_code == 401


def test_a_short_or_empty_token_setting() -> None:
    """An empty DELIVERY_OPS_TOKEN means unset; one under 16 characters is refused."""
    assert Settings(ops_token="").ops_token is None
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(ops_token="short-token")


def test_a_short_token_stops_the_process_without_echoing_it(tmp_path: Path) -> None:
    """`delivery run` with a short DELIVERY_OPS_TOKEN exits 2 naming it, and never prints it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(DELIVERY_DATA_DIR=str(tmp_path / "data"), DELIVERY_OPS_TOKEN="hunter2-secret")
    # The timeout bounds a process that wrongly starts (it would serve until killed).
    out = subprocess.run(
        [sys.executable, "-m", "delivery", "run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("invalid configuration:\nDELIVERY_OPS_TOKEN: ")
    assert "hunter2" not in out.stderr
    assert not (tmp_path / "data").exists()
