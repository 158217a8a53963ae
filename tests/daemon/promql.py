"""
Just enough of PromQL to name the metrics an expression reads.

A tokenizer, not a full parser: it checks that brackets balance and strings close
(Grafana's ``$variables`` are read as durations),
drops label matchers, ranges and grouping clauses, and returns every identifier that
is not a function, an aggregation, a keyword or a number.
"""

import re

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\w+|\$\{\w+\})
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+\b)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=,(){}\[\]@])
    """,
    re.VERBOSE,
)
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan", "atan2"}
)
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_PAIRS = {")": "(", "}": "{", "]": "["}


class PromQLError(ValueError):
    """The expression does not tokenize, or its brackets do not balance."""


def tokens(expr: str) -> list[tuple[str, str]]:
    """``(kind, text)`` per token, spaces dropped."""
    found: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise PromQLError(f"cannot read {expr[at:]!r} in {expr!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            found.append((kind, match.group()))
        at = match.end()
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects."""
    toks = tokens(expr)
    stack: list[str] = []
    names: set[str] = set()
    skip_group = False
    for index, (kind, text) in enumerate(toks):
        nxt = toks[index + 1][1] if index + 1 < len(toks) else ""
        if kind == "op" and text in "({[":
            stack.append(text)
            continue
        if kind == "op" and text in ")}]":
            if not stack or stack.pop() != _PAIRS[text]:
                raise PromQLError(f"unbalanced {text!r} in {expr!r}")
            if text == ")":
                skip_group = False
            continue
        if kind != "ident" or "{" in stack or "[" in stack or skip_group:
            continue
        if text in GROUPING and nxt == "(":
            skip_group = True  # the label list that follows
            continue
        if nxt == "(" or nxt in GROUPING or text in KEYWORDS:
            continue  # a function, an aggregation (maybe before its grouping), a keyword
        names.add(text)
    if stack:
        raise PromQLError(f"unclosed {stack[-1]!r} in {expr!r}")
    return names
