"""
Message templates: ``/api/v1/templates`` (the key's project) and
``/api/v1/projects/{projectId}/templates`` (another project's id is 404).

A template is the message the agent sends for one ``check_type`` (``*``: any)
and ``source`` (``schedule``, ``wakeup``, ``event`` or ``any``), in sandboxed
Jinja2 over the intent block's fields (:data:`delivery.templates.VARIABLES`).
Create, list, get, update (PUT: the body becomes the next version, earlier ones
stay listed under ``/versions``), delete, and preview against a sample block.
A template that does not compile or fails on the sample blocks is refused with
400 ``INVALID_TEMPLATE`` naming the field, so it never fails at fire time. The
dispatcher picks an update up within ``DELIVERY_TEMPLATE_CACHE_S`` seconds.
``defaults`` and ``preview`` are declared before the ``{templateId}`` routes so
they are never captured by them.
"""

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import Field
from sqlalchemy.engine import RowMapping

from delivery.api.auth import PathProject, ProjectId
from delivery.api.context import ApiContext, Ctx, ResourceId, check_metadata, wire_time
from delivery.api.schemas import Clean, Label, OptionalText, RequestModel, ResponseModel, Success
from delivery.dispatcher.compose import event_block, schedule_block, wakeup_block
from delivery.domain import IntentBlock, InventoryItem, SourceKind
from delivery.errors import ConflictError, InvalidRequestError, NotFoundError
from delivery.templates import (
    ANY_SOURCE,
    DEFAULTS,
    MAX_SOURCE_CHARS,
    VARIABLES,
    Composed,
    book_of,
    check_template,
    kinds_of,
    render_or_default,
    sample_block,
)

router = APIRouter(tags=["templates"])
TENANT = "/api/v1/templates"
PROJECT = "/api/v1/projects/{project_id}/templates"

_log = structlog.get_logger(__name__)

Body = Annotated[str, Field(min_length=1, max_length=MAX_SOURCE_CHARS), Clean]
Source = Literal["schedule", "wakeup", "event", "any"]
SampleSource = Literal["schedule", "wakeup", "event"]


class SampleItem(RequestModel):
    """The inventory item of a sample block."""

    label: Label
    properties: dict[str, Any] = Field(default_factory=dict)


class Sample(RequestModel):
    """
    A sample intent block: what a fire would carry. ``fire_at`` is the fire time
    as the user sees it (ISO 8601 with its offset); absent fields are absent.
    """

    intent: OptionalText = ""
    fire_at: str | None = None
    item: SampleItem | None = None
    metadata: dict[str, Any] | None = None
    occasion: OptionalText | None = None
    interest_topic: OptionalText | None = None
    event_description: OptionalText | None = None
    language: Label | None = None


class TemplateCreate(RequestModel):
    """``POST …/templates``; ``sample``, when given, is checked instead of the built-in samples."""

    check_type: Label
    source: Source = "any"
    body: Body
    sample: Sample | None = None


class TemplateUpdate(RequestModel):
    """``PUT …/templates/{templateId}``: the new body, the template's next version."""

    body: Body
    sample: Sample | None = None


class TemplatePreview(RequestModel):
    """
    ``POST …/templates/preview``: render ``body``, or the stored ``template_id``, or
    when neither is given what a fire would use (the project's template for
    ``check_type`` and ``source``, else the built-in default), for a ``source`` block
    of ``check_type`` built from ``sample`` or the built-in sample.
    """

    body: Body | None = None
    template_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:@+-]{1,128}$")] | None = None
    check_type: Label = "reminder"
    source: SampleSource = "schedule"
    sample: Sample | None = None


class TemplateOut(ResponseModel):
    template_id: str
    project_id: str
    check_type: str
    source: str
    body: str
    version: int
    created_at: str
    updated_at: str


class TemplateList(ResponseModel):
    templates: list[TemplateOut]


class VersionOut(ResponseModel):
    version: int
    body: str
    created_at: str


class VersionList(ResponseModel):
    template_id: str
    versions: list[VersionOut]


class PreviewOut(ResponseModel):
    message: str
    composer: str


class DefaultOut(ResponseModel):
    check_type: str
    source: str
    body: str


class DefaultList(ResponseModel):
    defaults: list[DefaultOut]
    variables: dict[str, str]


def _entry(row: RowMapping) -> dict[str, Any]:
    return {
        "template_id": row["id"],
        "project_id": row["project_id"],
        "check_type": row["check_type"],
        "source": row["source"],
        "body": row["body"],
        "version": row["version"],
        "created_at": wire_time(row["created_at"]),
        "updated_at": wire_time(row["updated_at"]),
    }


def _not_found(template_id: str) -> NotFoundError:
    return NotFoundError(
        "template_id", f"template_id {template_id!r}: no such template", resource="template"
    )


def _instant(text: str | None, field: str) -> datetime | None:
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise InvalidRequestError(
            field, f"{field} must be an ISO 8601 instant with an offset, got {text!r}"
        )
    return at


