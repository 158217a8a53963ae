"""
The OpenAPI document as the API really behaves.

FastAPI's generated document promises a 422 with its own validation shape on every
route and says nothing of authentication. This service answers bad input with 400
and the one error body every failure uses (``{code, message, errors}``, see
:mod:`delivery.errors`), needs a bearer key on ``/api/`` and the admin token on
``/admin/``, and may answer 401, 404, 409 or 503 as below. :func:`install_openapi`
rewrites the generated document once, on first request, to say exactly that, and
gives every request body an example (:data:`EXAMPLES`, checked against its model by
the tests).
"""

import re
from pathlib import Path
from typing import Any, Final

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS = "/docs"
DOCS_OAUTH_REDIRECT = "/docs/oauth2-redirect"
REDOC = "/redoc"
DOCS_ASSETS = "/docs/assets"
DOCS_PAGES: Final = (DOCS, DOCS_OAUTH_REDIRECT, REDOC)
"""The documentation pages (guarded by the operator token like the document itself)."""
ASSETS_DIR: Final = Path(fastapi_offline.__file__).parent / "static"
"""Swagger UI 5 (OpenAPI 3.1) and ReDoc builds, shipped by the ``fastapi-offline`` package."""

ERROR_SCHEMA: Final[dict[str, Any]] = {
    "title": "Error",
    "type": "object",
    "required": ["code", "message", "errors"],
    "properties": {
        "code": {
            "type": "string",
            "description": "Stable machine code, e.g. INVALID_TIMEZONE, NOT_FOUND.",
        },
        "message": {"type": "string", "description": "A sentence naming the offending field."},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message", "code"],
                "properties": {
                    "field": {
                        "type": "string",
                        "description": "Dotted path, e.g. cadence.timezone",
                    },
                    "message": {"type": "string"},
                    "code": {"type": "string"},
                },
            },
        },
        "resource": {"type": "string", "description": "On 404: the kind of thing not found."},
    },
}

_ERROR_REF: Final = {"$ref": "#/components/schemas/Error"}
_WRITES: Final = {"post", "put", "patch", "delete"}
_PATH_PARAM = re.compile(r"\{[^}]+\}")

SECURITY_SCHEMES: Final[dict[str, Any]] = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A project's API key (`delivery keys create`); it alone names the project.",
    },
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The deployment's DELIVERY_ADMIN_TOKEN; the admin routes exist only "
        "when it is set.",
    },
}

_RESPONSES: Final[dict[str, str]] = {
    "400": "Bad input: a stable code and a message naming the field; nothing was written.",
    "401": "Missing, unknown or revoked credentials.",
    "404": "No such resource in this project (another project's ids are unknown too).",
    "409": "A conflict: the Idempotency-Key was used with another body, or the resource "
    "is in a state that forbids the change.",
    "503": "The service cannot take the request now (connection limit); retry later.",
}

_SCHEDULE: Final = {
    "cadence": {
        "simple": {"frequency": "weekly", "days_of_week": ["mon", "thu"], "times": ["08:30"]},
        "timezone": "Europe/London",
    },
    "intent": "remind the user to take their medication",
    "check_type": "reminder",
    "active_window": {"hours": {"start": "07:00", "end": "21:00"}},
}

