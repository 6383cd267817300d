"""
The wire protocol between pushservice and its WebSocket clients: pure
parsing, validation and encoding, no Twisted.

Client to server (JSON text frames):
    {"type":"message","content":<any>,"channel"?:str,"id"?:str|int}
    {"type":"subscribe","channel":str,"since"?:"<offset>","id"?:...}
    {"type":"unsubscribe","channel":str,"id"?:...}
    {"type":"auth","token":str,"id"?:...}
Server to client:
    {"type":"message","content":<any>,"channel":str|null,"offset":"<ms>-<seq>"}
    {"type":"ack","id":...}
    {"type":"subscribed","channel":str,"id"?:...,"recovered"?:bool}
    {"type":"unsubscribed","channel":str,"id"?:...}
    {"type":"error","id"?:...,"code":str,"message":str}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Auth",
    "Offset",
    "Publish",
    "Request",
    "Subscribe",
    "Unsubscribe",
    "WireError",
    "check_channel",
    "encode",
    "error_frame",
    "message_frame",
    "parse_offset",
    "parse_request",
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
    id: RequestId
    content: Any
    channel: str | None


@dataclass(frozen=True)
class Subscribe:
    id: RequestId
    channel: str
    since: Offset | None


@dataclass(frozen=True)
class Unsubscribe:
    id: RequestId
    channel: str


@dataclass(frozen=True)
class Auth:
    id: RequestId
    token: str


Request = Publish | Subscribe | Unsubscribe | Auth


def parse_offset(text: object) -> Offset:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; a bare ``"17"`` means ``(17, 0)``."""
    if not isinstance(text, str) or len(text) > 41:
        raise ValueError('an offset is a string like "1700000000000-0"')
    ms, _, seq = text.partition("-")
    if not ms.isdigit() or not (seq.isdigit() or seq == ""):
        raise ValueError(f'bad offset {text!r}: expected "<ms>-<seq>"')
    return int(ms), int(seq or 0)


def format_offset(offset: Offset) -> str:
    return f"{offset[0]}-{offset[1]}"


def check_channel(channel: object) -> str:
    """Return the channel name if it is one: a non-empty string of at most 255 bytes."""
    if not isinstance(channel, str) or not channel:
        raise ValueError("channel must be a non-empty string")
    if len(channel.encode("utf-8", "surrogatepass")) > MAX_CHANNEL:
        raise ValueError(f"channel names are at most {MAX_CHANNEL} bytes")
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


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# an escaped UTF-16 surrogate; only a lone one is a problem (Redis's cjson refuses it, so the
# envelope would be delivered as a raw string to every connection, whatever its channel)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(frame: Any) -> bool:
    try:
        json.dumps(frame, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return True
    return False


def peek_id(payload: bytes, is_binary: bool, max_size: int) -> RequestId:
    """The id of a frame that will not be served (rate limited), if it has a valid one."""
    if is_binary or len(payload) > max_size:
        return None
    try:
        frame = json.loads(payload)
        return _request_id(frame) if isinstance(frame, dict) else None
    except (ValueError, RecursionError, WireError):
        return None


def parse_request(payload: bytes, is_binary: bool, max_size: int) -> Request:
    """
    Parse one client frame.

    @raise WireError: ``bad_request`` for anything malformed, ``too_large``
        for a frame over C{max_size} bytes; carries the frame's id if it had one.
    """
    if is_binary:
        raise WireError("bad_request", "binary frames are not accepted: send JSON text")
    try:
        # NaN/Infinity are not JSON: relayed, they would break every browser's JSON.parse
        frame = json.loads(payload, parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise WireError("bad_request", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise WireError("bad_request", 'frame must be a JSON object with a "type"')
    rid = _request_id(frame)
    if len(payload) > max_size:
        raise WireError("too_large", f"message is over the {max_size} byte limit", rid)
    if _SURROGATE_ESCAPE.search(payload) and _has_lone_surrogate(frame):
        raise WireError("bad_request", "text holds a lone surrogate (an unpaired \\ud800-\\udfff escape)", rid)
    kind = frame.get("type")
    try:
        if kind == "message":
            if "content" not in frame:
                raise ValueError('a message needs "content"')
            channel = frame.get("channel")
            return Publish(rid, frame["content"], None if channel is None else check_channel(channel))
        if kind == "subscribe":
            since = frame.get("since")
            return Subscribe(rid, check_channel(frame.get("channel")), None if since is None else parse_offset(since))
        if kind == "unsubscribe":
            return Unsubscribe(rid, check_channel(frame.get("channel")))
        if kind == "auth":
            token = frame.get("token")
            if not isinstance(token, str) or not token:
                raise ValueError('auth needs a "token" string')
            return Auth(rid, token)
    except ValueError as e:
        raise WireError("bad_request", str(e), rid) from None
    if kind is None:
        raise WireError("bad_request", 'frame has no "type"', rid)
    raise WireError("bad_request", f"unknown type {kind!r}: use message, subscribe, unsubscribe or auth", rid)


def encode(frame: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; escapes only where a lone surrogate makes UTF-8 impossible."""
    try:
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(frame, separators=(",", ":")).encode("ascii")


def message_frame(content: Any, channel: str | None, offset: str) -> bytes:
    return encode({"type": "message", "content": content, "channel": channel, "offset": offset})


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
