"""``/health``, ``/metrics``, OpenAPI and the JSON shape of routing errors."""

from tests.api.conftest import Api


async def test_health_metrics_and_docs(api: Api) -> None:
    """
    Health names the database and tzdata; metrics count requests; OpenAPI lists our
    routes; request ids are echoed; an unknown route is a JSON 404.
    """
    health = await api.anonymous.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert (body["status"], body["database"]) == ("ok", "ok")
    assert body["tzdata"].startswith("20")

    await api.alpha.get("/api/v1/agents/a1/notifications")
    await api.alpha.get("/api/v1/agents/a1/notifications?limit=0")
    metrics = await api.anonymous.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    route = 'route="/api/v1/agents/{agent_id}/notifications"'
    assert f'delivery_http_requests_total{{method="GET",{route},status="200"}} 1' in text
    assert f'delivery_http_requests_total{{method="GET",{route},status="400"}} 1' in text
    assert "delivery_http_request_duration_seconds_bucket{" in text
    assert "delivery_database_up 1.0" in text

    spec = (await api.anonymous.get("/openapi.json")).json()
    assert (
        "/api/v1/agents/{agent_id}/users/{user_id}/schedules/{schedule_id}/upcoming"
        in spec["paths"]
    )
    assert (await api.anonymous.get("/docs")).status_code == 200

    # A caller's X-Request-ID comes back; without one the server makes one up.
    mine = await api.alpha.get("/health", headers={"X-Request-ID": "trace-123"})
    assert mine.headers["x-request-id"] == "trace-123"
    made = await api.alpha.get("/health")
    assert made.headers["x-request-id"].startswith("req_")

    # An unknown path is a JSON 404 with a code, like every other error.
    response = await api.alpha.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"