EXAMPLES: Final[dict[str, dict[str, Any]]] = {
    "ScheduleCreate": _SCHEDULE,
    "SchedulePatch": {"intent": "check in on how the user slept", "enabled": True},
    "WakeupCreate": {
        "user_id": "user_123",
        "check_type": "follow_up",
        "intent": "ask how the job interview went",
        "delay_hours": 24,
        "priority": "high",
        "outside_window": "defer",
        "ttl_seconds": 21600,
    },
    "EventCreate": {
        "user_id": "user_123",
        "event_type": "order_shipped",
        "event_description": "The user's order #1042 has shipped",
        "metadata": {"order_id": "1042"},
        "supersede_key": "order-1042-status",
    },
    "InventoryCreate": {
        "item_type": "medication",
        "label": "Ibuprofen",
        "properties": {"dosage": "500mg"},
    },
    "InventoryWrite": {
        "action": "add",
        "item_type": "plant",
        "label": "Monstera",
        "properties": {"water_every_days": 7},
    },
    "InventoryDirectUpdate": {"properties": {"dosage": "250mg"}},
    "AcknowledgeBody": {"notification_ids": ["ntf_3f9a0c2b7d1e4a5b6c7d8e9f"]},
    "InboxBulk": {"action": "read", "message_ids": ["msg_3f9a0c2b7d1e4a5b6c7d8e9f"]},
    "AdvanceTimeBody": {"agent_id": "agent_abc", "user_id": "user_123", "simulated_hours": 48},
    "ResetClockBody": {"agent_id": "agent_abc", "user_id": "user_123"},
    "WebhookRegister": {"webhook_url": "https://example.com/hooks/delivery"},
    "RecoverIn": {"since": "2026-12-01T00:00:00Z"},
    "ContactBody": {"kind": "email", "destination": "user@example.com"},
    "ContactPatch": {"opted_out": True},
    "PreferencesBody": {"preferences": {"reminder": ["fcm", "email"], "*": ["fcm"]}},
    "ChannelDeliverBody": {"event_type": "on_wakeup_ready", "payload": {"text": "hello"}},
    "ChannelWriteBody": {
        "name": "ops alerts",
        "type": "webhook",
        "config": {"url": "https://example.com/hooks/channel"},
        "events": ["on_wakeup_ready"],
    },
    "KeyCreate": {"project": "demo"},
    "KeyRotate": {"grace_seconds": 3600},
    "TemplateCreate": {
        "check_type": "medication",
        "source": "schedule",
        "body": "Good {{ time_of_day }}! Time for your "
        "{{ item.summary if item else 'medication' }}.",
    },
    "PolicyBody": {
        "attention_budget": {"limit": 3, "window_seconds": 86400},
        "outside_window": "defer",
    },
    "QuietHoursBody": {"timezone": "America/New_York", "start": "22:00", "end": "07:30"},
    "TemplateUpdate": {"body": "Hi! Time for your {{ item.label if item else 'medication' }}."},
    "TemplatePreview": {
        "check_type": "medication",
        "source": "schedule",
        "sample": {
            "fire_at": "2026-12-05T08:00:00+01:00",
            "item": {"label": "Ibuprofen", "properties": {"dosage": "500mg"}},
        },
    },
}
"""An example request body per request model, by the model's schema name."""


def _body_schema_name(operation: dict[str, Any], schemas: dict[str, Any]) -> str | None:
    content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    schema = content.get("schema", {})
    refs = [schema, *schema.get("anyOf", [])]
    for ref in refs:
        name = str(ref.get("$ref", "")).rsplit("/", 1)[-1]
        if name in schemas:
            return name
    return None


def truthful_openapi(app: FastAPI) -> dict[str, Any]:
    """The generated document, rewritten to the API's real errors, security and examples."""
    spec = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in spec.get("paths", {}).items():
        tenant, admin = path.startswith("/api/"), path.startswith("/admin/")
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            wanted = []
            if operation.get("parameters") or "requestBody" in operation:
                wanted.append("400")
            if tenant or admin:
                wanted += ["401", "503"]
                operation["security"] = [{"adminToken" if admin else "apiKey": []}]
            if _PATH_PARAM.search(path) or admin:
                wanted.append("404")
            if tenant and method in _WRITES:
                wanted.append("409")
            for status in sorted(wanted):
                responses.setdefault(
                    status,
                    {
                        "description": _RESPONSES[status],
                        "content": {"application/json": {"schema": _ERROR_REF}},
                    },
                )
            name = _body_schema_name(operation, schemas)
            if name in EXAMPLES:
                content = operation["requestBody"]["content"]["application/json"]
                content["example"] = EXAMPLES[name]
    return spec


def install_openapi(app: FastAPI) -> None:
    """Serve :func:`truthful_openapi` at ``/openapi.json``, built once."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cache:
            cache.update(truthful_openapi(app))
        return cache

    app.openapi = openapi  # type: ignore[method-assign]


def install_offline_docs(app: FastAPI) -> None:
    """
    Swagger UI at ``/docs`` and ReDoc at ``/redoc`` with their scripts and stylesheet
    served from the ``fastapi-offline`` package under ``/docs/assets``, not a CDN: the
    pages work on a machine without internet access.
    """
    app.mount(DOCS_ASSETS, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    async def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=DOCS_OAUTH_REDIRECT,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    async def oauth_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route(DOCS, docs, include_in_schema=False)
    app.add_route(DOCS_OAUTH_REDIRECT, oauth_redirect, include_in_schema=False)
    app.add_route(REDOC, redoc, include_in_schema=False)
