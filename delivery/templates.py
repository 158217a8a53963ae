"""
Message templates: an intent block in, a short message to the user out.

A project may store one template per ``check_type`` and source (schedule, wakeup,
trigger event, or any); every block without one gets a built-in default
(:data:`DEFAULTS`) that reads as the agent speaking to the user ("Hi! Just a
reminder: time to take your Ibuprofen (500mg)."), never as the instruction the
agent was given.

Templates are Jinja2 rendered in :class:`jinja2.sandbox.ImmutableSandboxedEnvironment`
with this policy, so a tenant's template can neither reach the process nor stall it:

- an undefined variable is an error (:class:`jinja2.StrictUndefined`); ``default``
  and ``is defined`` still work;
- autoescape is off: messages are plain text, escaped by whoever renders HTML;
- the source is at most :data:`MAX_SOURCE_CHARS`; ``set``, ``with``, macros,
  ``call`` blocks, includes, imports and inheritance are refused, and loops nest
  at most :data:`MAX_LOOP_DEPTH` deep, which bounds the work a template can ask for;
- only the filters of :data:`FILTERS` exist; every call, filter, attribute access
  and ``+ * ** %`` checks a deadline (:data:`RENDER_BUDGET_S`), refuses numbers
  above :data:`MAX_NUMBER` and values longer than :data:`MAX_VALUE_CHARS`;
  ``range`` is the only global and yields at most :data:`MAX_RANGE` items;
- the message is trimmed, must not be empty and is at most :data:`MAX_MESSAGE_CHARS`.

A template is checked when it is saved, by rendering it against sample blocks
(:func:`check_template`), so a broken one is refused then with the field named;
should a stored one still fail on a real block, the caller falls back to the
built-in default (:func:`render_or_default`).

Pure apart from a monotonic clock for the render deadline; no I/O.
"""

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import lru_cache, wraps
from typing import Any, Final, Protocol

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from delivery.domain import IntentBlock, InventoryItem, SourceKind
from delivery.errors import InvalidTemplateError

MAX_SOURCE_CHARS: Final = 4000
MAX_MESSAGE_CHARS: Final = 2000
MAX_VALUE_CHARS: Final = 8000
"""Longest string or list any step of a render may produce (bounds memory, not the message)."""
MAX_NUMBER: Final = 10_000
"""Largest number a call, filter or ``*`` / ``**`` may take or make (``'x' * 10**9``)."""
MAX_RANGE: Final = 1000
MAX_LOOP_DEPTH: Final = 2
RENDER_BUDGET_S: Final = 0.05
"""A render measured at ~20 µs; 50 ms is far above any honest template."""

ANY_SOURCE: Final = "any"
"""A template's ``source`` when it applies to schedules, wakeups and trigger events alike."""
ANY_CHECK_TYPE: Final = "*"
"""A template's ``check_type`` when it applies to every check type of its source."""


class Composed(StrEnum):
    """
    How a notification's message was made (the notification's ``composer``).

    ``DEFAULT_FALLBACK``: the project's template failed on this block, so the
    built-in default was used. ``TEMPLATE_FALLBACK``: the LLM failed for the
    whole retry budget, so the project's template (or the default) was used.
    """

    TEMPLATE = "template"
    DEFAULT = "default"
    LLM = "llm"
    TEMPLATE_FALLBACK = "template_fallback"
    DEFAULT_FALLBACK = "default_fallback"


VARIABLES: Final[Mapping[str, str]] = {
    "source": "schedule, wakeup or event",
    "check_type": "the check type (for an event, its event_type)",
    "intent": "the intent as given (for an event, its event_description)",
    "intent_for_user": "the intent with the user addressed as 'you' (heuristic, English)",
    "task": "what 'remind the user to ...' asks, addressed to the user; '' otherwise",
    "item": "the live inventory item {label, properties, dose, summary}, or none",
    "metadata": "the metadata (or event metadata) as strings",
    "local_time": "the fire time in the user's zone (UTC for wakeups and events), ISO 8601",
    "local_date": "YYYY-MM-DD of local_time",
    "local_clock": "HH:MM of local_time",
    "weekday": "Monday .. Sunday of local_time",
    "time_of_day": "morning, afternoon, evening or night of local_time",
    "occasion": "the wakeup's occasion, or ''",
    "interest_topic": "the wakeup's interest_topic, or ''",
    "event_description": "the wakeup's or event's description, or ''",
    "event_type": "the trigger event's type, or ''",
    "language": "the trigger event's language when not en, or ''",
}
"""What a template may use; anything else is an undefined variable."""

