"""
Message templates over the API, on SQLite and PostgreSQL: create, list, get, update
with versions kept, delete, preview, bad templates refused at save time, tenancy.
"""

from typing import Any

import pytest

from delivery.api.openapi import EXAMPLES
from delivery.store.tables import TEMPLATE_VERSIONS, TEMPLATES
from tests.api.conftest import Api

BODY = "Hi! Time for your {{ item.label }}{% if item.dose %} ({{ item.dose }}){% endif %}."


async def _create(api: Api, **over: Any) -> dict[str, Any]:
    body = {"check_type": "medication", "source": "schedule", "body": BODY, **over}
    response = await api.alpha.post("/api/v1/templates", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_create_list_get_update_keeps_versions(api: Api) -> None:
    """Version 1 on creation, 2 after an update; both bodies listed, newest first."""
    created = await _create(api)
    tid = created["template_id"]
    assert tid.startswith("tpl_")
    assert {k: created[k] for k in ("check_type", "source", "body", "version")} == {
        "check_type": "medication",
        "source": "schedule",
        "body": BODY,
        "version": 1,
    }
    assert created["project_id"] == api.projects["alpha"]

    listed = (await api.alpha.get("/api/v1/templates")).json()
    assert [t["template_id"] for t in listed["templates"]] == [tid]

    updated = await api.alpha.put(f"/api/v1/templates/{tid}", json={"body": "Pill time!"})
    assert updated.status_code == 200, updated.text
    assert (updated.json()["version"], updated.json()["body"]) == (2, "Pill time!")
    got = (await api.alpha.get(f"/api/v1/templates/{tid}")).json()
    assert (got["version"], got["body"]) == (2, "Pill time!")

    versions = (await api.alpha.get(f"/api/v1/templates/{tid}/versions")).json()
    assert versions["template_id"] == tid
    assert [(v["version"], v["body"]) for v in versions["versions"]] == [
        (2, "Pill time!"),
        (1, BODY),
    ]


async def test_project_scoped_twin_and_delete(api: Api) -> None:
    """The /projects/{id}/templates routes reach the same templates; delete removes versions."""
    alpha = api.projects["alpha"]
    response = await api.alpha.post(
        f"/api/v1/projects/{alpha}/templates",
        json={"check_type": "check_in", "body": "Hi! How are you doing?"},
    )
    assert response.status_code == 201, response.text
    tid = response.json()["template_id"]
    assert response.json()["source"] == "any"
    assert (await api.alpha.get(f"/api/v1/templates/{tid}")).status_code == 200

    deleted = await api.alpha.delete(f"/api/v1/projects/{alpha}/templates/{tid}")
    assert (deleted.status_code, deleted.json()) == (200, {"success": True})
    assert (await api.alpha.get(f"/api/v1/templates/{tid}")).status_code == 404
    assert await api.store.count(TEMPLATES) == 0
    assert await api.store.count(TEMPLATE_VERSIONS) == 0


async def test_a_second_template_for_the_same_scope_is_a_conflict(api: Api) -> None:
    """One template per (check_type, source): a second is 409; another source is fine."""
    await _create(api)
    again = await api.alpha.post(
        "/api/v1/templates", json={"check_type": "medication", "source": "schedule", "body": "x"}
    )
    assert again.status_code == 409
    assert again.json()["code"] == "CONFLICT"
    await _create(api, source="wakeup")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("Hi {{ item.label", "body is not a valid template"),
        ("Hi {{ user_name }}", "'user_name' is undefined"),
        ("{{ intent.__class__.__subclasses__() }}", "unsafe"),
        ("{% set x = 1 %}", "'set' is not available"),
    ],
)
async def test_bad_template_is_400_and_writes_nothing(api: Api, body: str, needle: str) -> None:
    """Syntax, undefined variable, forbidden access: 400 INVALID_TEMPLATE naming ``body``."""
    response = await api.alpha.post(
        "/api/v1/templates", json={"check_type": "reminder", "body": body}
    )
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == "INVALID_TEMPLATE"
    assert needle in error["message"]
    assert [e["field"] for e in error["errors"]] == ["body"]
    assert await api.store.count(TEMPLATES) == 0


async def test_bad_update_is_400_and_keeps_the_version(api: Api) -> None:
    """An update that does not render is refused; the template stays at version 1."""
    tid = (await _create(api))["template_id"]
    response = await api.alpha.put(f"/api/v1/templates/{tid}", json={"body": "{{ nope }}"})
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_TEMPLATE"
    got = (await api.alpha.get(f"/api/v1/templates/{tid}")).json()
    assert (got["version"], got["body"]) == (1, BODY)
    assert await api.store.count(TEMPLATE_VERSIONS) == 1


async def test_a_template_for_any_source_must_render_without_an_item(api: Api) -> None:
    """``source: any`` is checked on an event sample too, which has no item."""
    response = await api.alpha.post(
        "/api/v1/templates", json={"check_type": "medication", "source": "any", "body": BODY}
    )
    assert response.status_code == 400
    assert "sample event block" in response.json()["message"]


async def test_a_sample_given_with_the_template_is_what_it_is_checked_on(api: Api) -> None:
    """A template using the project's own item properties is saved with a sample that has them."""
    body = "Hi! {{ item.label }} ({{ item.properties.colour }}) is due."
    refused = await api.alpha.post(
        "/api/v1/templates", json={"check_type": "pill", "source": "schedule", "body": body}
    )
    assert refused.status_code == 400
    sample = {"item": {"label": "Iron", "properties": {"colour": "red"}}}
    saved = await api.alpha.post(
        "/api/v1/templates",
        json={"check_type": "pill", "source": "schedule", "body": body, "sample": sample},
    )
    assert saved.status_code == 201, saved.text


