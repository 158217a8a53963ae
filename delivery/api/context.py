"""
What every route needs, injected once through ``create_app`` (no globals), and the
small parsing helpers the routes share: wire timestamps, limits, ids, metadata.
"""

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol, runtime_checkable

import structlog
from fastapi import Depends, Path, Request

from delivery.api.ingest import EventIngest
from delivery.api.schemas import (
    ID_PATTERN,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_STRING_CHARS,
)
from delivery.clock import Clock
from delivery.dispatcher.composers import SharedComposer
from delivery.errors import InvalidIdError, InvalidLimitError, InvalidRequestError
from delivery.secrets import LazySecretBox
from delivery.settings import Settings
from delivery.store.advance import Pair, due_in_real_time
from delivery.store.channels import ChannelStore
from delivery.store.common import canonical_json
from delivery.store.creates import ExpectedOffset
from delivery.store.engine import after_commit
from delivery.store.idempotency import Recorded
from delivery.store.sql import SqlStore
from delivery.store.timeline import SqlTimelineStore
from delivery.store.webhooks import WebhookStore

_log = structlog.get_logger(__name__)


class Wakeable(Protocol):
    """Something to nudge after a write that may make work due sooner (the daemon's loops)."""

    def wake(self) -> None:
        """Re-check for due work soon; must not block and must be safe to call often."""
        ...


@runtime_checkable
class RelayWakeable(Protocol):
    """A :class:`Wakeable` that can also nudge the outbox relay alone."""

    def wake_relay(self) -> None:
        """Publish committed outbox rows soon; must not block, safe to call often."""
        ...


class NoWaker:
    """The default :class:`Wakeable`: the API runs without a daemon in-process."""

    def wake(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class ApiContext:
    """The API's collaborators, stored on ``app.state.ctx``."""

    settings: Settings
    store: SqlStore
    clock: Clock
    waker: Wakeable
    secrets: LazySecretBox
    """The deployment's secret box, built on first use (it may create the key file)."""
    channels: ChannelStore
    """Contacts, preferences and project channels (destinations sealed with ``secrets``)."""
    webhooks: WebhookStore
    composer: SharedComposer
    """The advance-time composer, built on first use and closed with the app."""
    timeline: SqlTimelineStore
    """The timeline's reads (read-only)."""
    ingest: EventIngest
    """Accepted events, written in grouped transactions."""

    def wake(self) -> None:
        """
        Nudge the waker once the request's writes have committed; never fails the request.

        Inside an ``Idempotency-Key`` request the writes commit only after the
        route has answered, and a loop woken before that finds nothing. The
        write is durable by then and the daemon's periodic tick finds it anyway,
        so a waker fault is logged, not answered as a 500 (which would make the
        SDK retry and duplicate the write).
        """
        after_commit(self.store.engine, self._wake_now)

    def wake_relay(self) -> None:
        """
        Nudge the outbox relay after a commit that wrote only outbox rows (an
        accepted event): the scheduler has nothing to claim for it. A waker
        without a relay of its own is woken whole.
        """
        try:
            if isinstance(self.waker, RelayWakeable):
                self.waker.wake_relay()
            else:
                self.waker.wake()
        except Exception as exc:  # the waker belongs to another component
            _log.warning("waker failed", error=repr(exc))

    def _wake_now(self) -> None:
        try:
            self.waker.wake()
        except Exception as exc:  # the waker belongs to another component
            _log.warning("waker failed", error=repr(exc))


@dataclass(frozen=True, slots=True)
class PairClock:
    """
    An (agent, user) pair's clock: real time plus its advance-time offset.

    Every read and write for the pair takes "now" from here (:attr:`now`); a row
    written on an advanced clock also carries the real instant it is due at
    (:meth:`due_at`), which is what the scheduler claims by.
    """

    real: datetime
    offset: timedelta

    @property
    def now(self) -> datetime:
        """The pair's now."""
        return self.real + self.offset

    def due_at(self, instant: datetime | None) -> datetime | None:
        """The ``due_at`` column of a row due at ``instant`` on this clock."""
        return due_in_real_time(instant, self.offset)


async def pair_clock(ctx: "ApiContext", project: str, agent: str, user: str) -> PairClock:
    """The pair's clock now (one primary-key read)."""
    real = ctx.clock.now()
    offset_s = await ctx.store.clocks.clock_offset(Pair(project, agent, user))
    return PairClock(real, timedelta(seconds=offset_s or 0.0))


async def create_on_pair_clock[B, P](
    ctx: "ApiContext",
    pair: Pair,
    *,
    build: Callable[[PairClock], B],
    settle: Callable[[], P],
    write: Callable[[B, P, ExpectedOffset | None], Awaitable[Recorded]],
    check: Callable[[], Awaitable[None]] | None = None,
) -> B:
    """
    Build a create (wakeup, schedule) on ``pair``'s clock and write it, reading the
    clock's offset only for a pair that has one.

    Almost no pair is advanced, so the row is first built on real time and its
    write checks, in its own transaction, that the pair still has no offset
    (:class:`~delivery.store.creates.ExpectedOffset`): that saves the separate
    read of the offset, a tenth of the request. When that guess cannot be used
    (``check`` is given: an inventory item is read on the pair's clock), or
    anything fails on it, the offset is read and everything is decided again on
    the pair's clock, in the route's order (``build``, ``check``, ``settle``), so
    each error is the one that clock gives. A write refused by the check (the pair
    was advanced) wrote nothing; the row is built again on the offset it found
    and written without a second check.

    Returns:
        What ``build`` made for the clock the row was written on.
    """
    real = ctx.clock.now()
    guessed: tuple[B, P] | None = None
    if check is None:
        try:
            guessed = build(PairClock(real, timedelta(0))), settle()
        except Exception:
            guessed = None
    if guessed is not None:
        built, settled = guessed
        outcome = await write(built, settled, ExpectedOffset(pair, None))
    else:
        built = build(await pair_clock(ctx, pair.project_id, pair.agent_id, pair.user_id))
        if check is not None:
            await check()
        settled = settle()
        outcome = await write(built, settled, None)
    if outcome.moved:
        built = build(PairClock(real, timedelta(seconds=outcome.offset_s or 0.0)))
        outcome = await write(built, settled, None)
    if outcome.written:
        ctx.wake()
    return built


async def _ctx(request: Request) -> ApiContext:
    # async on purpose: FastAPI runs a plain-def dependency in its thread pool,
    # a thread hop per request that costs more than the whole database read.
    ctx: ApiContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ApiContext, Depends(_ctx)]

