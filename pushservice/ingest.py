"""
What a producer's item is: the one decision, made once by the node that moves
it from the list to the log, and written into the log so that no other node
parses it again. Pure; no Twisted, no Redis.

An item is exactly one of:

  - undeliverable (L{Undeliverable}, with the reason): not UTF-8; or it looks
    meant for an audience and is not a valid envelope;
  - an envelope (L{Entry} with its channel and user): a strict JSON object
    (see L{pushservice.strictjson}) with a ``content`` member, optional
    ``channel`` (a channel name) and ``user`` (1-255 bytes), each a string or
    null;
  - a broadcast of the item's text as a string (L{Entry} without audience).

"Looks meant for an audience" is decided on the text, never on whether it
parses: after an optional BOM and any Unicode whitespace, control, format,
combining, unassigned or blank characters, the first character is ``{``. Such an item is either a strict
JSON object or undeliverable; an object without ``content`` that names
``channel`` or ``user`` is undeliverable too; any other object is broadcast
verbatim. So no byte string can turn a message meant for one user or channel
into a broadcast: at worst it is dead-lettered.

Items over the size limit never get here: the move script dead-letters them
by their length alone, without reading them.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from .strictjson import JSONRules, StrictJSONError, dumps
from .wire import check_channel, check_name

__all__ = ["Entry", "IngestRules", "Undeliverable", "check_user", "looks_like_an_object"]

# characters skipped before deciding whether an item "looks like" an object: whitespace,
# controls, format characters, combining marks, private use, unassigned, and the letters
# and symbols that render as blanks (Hangul fillers, Khmer inherent vowels, Braille blank)
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"}
_BLANK = set("\u115f\u1160\u17b4\u17b5\u180e\u2800\u3164\uffa0")


@dataclass(frozen=True, slots=True)
class Entry:
    """A deliverable item: its content as canonical JSON, and its audience."""

    content: bytes
    channel: str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Undeliverable:
    """An item for the dead-letter list, and why (for the log line)."""

    reason: str


def check_user(user: object) -> str:
    """Return the user if it is one: a non-empty string of at most 255 bytes."""
    return check_name(user, "user")


def looks_like_an_object(text: str) -> bool:
    """Whether the first visible character of C{text} is ``{`` (whitespace, BOM and format characters skipped)."""
    for char in text:
        if char == "{":
            return True
        if not (char.isspace() or char in _BLANK or unicodedata.category(char) in _INVISIBLE):
            return False
    return False


class IngestRules:
    """Classifies producers' items with one set of JSON rules."""

    def __init__(self, json_rules: JSONRules, max_item_size: int = 2 * 1024 * 1024) -> None:
        self._json = json_rules
        # encoded content can outgrow its item: a raw control character becomes a 6-byte escape
        self._max_content = 6 * max_item_size + 2

    def check_content(self, content: bytes) -> bytes:
        """
        C{content} if it is what L{classify} writes: strict JSON, at most the
        size an item can encode to.

        @raise ValueError: saying why not.
        """
        if len(content) > self._max_content:
            raise ValueError(f"content is {len(content)} bytes, more than an item can hold")
        self._json.loads(content.decode("utf-8"))
        return content

    def classify(self, item: bytes) -> Entry | Undeliverable:
        """Decide what C{item} is. Total: every input gets an answer."""
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            return Undeliverable("item is not UTF-8 text")
        if not looks_like_an_object(text):
            return Entry(dumps(text))
        try:
            # RFC 8259 lets a parser ignore a BOM; anything else before the object is not JSON
            value = self._json.loads(text.removeprefix("\ufeff"))
        except StrictJSONError as e:
            return Undeliverable(f"item starts with '{{' but is not strict JSON: {e}")
        if not isinstance(value, dict):  # pragma: no cover - text that starts with "{" parses to an object
            return Undeliverable("item starts with '{' but is not a JSON object")
        if "content" not in value:
            if "channel" in value or "user" in value:
                return Undeliverable('an object that names "channel" or "user" needs "content"')
            return Entry(dumps(text))
        try:
            channel = value.get("channel")
            user = value.get("user")
            return Entry(
                dumps(value["content"]),
                None if channel is None else check_channel(channel),
                None if user is None else check_user(user),
            )
        except ValueError as e:
            return Undeliverable(f"envelope {e}")