async def test_preview_renders_body_stored_template_and_default(api: Api) -> None:
    """Preview a body against a given sample, a stored template, and the built-in default."""
    sample = {
        "intent": "Remind the user to take their ibuprofen at the correct dose",
        "fire_at": "2026-05-02T21:15:00+08:00",
        "item": {"label": "Ibuprofen", "properties": {"dosage": "500mg"}},
        "metadata": {"campaign": "v2"},
    }
    body = "Good {{ time_of_day }}! {{ item.summary }} at {{ local_clock }} ({{ task }})."
    preview = await api.alpha.post(
        "/api/v1/templates/preview",
        json={"body": body, "check_type": "medication", "sample": sample},
    )
    assert preview.status_code == 200, preview.text
    assert preview.json() == {
        "message": "Good evening! Ibuprofen (500mg) at 21:15 "
        "(take your ibuprofen at the correct dose).",
        "composer": "template",
    }

    default = await api.alpha.post(
        "/api/v1/templates/preview", json={"check_type": "medication", "sample": sample}
    )
    assert default.json() == {
        "message": "Hi! Just a reminder: time to take your Ibuprofen (500mg).",
        "composer": "default",
    }

    tid = (await _create(api))["template_id"]
    stored = await api.alpha.post(
        "/api/v1/templates/preview", json={"template_id": tid, "sample": sample}
    )
    assert stored.json()["message"] == "Hi! Time for your Ibuprofen (500mg)."
    # Without body or template_id: what a fire would send, now the project's template.
    fired = await api.alpha.post(
        "/api/v1/templates/preview", json={"check_type": "medication", "sample": sample}
    )
    assert fired.json() == {
        "message": "Hi! Time for your Ibuprofen (500mg).",
        "composer": "template",
    }
    assert await api.store.count(TEMPLATES) == 1


async def test_preview_of_a_bad_template_is_400(api: Api) -> None:
    """Preview refuses a template it cannot render, like a save would."""
    response = await api.alpha.post(
        "/api/v1/templates/preview", json={"body": "{{ item.properties.colour }}"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_TEMPLATE"


async def test_defaults_list_the_builtins_and_variables(api: Api) -> None:
    """The built-in templates and the variables a template may use are listed."""
    response = await api.alpha.get("/api/v1/templates/defaults")
    assert response.status_code == 200
    listed = response.json()
    scopes = {(d["check_type"], d["source"]) for d in listed["defaults"]}
    assert {("medication", "any"), ("*", "schedule"), ("*", "event")} <= scopes
    assert {"item", "local_time", "metadata", "task"} <= set(listed["variables"])


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("source", {"check_type": "x", "source": "sms", "body": "hi"}),
        ("check_type", {"source": "any", "body": "hi"}),
        ("body", {"check_type": "x", "body": ""}),
        ("sample.fire_at", {"body": "hi", "sample": {"fire_at": "tomorrow"}}),
    ],
)
async def test_bad_input_names_the_field(api: Api, field: str, body: dict[str, Any]) -> None:
    """Schema errors are 400 naming the field, never a 500."""
    path = "/api/v1/templates/preview" if field.startswith("sample") else "/api/v1/templates"
    response = await api.alpha.post(path, json=body)
    assert response.status_code == 400, response.text
    assert field in [e["field"] for e in response.json()["errors"]]


async def test_another_projects_template_is_404(api: Api) -> None:
    """Beta cannot read, update, list versions of, preview or delete alpha's template."""
    tid = (await _create(api))["template_id"]
    beta = api.beta
    assert (await beta.get(f"/api/v1/templates/{tid}")).status_code == 404
    assert (await beta.put(f"/api/v1/templates/{tid}", json={"body": "mine"})).status_code == 404
    assert (await beta.get(f"/api/v1/templates/{tid}/versions")).status_code == 404
    assert (await beta.delete(f"/api/v1/templates/{tid}")).status_code == 404
    preview = await beta.post("/api/v1/templates/preview", json={"template_id": tid})
    assert preview.status_code == 404
    assert (await beta.get("/api/v1/templates")).json() == {"templates": []}
    alpha = api.projects["alpha"]
    assert (await beta.get(f"/api/v1/projects/{alpha}/templates")).status_code == 404
    assert (await beta.get(f"/api/v1/projects/{alpha}/templates/{tid}")).status_code == 404
    got = (await api.alpha.get(f"/api/v1/templates/{tid}")).json()
    assert (got["version"], got["body"]) == (1, BODY)


async def test_the_openapi_examples_work(api: Api) -> None:
    """The documented examples create, update and preview as they are."""
    created = await api.alpha.post("/api/v1/templates", json=EXAMPLES["TemplateCreate"])
    assert created.status_code == 201, created.text
    tid = created.json()["template_id"]
    updated = await api.alpha.put(f"/api/v1/templates/{tid}", json=EXAMPLES["TemplateUpdate"])
    assert updated.status_code == 200, updated.text
    preview = await api.alpha.post("/api/v1/templates/preview", json=EXAMPLES["TemplatePreview"])
    assert preview.json() == {"message": "Hi! Time for your Ibuprofen.", "composer": "template"}