AgentId = Annotated[str, Path(pattern=ID_PATTERN, description="Agent id; created on first use.")]
UserId = Annotated[str, Path(pattern=ID_PATTERN, description="User id; created on first use.")]
ResourceId = Annotated[str, Path(pattern=ID_PATTERN)]

_ID = re.compile(ID_PATTERN)


def wire_time(instant: datetime | None) -> str:
    """RFC 3339 UTC with ``Z``; an empty string means "nothing"."""
    if instant is None:
        return ""
    utc = instant.astimezone(UTC)
    spec = "microseconds" if utc.microsecond else "seconds"
    return utc.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def opt_time(instant: datetime | None) -> str | None:
    """Like :func:`wire_time` but ``None`` (omitted) when absent."""
    return None if instant is None else wire_time(instant)


def parse_limit(raw: str | None, *, default: int, maximum: int, field: str = "limit") -> int:
    """
    A ``limit`` query value in 1..maximum (never clamped: out of range is an error).

    Raises:
        InvalidLimitError: not an integer, or out of range.
    """
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidLimitError(field, f"{field} must be an integer, got {raw!r}") from None
    if not 1 <= value <= maximum:
        raise InvalidLimitError(field, f"{field} must be between 1 and {maximum}, got {value}")
    return value


def check_id(value: str | None, field: str) -> str | None:
    """
    Validate an id given in a query string or body.

    Raises:
        InvalidIdError: it does not match ``[A-Za-z0-9._:@+-]{1,128}``.
    """
    if value is None:
        return None
    if not _ID.match(value):
        raise InvalidIdError(field, f"{field} must match [A-Za-z0-9._:@+-]{{1,128}}")
    return value


def check_label(value: str | None, field: str, max_length: int = 128) -> str | None:
    """
    Validate a free-form filter value from a query string (``event_type``, ``item_type``).

    Raises:
        InvalidRequestError: longer than ``max_length`` or holding a NUL character.
    """
    if value is None:
        return None
    if len(value) > max_length or "\x00" in value:
        raise InvalidRequestError(
            field, f"{field} must be at most {max_length} characters, without NUL"
        )
    return value


def check_metadata(value: dict[str, Any] | None, field: str = "metadata") -> str | None:
    """
    Canonical JSON of a metadata object, or ``None`` when absent or empty.

    Raises:
        InvalidRequestError: more than 64 keys, nested deeper than 10 levels, a key
            longer than 128 characters or a string longer than 8000, or more than
            16 KiB of JSON; the message names the offending path (``metadata.a.0``).
    """
    if not value:
        return None
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidRequestError(
            field, f"{field} has {len(value)} keys; at most {MAX_METADATA_KEYS} are allowed"
        )
    _check_metadata_shape(value, field)
    text = canonical_json(value)
    if len(utf8(text, field)) > MAX_METADATA_BYTES:
        raise InvalidRequestError(
            field, f"{field} is larger than {MAX_METADATA_BYTES // 1024} KiB as JSON"
        )
    return text


def _check_metadata_shape(value: dict[str, Any], field: str) -> None:
    """
    Bound the nesting depth and every key and string of a parsed metadata object.

    Walked with an explicit stack, not recursion: the depth is what is being checked.

    Raises:
        InvalidRequestError: naming the path of the first offending value.
    """
    stack: list[tuple[str, Any, int]] = [(field, value, 1)]
    while stack:
        path, node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise InvalidRequestError(
                    path,
                    f"{path} is nested {depth} levels deep in {field}; "
                    f"at most {MAX_METADATA_DEPTH} levels are allowed",
                )
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                if isinstance(key, str) and len(key) > MAX_METADATA_KEY_CHARS:
                    raise InvalidRequestError(
                        path,
                        f"{path} has a key of {len(key)} characters; "
                        f"at most {MAX_METADATA_KEY_CHARS} are allowed",
                    )
                stack.append((f"{path}.{key}", child, depth + 1))
        elif isinstance(node, str) and len(node) > MAX_METADATA_STRING_CHARS:
            raise InvalidRequestError(
                path,
                f"{path} is {len(node)} characters long; "
                f"at most {MAX_METADATA_STRING_CHARS} are allowed",
            )


def utf8(text: str, field: str) -> bytes:
    """
    ``text`` as UTF-8.

    Raises:
        InvalidRequestError: it holds a lone surrogate (a legal JSON escape that
            no database can store).
    """
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidRequestError(field, f"{field} contains an unpaired surrogate") from None


def loads(text: str | None) -> Any:
    """Parse stored canonical JSON (``None`` stays ``None``)."""
    return None if text is None else json.loads(text)
