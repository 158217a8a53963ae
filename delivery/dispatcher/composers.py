"""
Composers: an intent block in, the agent's opening message out.

:class:`TemplateComposer` restates the block's parts: deterministic, no network
(advance-time composes with it). :class:`LlmComposer` speaks the
OpenAI-compatible chat-completions API over httpx. Either raises
:class:`CompositionError` when it cannot produce a message; a caller composing
with one directly keeps the notification as ``failed_generation`` with the error.
The dispatcher composes through :mod:`delivery.dispatcher.messages` instead: the
project's templates or the built-in defaults, or the LLM retried and then
replaced by them, so its notifications always carry a message.
"""

from typing import Any, Protocol

import httpx
import structlog

from delivery.domain import IntentBlock, SourceKind
from delivery.settings import Settings

log = structlog.get_logger(__name__)

SYSTEM_PROMPT = (
    "You are an AI companion reaching out to the user first, not replying to them. "
    "The block below tells you why. Write the opening message in your own voice: "
    "short, warm and specific, grounded in the intent and any reference item or "
    "context given. Reply with the message text only."
)
"""As the Sonzai docs put it: "no prompt template is exposed; you control intent, not wording"."""


class CompositionError(Exception):
    """The composer could not produce a message; ``str(exc)`` is stored as the error."""


class Composer(Protocol):
    """
    Turns an intent block into the message text.

    ``compose`` must either return a non-empty message or raise
    :class:`CompositionError`; any other exception is a bug. ``aclose``
    releases what the composer holds (connections) and is safe to call twice.
    A composer whose ``compose`` never waits may say so with ``io_bound = False``:
    a batch is then composed in one pass instead of concurrently.
    """

    async def compose(self, block: IntentBlock) -> str:
        """The agent's message for ``block``."""
        ...

    async def aclose(self) -> None:
        """Release resources."""
        ...


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


class TemplateComposer:
    """
    A deterministic message from the block's structured parts; no network.

    The same block always gives the same text, which keeps advance-time
    reproducible and tests exact.
    """

    io_bound = False
    """Never waits: a batch is composed in one go, not as one task per message."""

    async def compose(self, block: IntentBlock) -> str:
        """Render a short message; never raises."""
        parts: list[str] = []
        if block.kind is SourceKind.EVENT:
            parts.append(f"About your {block.check_type.replace('_', ' ')}:")
            parts.append(_sentence(block.intent) or "Something just happened.")
        else:
            parts.append(_sentence(block.intent) or f"A {block.check_type} from me.")
            for label, value in block.details:
                if label == "Occasion":
                    parts.append(f"Occasion: {_sentence(value)}")
        if block.item is not None:
            props = ", ".join(f"{k}: {v}" for k, v in block.item.pairs())
            parts.append(f"{block.item.label} ({props})." if props else f"{block.item.label}.")
        return " ".join(p for p in parts if p)

    async def aclose(self) -> None:
        """Nothing to release."""


class LlmComposer:
    """
    OpenAI-compatible ``POST {base_url}/chat/completions`` over httpx, with a timeout.

    ``base_url`` includes the version segment (``https://api.openai.com/v1``),
    as OpenAI-compatible servers document it. Any transport error, timeout,
    non-2xx answer or malformed body raises :class:`CompositionError`.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name sent in the request.
        api_key: sent as ``Authorization: Bearer``; omitted when empty.
        timeout_s: total timeout per request.
        transport: an httpx transport (tests and the shared pool); ``None`` for httpx's default.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str = "",
        timeout_s: float = 20.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._model = model
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout_s), transport=transport
        )

    async def compose(self, block: IntentBlock) -> str:
        """
        Ask the model for the message.

        Raises:
            CompositionError: timeout, connection failure, non-2xx, or no text.
        """
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": block.text},
            ],
            # As repeatable as the provider allows (advance-time is meant to be deterministic).
            "temperature": 0,
        }
        try:
            response = await self._client.post(self._url, json=body)
        except httpx.TimeoutException as exc:
            raise CompositionError(f"LLM request timed out: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise CompositionError(f"LLM request failed: {exc!r}") from exc
        if response.status_code // 100 != 2:
            raise CompositionError(
                f"LLM answered HTTP {response.status_code}: {response.text[:500]}"
            )
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise CompositionError(f"LLM answer has no message content: {exc!r}") from exc
        if not isinstance(content, str) or not content.strip():
            raise CompositionError("LLM answer has an empty message")
        return content.strip()

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def build_composer(
    settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
) -> Composer:
    """
    The composer ``settings.composer`` names (``template`` or ``llm``).

    Raises:
        ValueError: an unknown composer, or ``llm`` without ``llm_base_url``.
    """
    if settings.composer == "template":
        return TemplateComposer()
    if settings.composer == "llm":
        if not settings.llm_base_url:
            raise ValueError("DELIVERY_COMPOSER=llm needs DELIVERY_LLM_BASE_URL")
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else ""
        return LlmComposer(
            base_url=settings.llm_base_url,
            model=settings.llm_model,
            api_key=key,
            timeout_s=settings.llm_timeout_s,
            transport=transport,
        )
    raise ValueError(f"unknown composer {settings.composer!r}: use template or llm")


class SharedComposer:
    """
    The composer ``settings`` names, built on first use and shared until closed.

    The API holds one for its whole life, so advance-time calls reuse one LLM
    client (and its connection pool) instead of opening one per request; built
    lazily, so an app that never advances time never builds it (nor fails on
    a missing ``DELIVERY_LLM_BASE_URL``).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._composer: Composer | None = None

    def get(self) -> Composer:
        """The shared composer, built now if this is the first call.

        Raises:
            ValueError: the settings name no usable composer (see :func:`build_composer`).
        """
        if self._composer is None:
            self._composer = build_composer(self._settings)
        return self._composer

    async def aclose(self) -> None:
        """Close the composer if it was built; the next :meth:`get` builds a new one."""
        composer, self._composer = self._composer, None
        if composer is not None:
            await composer.aclose()
