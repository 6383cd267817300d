"""
The wire protocol between pushservice and its WebSocket clients: pure
parsing, validation and encoding, no Twisted.

Client to server (JSON text frames):
    {"type":"message","content":<any>,"channel"?:str,"id"?:str|int}
    {"type":"subscribe","channel":str,"since"?:"<offset>","presence"?:bool,"id"?:...}
    {"type":"unsubscribe","channel":str,"id"?:...}
    {"type":"auth","token":str,"id"?:...}
    {"type":"presence","channel":str,"id"?:...}
Server to client:
    {"type":"message","content":<any>,"channel":str|null,"offset":"<ms>-<seq>"}
    {"type":"ack","id":...}
    {"type":"subscribed","channel":str,"id"?:...,"recovered"?:bool}
    {"type":"unsubscribed","channel":str,"id"?:...}
    {"type":"resumed","since":"<offset>","recovered":bool}     the connect query's since
    {"type":"gap","reason":"trimmed"|"reset","missed":int|null,"offset":"<next>"}
    {"type":"error","id"?:...,"code":str,"message":str}
    {"type":"presence","channel":str,"users":[str],"user_count":int,"anonymous":int,"id"?:...,"truncated"?:true}
    {"type":"join"|"leave","channel":str,"user":str}             presence events (subscribe with presence)

A frame is checked in this order, each step bounding the cost of the next:
its size (C{too_large}, unparsed), then its nesting depth and number sizes
(strict JSON, see L{pushservice.strictjson}), then its fields. A frame that is
not parsed (too large, rate limited) has its id echoed only when ``id`` is its
first member, which the browser client always does.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from .strictjson import JSONRules, StrictJSONError, dumps

__all__ = [
    "Auth",
    "Offset",
    "PresenceQuery",
    "Publish",
    "Request",
    "Subscribe",
    "Unsubscribe",
    "WireError",
    "check_channel",
    "check_name",
    "encode",
    "envelope",
    "error_frame",
    "format_offset",
    "leading_id",
    "message_payload",
    "parse_offset",
    "parse_request",
    "reply_frame",
    "text_frame",
]

MAX_CHANNEL = 255
MAX_ID = 128

Offset = tuple[int, int]
"""A log offset, ``"<ms>-<seq>"`` on the wire (a Redis stream ID), ordered as a tuple."""

RequestId = str | int | None


class WireError(Exception):
    """A client frame that cannot be served; becomes an ``error`` frame."""

    def __init__(self, code: str, message: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Publish:
    """A client's message to LPUSH (a broadcast when C{channel} is None)."""

    id: RequestId
    content: Any
    channel: str | None


@dataclass(frozen=True)
class Subscribe:
    """A subscription, with the offset to replay after, if any."""

    id: RequestId
    channel: str
    since: Offset | None
    presence: bool = False  # join/leave events too


@dataclass(frozen=True)
class Unsubscribe:
    """An end to a subscription."""

    id: RequestId
    channel: str


@dataclass(frozen=True)
class Auth:
    """A token, sent in a frame."""

    id: RequestId
    token: str


@dataclass(frozen=True)
class PresenceQuery:
    """Who is on a channel now."""

    id: RequestId
    channel: str


Request = Publish | Subscribe | Unsubscribe | Auth | PresenceQuery


_OFFSET = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")


def parse_offset(text: object) -> Offset:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; a bare ``"17"`` means ``(17, 0)``."""
    if not isinstance(text, str):
        raise ValueError('an offset is a string like "1700000000000-0"')
    match = _OFFSET.fullmatch(text)
    if match is None:
        raise ValueError(f'bad offset {text[:50]!r}: expected "<ms>-<seq>"')
    return int(match.group(1)), int(match.group(2) or 0)


def format_offset(offset: Offset) -> str:
    return f"{offset[0]}-{offset[1]}"


_GLOB = re.compile(r"[*?\[\]]")


def check_name(value: object, what: str) -> str:
    """C{value} if it is a non-empty string of valid Unicode, at most 255 UTF-8 bytes; else ValueError naming C{what}."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode (no lone surrogates)") from None
    if size > MAX_CHANNEL:
        raise ValueError(f"{what} is at most {MAX_CHANNEL} bytes")
    return value


def check_channel(channel: object) -> str:
    """
    Return the channel name if it is one: a non-empty string of at most 255
    bytes without ``*?[]`` (those are for the grant patterns in tokens).
    """
    channel = check_name(channel, "channel")
    if _GLOB.search(channel):
        raise ValueError("channel names may not contain * ? [ or ]")
    return channel


