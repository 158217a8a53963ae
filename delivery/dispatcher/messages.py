"""
The dispatcher's message step: drafts in, a non-empty message per draft out.

With the template composer each draft gets its project's most specific template,
or the built-in default (:mod:`delivery.templates`). With an LLM, a failing call
is retried with backoff for ``retry_s``; after that the template (or default)
writes the message and the notification is marked ``template_fallback``. Either
way no notification is left without a message, and how each was made is
recorded in the notification's ``composer``.

Templates are read per project at most once per ``ttl_s`` (:class:`TemplateBooks`):
a burst composes thousands of messages a second from a handful of projects,
which must not cost a query each.
"""

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from delivery.dispatcher.cache import ProjectCache
from delivery.dispatcher.composers import Composer, CompositionError
from delivery.domain import Draft
from delivery.store.templates import TemplateSource
from delivery.templates import Composed, TemplateBook, book_of, render_or_default

log = structlog.get_logger(__name__)

COMPOSE_CONCURRENCY = 32
"""LLM calls in flight per batch (as :data:`delivery.dispatcher.process.COMPOSE_CONCURRENCY`)."""


class TemplateBooks:
    """
    Each project's compiled templates, read through ``source`` and kept ``ttl_s``.

    Args:
        source: the store's template reads.
        ttl_s: how long a project's templates are reused (0: read every batch).
        clock: monotonic seconds (tests move it).
    """

    def __init__(
        self,
        source: TemplateSource,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._cache: ProjectCache[TemplateBook] = ProjectCache(self._load, ttl_s=ttl_s, clock=clock)

    @property
    def reads(self) -> int:
        """Store reads made (tests and the benchmark check the cache)."""
        return self._cache.reads

    async def _load(self, project_ids: list[str]) -> dict[str, TemplateBook]:
        rows = await self._source.project_templates(project_ids)
        return {p: book_of(rows.get(p, [])) for p in project_ids}

    async def books(self, project_ids: Iterable[str]) -> dict[str, TemplateBook]:
        """The templates of every project named, reading the stale ones in one query."""
        return await self._cache.get(project_ids)


@dataclass(frozen=True, slots=True)
class Message:
    """One draft's message: the text, how it was made, and why a fallback was used."""

    draft: Draft
    text: str
    composer: Composed
    reason: str | None = None


class Messages:
    """
    Composes a batch of drafts: templates, or an LLM with retries and a template fallback.

    Args:
        books: the projects' templates.
        llm: the LLM composer, or ``None`` for templates only.
        retry_s: how long a failing LLM call is retried before falling back.
        backoff_s: the first retry's delay; each later one doubles, capped at 2 s.
    """

    def __init__(
        self,
        books: TemplateBooks,
        llm: Composer | None = None,
        *,
        retry_s: float = 10.0,
        backoff_s: float = 0.25,
    ) -> None:
        self.books = books
        self.llm = llm
        self.retry_s = retry_s
        self.backoff_s = backoff_s

    async def compose(self, drafts: Sequence[Draft]) -> list[Message]:
        """A message per draft, in order; never raises for a composition failure."""
        if not drafts:
            return []
        books = await self.books.books({d.project_id for d in drafts})
        if self.llm is None:
            out = [self._templated(d, books[d.project_id]) for d in drafts]
        else:
            gate = asyncio.Semaphore(COMPOSE_CONCURRENCY)

            async def gated(draft: Draft) -> Message:
                async with gate:
                    return await self._llm(draft, books[draft.project_id])

            out = list(await asyncio.gather(*(gated(d) for d in drafts)))
        for m in out:
            if m.reason is not None:
                log.warning(
                    "notification.composed_with_fallback",
                    notification_id=m.draft.notification_id,
                    project_id=m.draft.project_id,
                    check_type=m.draft.block.check_type,
                    composer=m.composer.value,
                    reason=m.reason,
                )
        return out

    def _templated(self, draft: Draft, book: TemplateBook) -> Message:
        text, how, error = render_or_default(book, draft.block)
        return Message(draft, text, how, error)

    async def _llm(self, draft: Draft, book: TemplateBook) -> Message:
        if self.llm is None:  # pragma: no cover - compose() only calls this with an LLM
            return self._templated(draft, book)
        deadline = time.monotonic() + self.retry_s
        attempt = 0
        while True:
            attempt += 1
            try:
                if attempt == 1:
                    # The first call has the composer's own timeout; retries share the budget.
                    text = await self.llm.compose(draft.block)
                else:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        text = await self.llm.compose(draft.block)
                return Message(draft, text, Composed.LLM)
            except (CompositionError, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            delay = min(2.0, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if time.monotonic() + delay >= deadline:
                break
            log.info(
                "notification.llm_retry",
                notification_id=draft.notification_id,
                attempt=attempt,
                delay_s=round(delay, 3),
                error=error,
            )
            await asyncio.sleep(delay)
        text, _how, template_error = render_or_default(book, draft.block)
        reason = f"LLM failed {attempt} time(s) in {self.retry_s:g} s: {error}"
        if template_error is not None:
            reason += f"; the project's template failed too: {template_error}"
        return Message(draft, text, Composed.TEMPLATE_FALLBACK, reason)


def as_composed(
    messages: Iterable[Message],
) -> tuple[list[tuple[Draft, str, str | None]], Mapping[str, str]]:
    """What :func:`delivery.dispatcher.process.notification_batch` takes: the
    ``(draft, message, error)`` triples and each source's composer."""
    messages = list(messages)
    return (
        [(m.draft, m.text, None) for m in messages],
        {m.draft.source_id: m.composer.value for m in messages},
    )