def sample_of(sample: Sample, kind: SourceKind, check_type: str, field: str) -> IntentBlock:
    """The intent block a fire with ``sample``'s values carries (as the dispatcher builds it)."""
    check_metadata(sample.metadata, f"{field}.metadata")
    if sample.item is not None:
        check_metadata(sample.item.properties, f"{field}.item.properties")
    at = _instant(sample.fire_at, f"{field}.fire_at") or datetime(2026, 5, 2, 9, tzinfo=UTC)
    item = (
        InventoryItem(label=sample.item.label, properties=sample.item.properties)
        if sample.item is not None
        else None
    )
    if kind is SourceKind.SCHEDULE:
        return schedule_block(
            intent=sample.intent,
            check_type=check_type,
            fire_at_local=at.isoformat(),
            item=item,
            metadata=sample.metadata,
        )
    if kind is SourceKind.WAKEUP:
        return wakeup_block(
            intent=sample.intent,
            check_type=check_type,
            fire_at=at,
            occasion=sample.occasion,
            interest_topic=sample.interest_topic,
            event_description=sample.event_description,
            item=item,
        )
    return event_block(
        event_type=check_type,
        event_description=sample.event_description or sample.intent or None,
        occurred_at=at,
        metadata=sample.metadata,
        language=sample.language,
    )


def _check(body: str, check_type: str, source: str, sample: Sample | None) -> None:
    kinds = kinds_of(source)
    blocks = (
        [sample_of(sample, k, check_type, "sample") for k in kinds] if sample is not None else None
    )
    check_template(body, check_type=check_type, kinds=kinds, blocks=blocks)


async def _create(ctx: ApiContext, project: str, body: TemplateCreate) -> Response:
    _check(body.body, body.check_type, body.source, body.sample)
    row = await ctx.store.templates.create_template(
        project,
        check_type=body.check_type,
        source=body.source,
        body=body.body,
        now=ctx.clock.now(),
    )
    if row is None:
        raise ConflictError(
            "check_type",
            f"a template for check_type {body.check_type!r} and source {body.source!r} "
            "exists; update it (PUT …/templates/{template_id})",
        )
    _log.info("template.created", project_id=project, template_id=row["id"])
    return JSONResponse(_entry(row), status_code=201)


async def _list(ctx: ApiContext, project: str) -> Response:
    rows = await ctx.store.templates.list_templates(project)
    return JSONResponse({"templates": [_entry(r) for r in rows]})


async def _get(ctx: ApiContext, project: str, template_id: str) -> Response:
    row = await ctx.store.templates.get_template(project, template_id)
    if row is None:
        raise _not_found(template_id)
    return JSONResponse(_entry(row))


async def _update(
    ctx: ApiContext, project: str, template_id: str, body: TemplateUpdate
) -> Response:
    current = await ctx.store.templates.get_template(project, template_id)
    if current is None:
        raise _not_found(template_id)
    _check(body.body, current["check_type"], current["source"], body.sample)
    row = await ctx.store.templates.update_template(
        project, template_id, body=body.body, now=ctx.clock.now()
    )
    if row is None:
        raise _not_found(template_id)
    _log.info(
        "template.updated", project_id=project, template_id=template_id, version=row["version"]
    )
    return JSONResponse(_entry(row))


async def _versions(ctx: ApiContext, project: str, template_id: str) -> Response:
    rows = await ctx.store.templates.template_versions(project, template_id)
    if rows is None:
        raise _not_found(template_id)
    versions = [
        {"version": r["version"], "body": r["body"], "created_at": wire_time(r["created_at"])}
        for r in rows
    ]
    return JSONResponse({"template_id": template_id, "versions": versions})


async def _delete(ctx: ApiContext, project: str, template_id: str) -> Response:
    if not await ctx.store.templates.delete_template(project, template_id):
        raise _not_found(template_id)
    _log.info("template.deleted", project_id=project, template_id=template_id)
    return JSONResponse({"success": True})


async def _preview(ctx: ApiContext, project: str, body: TemplatePreview) -> Response:
    if body.body is not None and body.template_id is not None:
        raise InvalidRequestError("template_id", "give body or template_id, not both")
    kind = SourceKind(body.source)
    check_type = body.check_type
    source = body.body
    if body.template_id is not None:
        row = await ctx.store.templates.get_template(project, body.template_id)
        if row is None:
            raise _not_found(body.template_id)
        source = row["body"]
        if row["check_type"] != "*":
            check_type = row["check_type"]
        if row["source"] != ANY_SOURCE:
            kind = SourceKind(row["source"])
    block = (
        sample_of(body.sample, kind, check_type, "sample")
        if body.sample is not None
        else sample_block(kind, check_type)
    )
    if source is None:
        # What a fire would send: the project's most specific template, else the default.
        book = book_of(await ctx.store.templates.list_templates(project))
        message, how, _error = render_or_default(book, block)
        return JSONResponse({"message": message, "composer": how})
    field = "body" if body.body is not None else "template_id"
    template = check_template(
        source, check_type=check_type, kinds=(kind,), blocks=[block], field=field
    )
    return JSONResponse({"message": template.render(block), "composer": Composed.TEMPLATE})