def _request_id(frame: dict[str, Any]) -> RequestId:
    rid = frame.get("id")
    if rid is None:
        return None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise WireError("bad_request", "id must be a string or an integer")
    if isinstance(rid, str) and len(rid) > MAX_ID:
        raise WireError("bad_request", f"id is at most {MAX_ID} characters")
    if isinstance(rid, int) and abs(rid) > 2**53:
        raise WireError("bad_request", "id must fit in a JavaScript number")
    return rid


# "id" as the first member of the frame: read without parsing the rest
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*(-?(?:0|[1-9][0-9]{0,15})|"(?:[^"\\\x00-\x1f]|\\.){1,128}")\s*[,}]')


def leading_id(payload: bytes) -> RequestId:
    """The id of a frame that is not parsed (too large, rate limited), if it is the first member."""
    match = _LEADING_ID.match(payload)
    if match is None:
        return None
    try:
        rid = json.loads(match.group(1))
        return _request_id({"id": rid})
    except (ValueError, WireError):
        return None


def parse_request(payload: bytes, is_binary: bool, max_size: int, rules: JSONRules) -> Request:
    """
    Parse one client frame: size first, then strict JSON, then the fields.

    @raise WireError: ``too_large`` for a frame over C{max_size} bytes (not
        parsed), ``bad_request`` for anything malformed; carries the
        frame's id where it is known.
    """
    if is_binary:
        raise WireError("bad_request", "binary frames are not accepted: send JSON text", leading_id(payload))
    if len(payload) > max_size:
        raise WireError("too_large", f"message is over the {max_size} byte limit", leading_id(payload))
    try:
        frame = rules.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:  # Autobahn validates UTF-8 first; this is for callers that do not
        raise WireError("bad_request", "frame is not UTF-8 text") from None
    except StrictJSONError as e:
        raise WireError("bad_request", f"frame is not valid JSON: {e}", leading_id(payload)) from None
    if not isinstance(frame, dict):
        raise WireError("bad_request", 'frame must be a JSON object with a "type"')
    rid = _request_id(frame)
    kind = frame.get("type")
    try:
        if kind == "message":
            if "content" not in frame:
                raise ValueError('a message needs "content"')
            channel = frame.get("channel")
            return Publish(rid, frame["content"], None if channel is None else check_channel(channel))
        if kind == "subscribe":
            since = frame.get("since")
            presence = frame.get("presence", False)
            if not isinstance(presence, bool):
                raise ValueError("presence must be true or false")
            channel = check_channel(frame.get("channel"))
            return Subscribe(rid, channel, None if since is None else parse_offset(since), presence)
        if kind == "unsubscribe":
            return Unsubscribe(rid, check_channel(frame.get("channel")))
        if kind == "auth":
            token = frame.get("token")
            if not isinstance(token, str) or not token:
                raise ValueError('auth needs a "token" string')
            return Auth(rid, token)
        if kind == "presence":
            return PresenceQuery(rid, check_channel(frame.get("channel")))
    except ValueError as e:
        raise WireError("bad_request", str(e), rid) from None
    if kind is None:
        raise WireError("bad_request", 'frame has no "type"', rid)
    raise WireError("bad_request", f"unknown type {kind!r}: use message, subscribe, unsubscribe, auth or presence", rid)


def encode(frame: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (strict: a frame that cannot be encoded is a bug, not something to relay)."""
    return dumps(frame)


def error_frame(code: str, message: str, request_id: RequestId = None) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame["id"] = request_id
    return encode(frame)


def reply_frame(kind: str, request_id: RequestId, **fields: Any) -> bytes:
    frame: dict[str, Any] = {"type": kind, **fields}
    if request_id is not None:
        frame["id"] = request_id
    return encode(frame)


def envelope(content: Any, channel: str | None) -> bytes:
    """What a client publish LPUSHes: the same envelope a backend would push."""
    item: dict[str, Any] = {"content": content}
    if channel is not None:
        item["channel"] = channel
    return encode(item)


def message_payload(content_json: bytes, channel: str | None, offset: bytes) -> bytes:
    """A ``message`` frame from already-encoded content: no parsing, one join."""
    channel_json = b"null" if channel is None else dumps(channel)
    return b"".join(
        (b'{"type":"message","content":', content_json, b',"channel":', channel_json, b',"offset":"', offset, b'"}')
    )


def text_frame(payload: bytes) -> bytes:
    """One unmasked WebSocket text frame (RFC 6455), built once and sendable to any connection."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65536:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload
