"""
Log entries to messages: the pure decoder the tailer and the history load
share. Pure; no Twisted, no Redis.

An entry written by step.lua holds ``s`` (its sequence number), ``c`` (the
content, JSON already checked and encoded by the node that moved it), and
``ch`` / ``u`` when it is for a channel / a user. The frame is a join of
those bytes, but they are checked again first (strict JSON, a bounded size,
a valid audience): whoever can write to Redis can write to the log directly,
and no entry may put a frame on the wire that a browser cannot parse.
Entries written by pushservice 0.1 (``k`` and ``d``, the item as pushed) are
decided here with the same rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .ingest import Entry, IngestRules, Undeliverable, check_user
from .strictjson import dumps
from .wire import Offset, check_channel, format_offset, message_payload, parse_offset

__all__ = ["BadEntry", "Message", "decode_entry", "gap_message"]


@dataclass(frozen=True, slots=True)
class Message:
    """One entry of the ordered log, framed once for every receiver."""

    offset: Offset
    channel: str | None
    user: str | None
    frame: bytes
    #: The log's contiguous sequence number (None for entries written before it existed, and for markers).
    seq: int | None = None
    #: A marker: this node found entries missing before this point. It reaches every connection.
    gap: bool = False
    #: Its frame for connections that negotiated permessage-deflate, once one needed it (pushservice.deflate).
    deflated: bytes | None = field(default=None, compare=False, repr=False)


class BadEntry(Exception):
    """A log entry that cannot be delivered; skipped with a log line and a metric."""

    def __init__(self, reason: str, seq: int | None = None) -> None:
        super().__init__(reason)
        #: Its sequence number, where it had a readable one (the entry still counts for gap detection).
        self.seq = seq


def decode_entry(entry_id: bytes, fields: list[bytes], framer: Callable[[bytes], bytes], rules: IngestRules) -> Message:
    """
    The message an entry holds.

    @raise BadEntry: for an entry that is not one pushservice wrote, or an
        old-format item the rules refuse.
    """
    seq: int | None = None
    try:
        values = dict(zip(fields[::2], fields[1::2]))
        seq = int(values[b"s"]) if b"s" in values else None
        offset = parse_offset(entry_id.decode("ascii"))
        if b"c" in values:
            content = rules.check_content(values[b"c"])
            channel = check_channel(values[b"ch"].decode("utf-8")) if b"ch" in values else None
            user = check_user(values[b"u"].decode("utf-8")) if b"u" in values else None
        elif b"d" in values:
            decided = rules.classify(values[b"d"])
            if isinstance(decided, Undeliverable):
                raise BadEntry(decided.reason, seq)
            assert isinstance(decided, Entry)
            content, channel, user = decided.content, decided.channel, decided.user
        else:
            raise BadEntry("not an entry pushservice wrote (no content)", seq)
    except BadEntry:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadEntry(f"malformed entry: {e}", seq) from None
    return Message(offset, channel, user, framer(message_payload(content, channel, entry_id)), seq)


def gap_message(offset: Offset, reason: str, missed: int | None, framer: Callable[[bytes], bytes]) -> Message:
    """
    The marker put before the first message after a gap: a ``gap`` frame for
    every connection, at C{offset} (that first message's).
    """
    frame = dumps({"type": "gap", "reason": reason, "missed": missed, "offset": format_offset(offset)})
    return Message(offset, None, None, framer(frame), None, gap=True)
