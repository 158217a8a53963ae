"""
Trigger events under ``/api/v1/agents/{agentId}/events``.

Accepting an event commits the event row and its ``event.accepted`` outbox
message together (with its ``Idempotency-Key`` record, and with the events of
concurrent requests: :mod:`delivery.api.ingest`); the daemon relays the message
and builds the reaction.
"""

import json
import re

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from delivery.api import bodyroute as body_route
from delivery.api.auth import ProjectId
from delivery.api.context import AgentId, Ctx, check_id, check_metadata, parse_limit, wire_time
from delivery.api.idempotency import CLAIM_STATE, IdempotencyClaim
from delivery.api.metrics import bind_ids
from delivery.api.routes.policy import source_policy_json
from delivery.api.schemas import EventAccepted, EventCreate, EventList, EventOut
from delivery.bus.subjects import Subjects
from delivery.domain import notification_id
from delivery.store.common import canonical_json, new_id
from delivery.store.events import EventWrite
from delivery.tracing import current_stored

router = APIRouter(tags=["events"])
PREFIX = "/api/v1/agents/{agent_id}/events"
SELF_RECORDING = re.compile(r"POST /api/v1/agents/[^/]+/events")
"""The route that records its ``Idempotency-Key`` answer with its grouped write."""


def accepted_body(event_id: str) -> bytes:
    """
    :class:`EventAccepted` for ``event_id`` as ``JSONResponse`` writes it, byte for
    byte: an id made by ``new_id`` is letters, digits and ``_``, with nothing to
    escape. Written directly because the model and its ``json.dumps`` were ~10 us of
    every accepted event.
    """
    return b'{"accepted":true,"event_id":"' + event_id.encode() + b'"}'


@body_route.post(router, PREFIX, responses={200: {"model": EventAccepted}})
async def trigger_event(
    agent_id: AgentId, body: EventCreate, project: ProjectId, ctx: Ctx, request: Request
) -> Response:
    """Accept a backend event for the agent's reaction; answers ``{accepted, event_id}``."""
    now = ctx.clock.now()
    metadata_json = check_metadata(dict(body.metadata) if body.metadata else None)
    messages_json = (
        canonical_json([m.model_dump() for m in body.messages]) if body.messages else None
    )
    event_id = new_id("evt")
    # Every column of trigger_events, as plain values (delivery.store.creates).
    row = {
        "id": event_id,
        "project_id": project,
        "agent_id": agent_id,
        "user_id": body.user_id,
        "event_type": body.event_type,
        "event_description": body.event_description,
        "metadata_json": metadata_json,
        "messages_json": messages_json,
        "language": body.language or "en",
        "instance_id": body.instance_id or None,
        "status": "accepted",
        "created_at": now,
        "policy_json": source_policy_json(body),
    }
    outbox = {
        "subject": Subjects(ctx.settings.subject_prefix).event_accepted,
        "msg_id": event_id,
        "payload": canonical_json({"version": 1, "event_id": event_id}),
        # The request's id and trace ride along to the dispatcher and the handlers.
        "headers": current_stored(),
        "created_at": now,
    }
    bind_ids(
        event_id=event_id,
        message_id=notification_id(event_id),
        user_id=body.user_id,
        agent_id=agent_id,
    )
    answer = Response(accepted_body(event_id), media_type="application/json")
    claim: IdempotencyClaim | None = getattr(request.state, CLAIM_STATE, None)
    # Written with the other requests' events in one transaction; the key's
    # record commits with it, so the answer is never recorded without its event.
    record = (
        await claim.record(answer.status_code, bytes(answer.body)) if claim is not None else None
    )
    outcome = await ctx.ingest.accept(EventWrite(row, outbox, record))
    if not outcome.written and claim is not None:
        claim.replay_from(outcome.replay)
    return answer


@router.get(PREFIX, responses={200: {"model": EventList}})
async def list_events(
    agent_id: AgentId,
    project: ProjectId,
    ctx: Ctx,
    user_id: str | None = None,
    limit: str | None = None,
) -> Response:
    """The agent's accepted events, newest first (beyond the SDK: it has no such call)."""
    count = parse_limit(limit, default=50, maximum=500)
    check_id(user_id, "user_id")
    rows = await ctx.store.events.list_events(
        project, agent_id, user_id=user_id or None, limit=count
    )
    events = [
        EventOut(
            event_id=r.id,
            agent_id=r.agent_id,
            user_id=r.user_id,
            event_type=r.event_type,
            status=r.status,
            created_at=wire_time(r.created_at),
            metadata=json.loads(r.metadata_json) if r.metadata_json else {},
            event_description=r.event_description,
        )
        for r in rows
    ]
    return JSONResponse(EventList(events=events).model_dump(exclude_none=True))