_DOSE_KEYS: Final = ("dosage", "dose", "amount", "quantity")

# --- addressing the user ---------------------------------------------------------------

_PRONOUNS: Final[Mapping[str, str]] = {
    "the user's": "your",
    "user's": "your",
    "the user is": "you are",
    "the user was": "you were",
    "the user has": "you have",
    "the user": "you",
    "themselves": "yourself",
    "theirs": "yours",
    "their": "your",
    "they are": "you are",
    "they're": "you're",
    "they have": "you have",
    "they": "you",
    "them": "you",
}
# One alternation, longest phrases first, so a block costs one pass, not one per phrase.
_PRONOUN_RE: Final = re.compile(
    r"\b(" + "|".join(re.escape(p) for p in sorted(_PRONOUNS, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)
_REMIND_TO: Final = re.compile(
    r"^\s*(?:please\s+)?remind\s+(?:the\s+user|the\s+customer|user|them)\s+to\s+(.+?)[\s.!]*$",
    re.IGNORECASE | re.DOTALL,
)


@lru_cache(maxsize=8192)
def for_user(text: str) -> str:
    """``text`` with "the user" / "their" / "them" turned to "you" / "your" (English only)."""
    return _PRONOUN_RE.sub(lambda m: _PRONOUNS[m.group(1).lower()], text).strip()


@lru_cache(maxsize=8192)
def task_of(intent: str) -> str:
    """What "remind the user to X" asks (X, addressed to the user), or ``""``."""
    match = _REMIND_TO.match(intent)
    return for_user(match.group(1)) if match else ""


# --- the variables a block gives -------------------------------------------------------


def _item(item: InventoryItem | None) -> dict[str, Any] | None:
    if item is None:
        return None
    props = dict(item.properties)
    dose = next((str(props[k]) for k in _DOSE_KEYS if props.get(k) not in (None, "")), "")
    label = item.label or "item"
    return {
        "label": label,
        "properties": props,
        "dose": dose,
        "summary": f"{label} ({dose})" if dose else label,
    }


def _time_of_day(hour: int) -> str:
    if 5 <= hour < 12:
        return "morning"
    if 12 <= hour < 18:
        return "afternoon"
    if 18 <= hour < 22:
        return "evening"
    return "night"


def _local(text: str) -> Mapping[str, str]:
    """
    The local date, clock, weekday and time of day of an instant's own wall time
    (empty strings when the text is not an instant).

    A fraction of a second changes none of them, and an event's instant has one: it is
    dropped before the memo, so the messages of a burst of events share one entry per
    second instead of each missing it (the parse and two ``strftime`` were ~1% of a
    trigger-event storm's busy samples).
    """
    if len(text) > 20 and text[19] == ".":
        end = 20
        while end < len(text) and text[end].isdigit():
            end += 1
        text = text[:19] + text[end:]
    return _local_of(text)


@lru_cache(maxsize=8192)
def _local_of(text: str) -> Mapping[str, str]:
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return {"local_date": "", "local_clock": "", "weekday": "", "time_of_day": ""}
    return {
        "local_date": at.date().isoformat(),
        "local_clock": at.strftime("%H:%M"),
        "weekday": at.strftime("%A"),
        "time_of_day": _time_of_day(at.hour),
    }


_DETAILS: Final = {
    "Occasion": "occasion",
    "Interest topic": "interest_topic",
    "Event description": "event_description",
    "What happened": "event_description",
    "Event type": "event_type",
    "Reply in language": "language",
}


def variables(block: IntentBlock) -> dict[str, Any]:
    """Every variable of :data:`VARIABLES` for ``block``."""
    out: dict[str, Any] = {
        "source": block.kind.value,
        "check_type": block.check_type,
        "intent": block.intent,
        "intent_for_user": for_user(block.intent),
        "task": task_of(block.intent),
        "item": _item(block.item),
        "metadata": dict(block.context),
        "local_time": block.fire_at_local,
        **_local(block.fire_at_local),
        **dict.fromkeys(set(_DETAILS.values()), ""),
    }
    for label, value in block.details:
        if label in _DETAILS:
            out[_DETAILS[label]] = value
    return out


# --- the sandbox -----------------------------------------------------------------------

_deadline: ContextVar[float] = ContextVar("template_deadline", default=float("inf"))


class RenderLimitError(SecurityError):
    """A render asked for more than the limits allow (time, size, numbers)."""


def _check_value(value: Any) -> Any:
    if time.monotonic() > _deadline.get():
        raise RenderLimitError(f"the template took longer than {RENDER_BUDGET_S * 1000:.0f} ms")
    if isinstance(value, str | list | tuple | dict) and len(value) > MAX_VALUE_CHARS:
        raise RenderLimitError(f"a value grew past {MAX_VALUE_CHARS} characters or items")
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > 1e15:
        raise RenderLimitError("a number grew too large")
    return value


def _check_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and abs(value) > MAX_NUMBER:
            raise RenderLimitError(f"a number argument above {MAX_NUMBER} is refused")
        _check_value(value)


def _bounded(func: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(func)  # keeps jinja_pass_arg, so Jinja still passes the environment or context
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        return _check_value(func(*args, **kwargs))

    return bounded


def _range(*args: int) -> range:
    values = range(*args)
    if len(values) > MAX_RANGE:
        raise RenderLimitError(f"range() may yield at most {MAX_RANGE} items")
    return values


FILTERS: Final = [
    "abs",
    "capitalize",
    "count",
    "d",
    "default",
    "dictsort",
    "first",
    "float",
    "int",
    "items",
    "join",
    "last",
    "length",
    "list",
    "lower",
    "max",
    "min",
    "replace",
    "round",
    "sort",
    "string",
    "sum",
    "title",
    "trim",
    "truncate",
    "unique",
    "upper",
    "wordcount",
]
"""The filters a template may use; the rest (``format``, ``center``, ``indent`` ...) are absent."""

_REFUSED_NODES: Final[Mapping[type[nodes.Node], str]] = {
    nodes.Assign: "set",
    nodes.AssignBlock: "set",
    nodes.With: "with",
    nodes.Macro: "macro",
    nodes.CallBlock: "call",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from ... import",
    nodes.Extends: "extends",
    nodes.Block: "block",
}


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with the deadline and size checks at every call, operator and attribute."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        return _check_value(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_value(None)
        if operator == "%" and isinstance(left, str):
            raise SecurityError("'%' formatting is not available: join with '~' instead")
        if operator in ("*", "**"):
            _check_args((left, right), {})
        return _check_value(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        if time.monotonic() > _deadline.get():
            _check_value(None)
        return super().getattr(obj, attribute)

    def wrap_str_format(self, value: Any) -> None:
        # str.format pads and reaches attributes through its own mini-language, past
        # the checks above; templates join with '~' instead.
        return None

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in ("format", "format_map"):
            return False
        return bool(super().is_safe_attribute(obj, attr, value))


def _environment() -> _Sandbox:
    env = _Sandbox(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        auto_reload=False,
        cache_size=0,
    )
    env.filters = {name: _bounded(env.filters[name]) for name in FILTERS}
    env.globals = {"range": _range}
    return env


_ENV: Final = _environment()


def _walk_checks(tree: nodes.Template) -> None:
    for node in tree.find_all(tuple(_REFUSED_NODES)):
        raise TemplateSyntaxError(
            f"'{_REFUSED_NODES[type(node)]}' is not available in message templates", node.lineno
        )

    def depth(node: nodes.Node, level: int) -> int:
        here = level + isinstance(node, nodes.For)
        return max([here, *(depth(child, here) for child in node.iter_child_nodes())])

    if depth(tree, 0) > MAX_LOOP_DEPTH:
        raise TemplateSyntaxError(f"loops may nest at most {MAX_LOOP_DEPTH} deep", 1)


@dataclass(frozen=True, slots=True)
class MessageTemplate:
    """A compiled template; :func:`compile_template` makes one."""

    source: str
    _template: Any

    def render(self, block: IntentBlock) -> str:
        """
        The message for ``block``.

        Raises:
            jinja2.TemplateError: undefined variable, forbidden access, a limit
                passed, an empty or too long message.
        """
        return _render(self._template, variables(block))


def _render(template: Any, values: Mapping[str, Any]) -> str:
    deadline = time.monotonic() + RENDER_BUDGET_S
    token = _deadline.set(deadline)
    try:
        parts: list[str] = []
        size = 0
        chunks: Iterator[str] = template.root_render_func(template.new_context(values))
        for chunk in chunks:
            size += len(chunk)
            if size > 4 * MAX_MESSAGE_CHARS:
                raise RenderLimitError(f"the message is longer than {MAX_MESSAGE_CHARS} characters")
            if time.monotonic() > deadline:
                _check_value(None)
            parts.append(chunk)
    finally:
        _deadline.reset(token)
    message = " ".join("".join(parts).split())
    if not message:
        raise TemplateError("the template renders an empty message")
    if len(message) > MAX_MESSAGE_CHARS:
        raise TemplateError(f"the message is longer than {MAX_MESSAGE_CHARS} characters")
    return message


@lru_cache(maxsize=4096)
def _compile(source: str) -> Any:
    if len(source) > MAX_SOURCE_CHARS:
        raise TemplateSyntaxError(f"the template is longer than {MAX_SOURCE_CHARS} characters", 1)
    tree = _ENV.parse(source)
    _walk_checks(tree)
    template = _ENV.from_string(tree)
    # A plain dict: Jinja's ChainMap of globals costs more to copy per render than
    # the rest of a short template's render.
    template.globals = dict(template.globals)
    return template


def compile_template(source: str) -> MessageTemplate:
    """
    Compile ``source`` under the policy above; cached by source text.

    Raises:
        jinja2.TemplateSyntaxError: bad syntax, a refused tag, too long, loops too deep.
    """
    return MessageTemplate(source, _compile(source))


def describe(exc: Exception) -> str:
    """One line saying what is wrong with a template, for an error message or a log."""
    if isinstance(exc, TemplateSyntaxError):
        return f"line {exc.lineno}: {exc.message}"
    if isinstance(exc, TemplateError):
        return exc.message or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


# --- samples: what a template is checked against when it is saved ----------------------

SAMPLE_ITEM: Final = InventoryItem(
    label="Ibuprofen", properties={"dosage": "500mg", "frequency": "twice daily"}
)


def sample_block(kind: SourceKind, check_type: str) -> IntentBlock:
    """A representative block of ``kind``: the values a fire carries, all present."""
    if kind is SourceKind.EVENT:
        return IntentBlock(
            kind=kind,
            text="",
            intent="The user just reached level 25",
            check_type=check_type,
            fire_at_local="2026-05-02T09:00:00Z",
            context=(("new_level", "25"),),
            details=(
                ("Event type", check_type),
                ("What happened", "The user just reached level 25"),
                ("Event time (UTC)", "2026-05-02T09:00:00Z"),
            ),
        )
    details: tuple[tuple[str, str], ...] = ()
    if kind is SourceKind.WAKEUP:
        details = (
            ("Occasion", "Sarah's 30th birthday"),
            ("Interest topic", "hiking"),
            ("Event description", "the job interview on Tuesday"),
        )
    return IntentBlock(
        kind=kind,
        text="",
        intent="Remind the user to take their ibuprofen at the correct dose",
        check_type=check_type,
        fire_at_local="2026-05-02T09:00:00+08:00"
        if kind is SourceKind.SCHEDULE
        else "2026-05-02T01:00:00Z",
        item=SAMPLE_ITEM,
        context=(("campaign", "daily_v2"),),
        details=details,
    )


def kinds_of(source: str) -> tuple[SourceKind, ...]:
    """The source kinds a template's ``source`` applies to."""
    return tuple(SourceKind) if source == ANY_SOURCE else (SourceKind(source),)


def check_template(
    source: str,
    *,
    check_type: str,
    kinds: tuple[SourceKind, ...],
    blocks: Sequence[IntentBlock] | None = None,
    field: str = "body",
) -> MessageTemplate:
    """
    Compile ``source`` and render it against ``blocks``, by default the sample
    block of every kind.

    Raises:
        InvalidTemplateError: naming ``field``: what is wrong, and for which block.
    """
    try:
        template = compile_template(source)
    except TemplateError as exc:
        raise InvalidTemplateError(
            field, f"{field} is not a valid template: {describe(exc)}"
        ) from None
    sample = check_type if check_type != ANY_CHECK_TYPE else "reminder"
    for block in blocks if blocks is not None else [sample_block(k, sample) for k in kinds]:
        try:
            template.render(block)
        except (TemplateError, ArithmeticError, ValueError, TypeError, LookupError) as exc:
            raise InvalidTemplateError(
                field, f"{field} fails on a sample {block.kind.value} block: {describe(exc)}"
            ) from None
    return template


# --- built-in defaults -----------------------------------------------------------------

_REMINDER = (
    "{% if task %}Hi! Just a reminder: time to {{ task }}"
    "{% if item and item.dose %} ({{ item.dose }}){% endif %}."
    "{% elif item %}Hi! Just a reminder about your {{ item.summary }}."
    "{% elif occasion %}Hi! Just a reminder: {{ occasion }}."
    "{% else %}Hi! Just a friendly reminder from me. Anything I can help with?{% endif %}"
)
_MEDICATION = (
    "{% if item %}Hi! Just a reminder: time to take your {{ item.summary }}."
    "{% elif task %}Hi! Just a reminder: time to {{ task }}."
    "{% else %}Hi! Just a reminder: time to take your medication.{% endif %}"
)
_CHECK_IN = (
    "{% if intent_for_user.lower().startswith('check in on ') %}"
    "Hi! Just checking in on {{ intent_for_user[12:] }}."
    "{% else %}Hi! Just checking in. How are you doing today?{% endif %}"
)
_BIRTHDAY = (
    "{% if occasion %}Hi! Just a reminder: it's {{ occasion }}."
    "{% else %}Happy birthday! Wishing you a wonderful day.{% endif %}"
)
_FOLLOW_UP = (
    "{% if event_description %}Hi! How did {{ event_description }} go?"
    "{% elif interest_topic %}Hi! How is {{ interest_topic }} going?"
    "{% else %}Hi! Just following up. How did it go?{% endif %}"
)
_INTEREST = (
    "{% if interest_topic %}Hi! I was just thinking about {{ interest_topic }}. "
    "How is that going?{% else %}Hi! I was just thinking of you. What are you up to?{% endif %}"
)
_HABIT = (
    "{% if task %}Hi! A little nudge to keep your streak going: time to {{ task }}."
    "{% else %}Hi! A little nudge to keep your streak going today.{% endif %}"
)
_APPOINTMENT = (
    "{% if item %}Hi! Just a reminder about your {{ item.label }} appointment."
    "{% elif task %}Hi! Just a reminder about your appointment: time to {{ task }}."
    "{% else %}Hi! Just a reminder about your appointment.{% endif %}"
)
_EVENT = (
    "{% if intent_for_user %}Hi! Just saw this: {{ intent_for_user[:1].lower() }}"
    "{{ intent_for_user[1:] }}{% if intent_for_user[-1:] not in '.!?' %}.{% endif %}"
    "{% else %}Hi! Something just happened that I wanted to tell you about.{% endif %}"
)
_LEVEL_UP = (
    "Congratulations! {% if intent_for_user %}{{ intent_for_user[:1].upper() }}"
    "{{ intent_for_user[1:] }}{% if intent_for_user[-1:] not in '.!?' %}!{% endif %}"
    "{% else %}You just levelled up!{% endif %}"
)

_BY_CHECK_TYPE: Final[Mapping[str, str]] = {
    "reminder": _REMINDER,
    "medication": _MEDICATION,
    "medicine": _MEDICATION,
    "medication_reminder": _MEDICATION,
    "check_in": _CHECK_IN,
    "checkin": _CHECK_IN,
    "daily_checkin": _CHECK_IN,
    "daily_check_in": _CHECK_IN,
    "birthday": _BIRTHDAY,
    "follow_up": _FOLLOW_UP,
    "followup": _FOLLOW_UP,
    "event_followup": _FOLLOW_UP,
    "interest": _INTEREST,
    "interest_check": _INTEREST,
    "habit": _HABIT,
    "appointment": _APPOINTMENT,
    "appointment_reminder": _APPOINTMENT,
    "level_up": _LEVEL_UP,
}

DEFAULTS: Final[Mapping[tuple[str, str], str]] = {
    **{(check_type, ANY_SOURCE): body for check_type, body in _BY_CHECK_TYPE.items()},
    (ANY_CHECK_TYPE, SourceKind.SCHEDULE.value): _REMINDER,
    (ANY_CHECK_TYPE, SourceKind.WAKEUP.value): _REMINDER,
    (ANY_CHECK_TYPE, SourceKind.EVENT.value): _EVENT,
}
"""The built-in template per (check_type, source); ``*`` and ``any`` match every one."""


def candidates(check_type: str, kind: SourceKind) -> tuple[tuple[str, str], ...]:
    """The (check_type, source) keys that apply to a block, most specific first."""
    return (
        (check_type, kind.value),
        (check_type, ANY_SOURCE),
        (ANY_CHECK_TYPE, kind.value),
        (ANY_CHECK_TYPE, ANY_SOURCE),
    )


def default_template(block: IntentBlock) -> MessageTemplate:
    """The built-in template for ``block``."""
    return _default_for(block.check_type, block.kind)


@lru_cache(maxsize=4096)
def _default_for(check_type: str, kind: SourceKind) -> MessageTemplate:
    for key in candidates(check_type.lower(), kind):
        if key in DEFAULTS:
            return compile_template(DEFAULTS[key])
    return compile_template(DEFAULTS[(ANY_CHECK_TYPE, kind.value)])


def default_message(block: IntentBlock) -> str:
    """
    The built-in message for ``block``; never raises, never empty.

    A default that fails on an unusual block (it should not) gives a plain greeting.
    """
    try:
        return default_template(block).render(block)
    except Exception:  # the last resort must not fail
        return "Hi! Just checking in."


class Renderer(Protocol):
    """A template as a project's book holds it (:class:`MessageTemplate`, or a stand-in)."""

    @property
    def source(self) -> str: ...

    def render(self, block: IntentBlock) -> str: ...


type TemplateBook = Mapping[tuple[str, str], Renderer]
"""A project's templates by (check_type, source)."""


class BrokenTemplate:
    """A stored template that no longer compiles: each render fails, so the default stands in."""

    def __init__(self, source: str, error: str) -> None:
        self.source = source
        self._error = error

    def render(self, block: IntentBlock) -> str:
        raise TemplateError(self._error)


def book_of(rows: Iterable[Mapping[Any, Any]]) -> dict[tuple[str, str], Renderer]:
    """
    A project's book from its stored rows (``check_type``, ``source``, ``body``).

    A body that no longer compiles (checked when saved; the policy may have tightened
    since) becomes a :class:`BrokenTemplate` rather than an error: fires must not fail.
    """
    book: dict[tuple[str, str], Renderer] = {}
    for row in rows:
        try:
            book[(row["check_type"], row["source"])] = compile_template(row["body"])
        except TemplateError as exc:
            book[(row["check_type"], row["source"])] = BrokenTemplate(row["body"], describe(exc))
    return book


def render_or_default(book: TemplateBook, block: IntentBlock) -> tuple[str, Composed, str | None]:
    """
    The message from the project's most specific template, else the built-in default.

    Returns:
        ``(message, how, error)``: ``how`` is ``TEMPLATE`` or ``DEFAULT``, or
        ``DEFAULT_FALLBACK`` with the render error when the project's template failed.
    """
    for key in candidates(block.check_type, block.kind):
        template = book.get(key)
        if template is None:
            continue
        try:
            return template.render(block), Composed.TEMPLATE, None
        except Exception as exc:  # a stored template never fails a fire: the default stands in
            return default_message(block), Composed.DEFAULT_FALLBACK, describe(exc)
    return default_message(block), Composed.DEFAULT, None
