"""
The OpenAPI document tells the truth: the real error shape and statuses instead of
FastAPI's 422, the bearer schemes, an example per request body that the API accepts,
and no link to a document the repository does not have.
"""

import json
import re
import typing
from pathlib import Path
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel

from delivery.api.openapi import EXAMPLES
from delivery.api.routes import ROUTERS
from tests.api.conftest import Api

ROOT = Path(__file__).resolve().parents[2]


async def _spec(api: Api) -> dict[str, Any]:
    answer = await api.anonymous.get("/openapi.json")
    assert answer.status_code == 200
    spec: dict[str, Any] = answer.json()
    return spec


def _body_models() -> dict[str, type[BaseModel]]:
    """Every request body model of the mounted routes, by schema name."""
    models: dict[str, type[BaseModel]] = {}
    for router in ROUTERS:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.body_field is not None:
                annotation = route.body_field.field_info.annotation
                for model in typing.get_args(annotation) or (annotation,):
                    if isinstance(model, type) and issubclass(model, BaseModel):
                        models[model.__name__] = model
    return models


async def test_errors_are_the_api_s_own(api: Api) -> None:
    """No 422 anywhere; every error status documented uses the one Error schema."""
    spec = await _spec(api)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error_props = set(spec["components"]["schemas"]["Error"]["properties"])
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert "422" not in statuses, (method, path)
            if not path.startswith(("/api/", "/admin/")):
                continue  # /health answers 503 with its own report
            for status in statuses - {"200", "201", "202", "204"}:
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            if path.startswith("/api/"):
                assert {"400", "401", "503"} <= statuses or not operation.get("parameters")
                assert operation["security"] == [{"apiKey": []}], (method, path)
            if path.startswith("/admin/"):
                assert operation["security"] == [{"adminToken": []}], (method, path)
    # The documented shape is the one a real 400 has.
    bad = await api.alpha.post("/api/v1/agents/a1/wakeups", json={"user_id": "u1"})
    assert bad.status_code == 400
    assert set(bad.json()) <= error_props
    assert {"code", "message", "errors"} <= set(bad.json())


async def test_every_request_body_has_an_example_its_model_accepts(api: Api) -> None:
    spec = await _spec(api)
    models = _body_models()
    assert set(models) <= set(EXAMPLES), set(models) - set(EXAMPLES)
    for name, model in models.items():
        model.model_validate(EXAMPLES[name])
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                content = operation["requestBody"]["content"]["application/json"]
                assert "example" in content, (method, path)


async def test_the_examples_work_against_the_api(api: Api) -> None:
    """Posted as they are, the main examples are accepted."""
    base = "/api/v1/agents/agent_abc"
    schedule = await api.alpha.post(
        f"{base}/users/user_123/schedules", json=EXAMPLES["ScheduleCreate"]
    )
    assert schedule.status_code == 201, schedule.text
    wakeup = await api.alpha.post(f"{base}/wakeups", json=EXAMPLES["WakeupCreate"])
    assert wakeup.status_code in (200, 201), wakeup.text
    event = await api.alpha.post(f"{base}/events", json=EXAMPLES["EventCreate"])
    assert event.status_code == 200, event.text
    item = await api.alpha.post(
        f"{base}/users/user_123/inventory/items", json=EXAMPLES["InventoryCreate"]
    )
    assert item.status_code in (200, 201), item.text


async def test_no_reference_to_a_missing_document(api: Api) -> None:
    text = json.dumps(await _spec(api))
    for name in set(re.findall(r"[\w./-]+\.md\b", text)):
        assert (ROOT / name.lstrip("./")).exists(), name
    assert not re.search(r"\bseeds?\b|DESIGN|CONTRACT", text)
