"""
The opening handshake of an ordinary upgrade, answered from the head the
port's router already parsed (L{pushservice.httphead}), without Autobahn
parsing it a second time.

Only the plain case is answered here: HTTP/1.1, one each of Host, Origin,
Sec-WebSocket-Key, Sec-WebSocket-Version 13 and Sec-WebSocket-Extensions,
no Sec-WebSocket-Protocol, a key of 24 base64 characters, an origin that is
C{null} or C{http(s)://host[:port]}, a Host whose port (if any) is a number.
Every other request (and every malformed one) is left to Autobahn's
C{processHandshake}, so errors are answered as before, byte for byte;
C{tests/test_handshake.py} compares the two paths' responses for both.

What this answers is what Autobahn's C{succeedHandshake} would: the same
101 head, the same permessage-deflate negotiation (through the factory's
C{perMessageCompressionAccept}), the same connection state afterwards
(L{pushservice._internals.open_connection}). It saves Autobahn's second
parse of the head, its URL parsing, a Deferred around C{onConnect} and the
arguments of its debug log lines (with the collector tuned too, a handshake
took 212-220 us of CPU against 256-290 before in the same connect-rate runs;
bench/README.md).
"""

from __future__ import annotations

import re
from base64 import b64encode
from hashlib import sha1
from typing import Any
from urllib.parse import parse_qs

from autobahn.websocket.compress import PERMESSAGE_COMPRESSION_EXTENSION
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from . import _internals
from .httphead import RequestHead

__all__ = ["answer", "parse_extensions"]

_log = Logger()
#: Autobahn's compression extensions by name: their offer parsers and their frame compressors
_EXTENSIONS: dict[str, dict[str, Any]] = PERMESSAGE_COMPRESSION_EXTENSION

_MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_KEY = re.compile(rb"[A-Za-z0-9+/]{22}==")
# origins answered here (the router lower-cased them); any other is left to Autobahn's checks
_ORIGIN = re.compile(rb"null|https?://[a-z0-9.-]+(?::([0-9]{1,5}))?")
_SINGLE = (b"host", b"origin", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions")


def parse_extensions(header: str) -> list[tuple[str, dict[str, list[str | bool]]]]:
    """A Sec-WebSocket-Extensions value as Autobahn's C{_parseExtensionsHeader} reads it: (name, params) pairs."""
    extensions = []
    for offer in header.split(","):
        parts = [part.strip() for part in offer.strip().split(";")]
        if not parts[0]:
            continue
        params: dict[str, list[str | bool]] = {}
        for param in parts[1:]:
            key, *values = (x.strip() for x in param.split("="))
            value: str | bool = "=".join(values) if values else True
            if isinstance(value, str):
                value = value[1:] if value.startswith('"') else value
                value = value[:-1] if value.endswith('"') else value
            params.setdefault(key.lower(), []).append(value)
        extensions.append((parts[0].lower(), params))
    return extensions


def _plain(head: RequestHead) -> bool:
    """Whether C{head} is an upgrade this module answers (anything else goes to Autobahn)."""
    fields = head.fields
    if head.version != b"HTTP/1.1" or b"sec-websocket-protocol" in fields or b"#" in head.target:
        return False
    if any(name in head.repeated for name in _SINGLE):
        return False
    if fields.get(b"sec-websocket-version") != b"13" or not _KEY.fullmatch(fields.get(b"sec-websocket-key", b"")):
        return False
    if not any(c.strip(b" \t") == b"upgrade" for c in fields.get(b"connection", b"").split(b",")):
        return False
    host = fields.get(b"host", b"")
    if b":" in host and not host.endswith(b"]") and not host.rpartition(b":")[2].strip().isdigit():
        return False
    origin = fields.get(b"origin")
    if origin is not None:
        match = _ORIGIN.fullmatch(origin)
        if match is None or (match.group(1) is not None and int(match.group(1)) > 65535):
            return False
    return True


def answer(protocol: Any, head: RequestHead) -> bool:
    """
    Answer C{protocol}'s opening handshake from C{head} (its request head,
    as the router parsed it), if it is a plain one: open the connection, or
    refuse it as C{onConnect} says. False: nothing was done, leave it to
    Autobahn.
    """
    factory = protocol.factory
    data = protocol.data
    end = data.find(b"\r\n\r\n")
    if end < 0 or factory.externalPort or factory.headers or not _plain(head):
        return False
    if protocol.maxConnections > 0 and factory.countConnections > protocol.maxConnections:
        return False  # Autobahn answers 503
    fields = head.fields
    offers = []
    extensions = fields.get(b"sec-websocket-extensions")
    for name, params in parse_extensions(extensions.decode("iso-8859-1")) if extensions else ():
        if name in _EXTENSIONS:
            try:
                offers.append(_EXTENSIONS[name]["Offer"].parse(params))
            except Exception:
                return False  # Autobahn refuses it with its own words
    protocol.data = data[end + 4 :]
    forwarded = fields.get(b"x-forwarded-for")
    if forwarded is not None and protocol.trustXForwardedFor:
        protocol.peer = [a.strip() for a in forwarded.decode("iso-8859-1").split(",")][-protocol.trustXForwardedFor :][
            0
        ]
    origin = fields[b"origin"].decode() if b"origin" in fields else None
    protocol.websocket_version = 13
    protocol.websocket_origin = origin or ""
    host = fields[b"host"].decode("iso-8859-1")
    protocol.http_request_host = host.rpartition(":")[0] if ":" in host and not host.endswith("]") else host
    try:
        query = parse_qs(head.target.decode("iso-8859-1").partition("?")[2])
        protocol.admit(origin, query)
    except ConnectionDeny as e:
        protocol.failHandshake(e.reason, e.code)
        return True
    except Exception as e:  # as Autobahn does when onConnect fails
        _log.failure("unexpected exception admitting {peer}", peer=protocol.peer)
        protocol.failHandshake(f"Internal server error: {e}", ConnectionDeny.INTERNAL_SERVER_ERROR)
        return True
    _open(protocol, fields[b"sec-websocket-key"], offers)
    return True


def _open(protocol: Any, key: bytes, offers: list[Any]) -> None:
    """Send the 101 (what Autobahn's C{succeedHandshake} sends) and open the connection."""
    factory = protocol.factory
    pmce = None
    extension = b""
    accept = protocol.perMessageCompressionAccept(offers) if offers else None
    if accept is not None:
        pmce = _EXTENSIONS[accept.EXTENSION_NAME]["PMCE"].create_from_offer_accept(True, accept)
        extension = b"Sec-WebSocket-Extensions: %s\r\n" % accept.get_extension_string().encode()
    lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
    if factory.server:
        lines.append(b"Server: %s\r\n" % factory.server.encode())
    lines.append(b"Upgrade: WebSocket\r\nConnection: Upgrade\r\n")
    lines.append(b"Sec-WebSocket-Accept: %s\r\n%s\r\n" % (b64encode(sha1(key + _MAGIC).digest()), extension))
    protocol.sendData(b"".join(lines))
    _internals.open_connection(protocol, pmce)