def _defaults() -> Response:
    defaults = [
        {"check_type": check_type, "source": source, "body": body}
        for (check_type, source), body in sorted(DEFAULTS.items())
    ]
    return JSONResponse({"defaults": defaults, "variables": dict(VARIABLES)})


# --- tenant-scoped: the key's project ---------------------------------------------------


@router.get(TENANT, responses={200: {"model": TemplateList}})
async def list_templates(project: ProjectId, ctx: Ctx) -> Response:
    """The project's templates, by check type then source."""
    return await _list(ctx, project)


@router.post(TENANT, status_code=201, responses={201: {"model": TemplateOut}})
async def create_template(body: TemplateCreate, project: ProjectId, ctx: Ctx) -> Response:
    """
    Create the template of a check type and source (version 1). 400 ``INVALID_TEMPLATE``
    when it does not compile or fails on the sample blocks; 409 when one exists.
    """
    return await _create(ctx, project, body)


@router.get(TENANT + "/defaults", responses={200: {"model": DefaultList}})
async def list_defaults(project: ProjectId) -> Response:
    """The built-in templates and the variables a template may use."""
    return _defaults()


@router.post(TENANT + "/preview", responses={200: {"model": PreviewOut}})
async def preview_template(body: TemplatePreview, project: ProjectId, ctx: Ctx) -> Response:
    """Render a body, a stored template or the default against a sample block; writes nothing."""
    return await _preview(ctx, project, body)


@router.get(TENANT + "/{template_id}", responses={200: {"model": TemplateOut}})
async def get_template(template_id: ResourceId, project: ProjectId, ctx: Ctx) -> Response:
    """One template; 404 for an unknown or another project's id."""
    return await _get(ctx, project, template_id)


@router.put(TENANT + "/{template_id}", responses={200: {"model": TemplateOut}})
async def update_template(
    template_id: ResourceId, body: TemplateUpdate, project: ProjectId, ctx: Ctx
) -> Response:
    """Replace the body as the next version (earlier versions stay listed)."""
    return await _update(ctx, project, template_id, body)


@router.get(TENANT + "/{template_id}/versions", responses={200: {"model": VersionList}})
async def list_versions(template_id: ResourceId, project: ProjectId, ctx: Ctx) -> Response:
    """Every version of the template, newest first."""
    return await _versions(ctx, project, template_id)


@router.delete(TENANT + "/{template_id}", responses={200: {"model": Success}})
async def delete_template(template_id: ResourceId, project: ProjectId, ctx: Ctx) -> Response:
    """Delete the template and its versions; its check type falls back to the default."""
    return await _delete(ctx, project, template_id)


# --- project-scoped ---------------------------------------------------------------------


@router.get(PROJECT, responses={200: {"model": TemplateList}})
async def list_project_templates(project: PathProject, ctx: Ctx) -> Response:
    """As the tenant-scoped list, for ``project_id``."""
    return await _list(ctx, project)


@router.post(PROJECT, status_code=201, responses={201: {"model": TemplateOut}})
async def create_project_template(body: TemplateCreate, project: PathProject, ctx: Ctx) -> Response:
    """As the tenant-scoped create, for ``project_id``."""
    return await _create(ctx, project, body)


@router.get(PROJECT + "/defaults", responses={200: {"model": DefaultList}})
async def list_project_defaults(project: PathProject) -> Response:
    """As the tenant-scoped defaults."""
    return _defaults()


@router.post(PROJECT + "/preview", responses={200: {"model": PreviewOut}})
async def preview_project_template(
    body: TemplatePreview, project: PathProject, ctx: Ctx
) -> Response:
    """As the tenant-scoped preview, for ``project_id``."""
    return await _preview(ctx, project, body)


@router.get(PROJECT + "/{template_id}", responses={200: {"model": TemplateOut}})
async def get_project_template(template_id: ResourceId, project: PathProject, ctx: Ctx) -> Response:
    """As the tenant-scoped get, for ``project_id``."""
    return await _get(ctx, project, template_id)


@router.put(PROJECT + "/{template_id}", responses={200: {"model": TemplateOut}})
async def update_project_template(
    template_id: ResourceId, body: TemplateUpdate, project: PathProject, ctx: Ctx
) -> Response:
    """As the tenant-scoped update, for ``project_id``."""
    return await _update(ctx, project, template_id, body)


@router.get(PROJECT + "/{template_id}/versions", responses={200: {"model": VersionList}})
async def list_project_versions(
    template_id: ResourceId, project: PathProject, ctx: Ctx
) -> Response:
    """As the tenant-scoped versions, for ``project_id``."""
    return await _versions(ctx, project, template_id)


@router.delete(PROJECT + "/{template_id}", responses={200: {"model": Success}})
async def delete_project_template(
    template_id: ResourceId, project: PathProject, ctx: Ctx
) -> Response:
    """As the tenant-scoped delete, for ``project_id``."""
    return await _delete(ctx, project, template_id)
