"""
A connection's request head, parsed small and strict before anything else
sees it (pure: bytes in, a L{RequestHead} or a L{HeadError} out).

The rules are RFC 9112's, read strictly, and the same ones Autobahn's
``parseHttpHeader`` applies (autobahn#2034): lines end in CRLF only (a bare
CR or LF is invalid), no obs-fold, a field name is a token followed directly
by ``:``, a value holds visible characters, SP, HTAB and obs-text only.
Being at least as strict as Autobahn and twisted.web means the router and
the library it hands a connection to cannot read one head two ways (header
smuggling, e.g. of X-Forwarded-For, which the per-address limits trust).

L{RequestHead.wants_websocket} is the one rule that makes a request a
WebSocket upgrade; nothing else in pushservice decides that.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["CASED", "FIELDS", "MAX_FIELDS", "HeadError", "RequestHead", "parse_head"]

#: Header fields a head may carry (twisted.web itself answers a bare 400 past 500).
MAX_FIELDS = 100
#: The fields pushservice reads from a head; the others are checked, then left to Autobahn or twisted.web.
FIELDS = (
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"upgrade",
    b"x-forwarded-for",
    b"origin",
    b"last-event-id",
    b"authorization",
    b"connection",
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
)
#: Fields whose values keep their case (a token, a key); the others are lower-cased.
CASED = (b"authorization", b"sec-websocket-key")

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])\r\n")
# every field line at once (one C-level pass: a regex per line costs a handshake ~10 us more)
_FIELD_LINES = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n){0,%d}\r\n" % MAX_FIELDS)
# in the lower-cased field lines, each starting after a CRLF
_READ = re.compile(rb"\r\n(" + b"|".join(re.escape(name) for name in FIELDS) + rb"):([^\r]*)")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


class HeadError(ValueError):
    """The head cannot be served: C{status} is the HTTP status to answer with."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class RequestHead(NamedTuple):
    """
    A parsed request head.

    @ivar fields: the values of the L{FIELDS} present, lower-cased (but the
        L{CASED} ones), by name; a repeated field's values joined with C{", "}.
    @ivar content_length: the declared body length (0 without Content-Length).
    @ivar repeated: the names of the L{FIELDS} that came more than once.
    """

    method: bytes
    target: bytes
    version: bytes
    fields: dict[bytes, bytes]
    content_length: int
    repeated: frozenset[bytes] = frozenset()

    @property
    def path(self) -> bytes:
        """The target without its query."""
        return self.target.partition(b"?")[0]

    @property
    def has_body(self) -> bool:
        """Whether a body follows the head (Content-Length above 0, or any Transfer-Encoding)."""
        return self.content_length > 0 or b"transfer-encoding" in self.fields

    def wants_websocket(self) -> bool:
        """The one rule for a WebSocket upgrade: an Upgrade field that names websocket."""
        upgrade = self.fields.get(b"upgrade")
        if upgrade is None or upgrade == b"websocket":  # (the field is lower-cased) no field, or the usual one
            return upgrade is not None
        return any(p.strip(b" \t") == b"websocket" for p in upgrade.split(b","))


def parse_head(data: bytes) -> RequestHead:
    """
    Parse a request head: the bytes up to and including the first CRLF CRLF.

    @raise HeadError: 400 for anything malformed, 431 for more than
        L{MAX_FIELDS} fields, 505 for an HTTP version other than 1.0 and 1.1.
    """
    request = _REQUEST_LINE.match(data)
    if request is None:
        raise HeadError(400, "the request line is not METHOD SP TARGET SP HTTP/1.1")
    method, target, version = request.groups()
    if version not in _VERSIONS:
        raise HeadError(505, "HTTP/1.1 only")
    start = request.end()
    if _FIELD_LINES.fullmatch(data, start) is None:
        if data.count(b"\r\n", start) - 1 > MAX_FIELDS:
            raise HeadError(431, f"more than {MAX_FIELDS} header fields")
        raise HeadError(400, "a header line is not NAME: VALUE (no folding, CRLF only)")
    fields: dict[bytes, bytes] = {}
    repeated = set()
    lowered = data.lower()  # the same length: bytes.lower() only maps A-Z
    for match in _READ.finditer(lowered, start - 2):
        name = match.group(1)
        value = (data if name in CASED else lowered)[match.start(2) : match.end(2)].strip(b" \t")
        seen = fields.get(name)
        if seen is None:
            fields[name] = value
        else:
            fields[name] = seen + b", " + value
            repeated.add(name)
    if version == b"HTTP/1.1" and (b"host" not in fields or b"host" in repeated):
        raise HeadError(400, "an HTTP/1.1 request has exactly one Host field")
    length = fields.get(b"content-length")
    lengths = {n.strip(b" \t") for n in length.split(b",")} if length is not None else {b"0"}
    if len(lengths) > 1 or not all(n.isdigit() and len(n) < 20 for n in lengths):
        raise HeadError(400, "Content-Length is not one number")
    return RequestHead(method, target, version, fields, int(lengths.pop()), frozenset(repeated))
