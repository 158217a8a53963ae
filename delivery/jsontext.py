"""
JSON text from encoders built once, for the hot paths that write JSON per message.

``json.dumps`` with any option but the defaults builds a new ``JSONEncoder`` per call,
and even a kept encoder's ``encode`` runs ``iterencode``'s Python set-up (a closure and
a lookup of the C accelerator) before the C code writes a byte. Under py-spy in
``bench/bench_trigger_storm.py`` that set-up alone was about 7% of the service's CPU:
the stored request messages, the outbox's trace carrier, the notification payload and
every log line each went through it.

:class:`JsonText` calls the C accelerator as ``JSONEncoder.encode`` does on its
one-shot path (``c_make_encoder`` with the encoder's own arguments, in
``iterencode``'s order), so the same C code writes the same text: 4.4 us against
1.3 us for a small payload (timeit). Without the accelerator it is ``encode`` itself.
The tests hold every encoder here to ``json.dumps`` with the same options.
"""

import json
from collections.abc import Callable
from json.encoder import (  # type: ignore[attr-defined]
    c_make_encoder,
    encode_basestring,
    encode_basestring_ascii,
)
from typing import Any


class JsonText:
    """
    ``json.dumps(value, ...)`` with the options fixed once.

    Args:
        separators: ``(item, key)`` separators; compact unless told.
        sort_keys: keys in sorted order (the stored, comparable form).
        ensure_ascii: ``\\uXXXX`` escapes for anything beyond ASCII, as ``json.dumps``
            does by default; ``False`` writes the characters themselves.
        default: called for a value JSON has no form for, as ``json.dumps``'s.
    """

    __slots__ = ("_arguments", "_encoder")

    def __init__(
        self,
        *,
        separators: tuple[str, str] = (",", ":"),
        sort_keys: bool = False,
        ensure_ascii: bool = True,
        default: Callable[[Any], Any] | None = None,
    ) -> None:
        self._encoder = json.JSONEncoder(
            separators=separators,
            sort_keys=sort_keys,
            ensure_ascii=ensure_ascii,
            default=default,
        )
        encoder = self._encoder
        # Read off the encoder itself, so the C path and ``encode`` cannot drift apart.
        self._arguments = (
            encoder.default,
            encode_basestring_ascii if encoder.ensure_ascii else encode_basestring,
            encoder.indent,
            encoder.key_separator,
            encoder.item_separator,
            encoder.sort_keys,
            encoder.skipkeys,
            encoder.allow_nan,
        )

    def __call__(self, value: Any) -> str:
        """The value as JSON text; ``ValueError`` for a value that contains itself."""
        if c_make_encoder is None:
            return self._encoder.encode(value)
        # A fresh markers dict per call, as ``iterencode`` makes: a value that contains
        # itself is a ValueError, not a RecursionError.
        return "".join(c_make_encoder({}, *self._arguments)(value, 0))


canonical = JsonText(sort_keys=True, ensure_ascii=False)
"""Sorted keys, characters as they are: the stored and echoed form of request JSON."""

sorted_ascii = JsonText(sort_keys=True)
"""Sorted keys, ``\\uXXXX`` escapes: a notification's stored payload, a trace carrier."""
