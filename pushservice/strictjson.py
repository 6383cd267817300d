"""
Strict JSON: the one parser for producers' items and clients' frames, and the
one encoder for everything the server sends. Pure; no Twisted.

The rules are explicit and do not depend on the Python version:

  - RFC 8259 only: no NaN/Infinity, no raw control characters in strings, no
    leading zeros, no trailing bytes, JSON whitespace only around the value;
  - no number longer than C{max_number} characters, and none that is not
    finite as a double (``1e999`` is refused, not turned into Infinity);
  - at most C{max_depth} levels of nested arrays/objects, counted on the text
    before the parser recurses (Python's own limit depends on the version and
    the stack depth at the call; this one does not);
  - object member names are unique (a second ``"user"`` cannot change who a
    message is for);
  - strings hold Unicode scalar values: an unpaired ``\\ud800`` escape is
    refused, since it has no UTF-8 form (Redis' cjson and many browsers'
    consumers would each treat it differently).

L{dumps} writes compact UTF-8 with C{allow_nan=False}, so every frame parses
with a browser's ``JSON.parse``.
"""

from __future__ import annotations

import json
import math
import operator
import re
from itertools import accumulate, repeat
from typing import Any

__all__ = ["JSONRules", "StrictJSONError", "dumps", "nesting_exceeds"]


class StrictJSONError(ValueError):
    """Text that is not JSON by these rules; the message says which rule."""


# an escaped UTF-16 surrogate: the text is checked further only when it holds one
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"()", b"\x02\x00")


def nesting_exceeds(text: str, max_depth: int) -> bool:
    """
    Whether C{text} nests arrays/objects deeper than C{max_depth}; brackets
    inside strings do not count, unbalanced ones that open deeper do (such
    text is not JSON anyway). Linear and at C speed: nothing for text with
    few brackets, about 80 ns per bracket in the worst case.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False  # cannot nest deeper than it has brackets
    # outside the strings: drop escaped backslashes and quotes, then every other part is outside
    outside = "".join(text.replace("\\\\", "").replace('\\"', "").split('"')[::2])
    brackets = outside.encode("utf-8", "surrogatepass").translate(_PARENS, _NOT_BRACKETS)
    removed = 0
    for _ in range(2):  # the leaves first: most real JSON is flat once they are gone
        shorter = brackets.replace(b"()", b"")  # one level less everywhere
        if len(shorter) == len(brackets):
            break
        brackets, removed = shorter, removed + 1
    if brackets.count(b"(") + removed <= max_depth:
        return False
    if b"(" * (max_depth + 1 - removed) in brackets:
        return True  # a plain run of opening brackets: the usual attack, found at once
    steps = brackets.translate(_STEPS)  # "(" -> 2, ")" -> 0; minus 1 below
    return max(accumulate(map(operator.sub, steps, repeat(1)))) + removed > max_depth


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJSONError(f"member {key[:40]!r} appears twice in one object")
            seen.add(key)
    return obj


class JSONRules:
    """A strict parser with its two limits: nesting depth and number length."""

    def __init__(self, max_depth: int = 64, max_number: int = 100) -> None:
        self.max_depth = max_depth
        self.max_number = max_number

        def parse_int(token: str) -> int:
            if len(token) > max_number:
                raise StrictJSONError(f"a number is longer than {max_number} characters")
            return int(token)

        def parse_float(token: str) -> float:
            if len(token) > max_number:
                raise StrictJSONError(f"a number is longer than {max_number} characters")
            value = float(token)
            if not math.isfinite(value):
                raise StrictJSONError(f"{token[:20]} is too large for a double")
            return value

        self._decoder = json.JSONDecoder(
            parse_int=parse_int,
            parse_float=parse_float,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_members,
            strict=True,  # raw control characters inside strings are errors
        )

    def loads(self, text: str) -> Any:
        """
        Parse one JSON text.

        @raise StrictJSONError: with the rule it broke.
        """
        if nesting_exceeds(text, self.max_depth):
            raise StrictJSONError(f"nested deeper than {self.max_depth} levels")
        try:
            # decode() allows JSON whitespace around the value, then refuses extra data
            value = self._decoder.decode(text)
        except StrictJSONError:
            raise
        except (ValueError, RecursionError) as e:
            raise StrictJSONError(str(e).split(":")[0] if isinstance(e, ValueError) else "nested too deep") from None
        if _SURROGATE_ESCAPE.search(text):
            try:
                dumps(value)
            except ValueError as e:
                raise StrictJSONError(str(e)) from None
        return value


def dumps(value: Any) -> bytes:
    """
    Compact UTF-8 JSON for the wire.

    @raise ValueError: for a non-finite float or a string holding a lone
        surrogate (neither comes out of L{JSONRules.loads}).
    """
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds a lone surrogate (an unpaired \\ud800-\\udfff escape)") from None
