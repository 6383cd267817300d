"""
The opening handshake answered from the router's parsed head
(pushservice.handshake) against Autobahn's own processHandshake: every
request below is sent twice to one in-process node (with a real
redis-server), once as it runs and once with the fast path switched off,
and the whole conversation must be the same bytes: the response head, and
after a 101 the pong and the close frame answering a ping and a close sent
right behind the head. Plain upgrades (with or without an Origin, with
deflate offers) must be answered without Autobahn's processHandshake; the
unusual and the malformed ones by it.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from autobahn.websocket.protocol import WebSocketServerProtocol
from support.clients import token
from support.raw import KEY, raw, ws_frame
from support.waiting import until

from pushservice import handshake
from pushservice.handshake import parse_extensions

ORIGINS = ("https://app.example.com", "http://localhost:*", "null")


def _request(port: int, *fields: str, target: str = "/", version: str = "HTTP/1.1", standard: bool = True) -> bytes:
    lines = [f"GET {target} {version}", f"Host: 127.0.0.1:{port}"]
    if standard:
        lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY.decode()}"]
        lines += ["Sec-WebSocket-Version: 13"]
    return ("\r\n".join([*lines, *fields]) + "\r\n\r\n").encode()


# (name, extra fields, request keywords): answered by pushservice.handshake
PLAIN: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
    ("bare", (), {}),
    ("allowed origin", ("Origin: https://app.example.com",), {}),
    ("origin with a port", ("Origin: http://localhost:8080",), {}),
    ("null origin", ("Origin: null",), {}),
    ("refused origin", ("Origin: https://evil.example",), {}),
    ("deflate", ("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",), {}),
    (
        "browser offer",
        ("Origin: https://App.Example.com", "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"),
        {},
    ),
    (
        "declined then accepted",
        ("Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10, permessage-deflate",),
        {},
    ),
    (
        "both no context takeover",
        ("Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; server_no_context_takeover",),
        {},
    ),
    ("unknown extension", ("Sec-WebSocket-Extensions: x-webkit-deflate-frame",), {}),
    ("channels", (), {"target": "/?channels=news,sport"}),
    ("bad channel", (), {"target": "/?channels=" + "x" * 300}),
    ("bad token", (), {"target": "/?token=nope"}),
    ("good token", (), {"target": "/?token=" + token("alice")}),
    ("connection list", ("Connection: keep-alive, Upgrade",), {}),
    ("forwarded", ("X-Forwarded-For: 10.1.2.3",), {}),
]
# answered by Autobahn, as before
UNUSUAL: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
    ("subprotocol", ("Sec-WebSocket-Protocol: chat",), {}),
    ("extension origin", ("Origin: chrome-extension://abcdef",), {}),
    ("bad origin", ("Origin: https://",), {}),
    ("origin port too big", ("Origin: http://localhost:99999",), {}),
    ("two origins", ("Origin: null", "Origin: null"), {}),
    ("malformed offer", ("Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=99",), {}),
    ("two extension fields", ("Sec-WebSocket-Extensions: permessage-deflate", "Sec-WebSocket-Extensions: x"), {}),
    ("fragment", (), {"target": "/?a=1#frag"}),
    ("http/1.0", (), {"version": "HTTP/1.0"}),
    (
        "no connection upgrade",
        (
            "Upgrade: websocket",
            "Connection: keep-alive",
            f"Sec-WebSocket-Key: {KEY.decode()}",
            "Sec-WebSocket-Version: 13",
        ),
        {"standard": False},
    ),
    (
        "short key",
        ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: c2hvcnQ=", "Sec-WebSocket-Version: 13"),
        {"standard": False},
    ),
    (
        "version 8",
        ("Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY.decode()}", "Sec-WebSocket-Version: 8"),
        {"standard": False},
    ),
    ("two keys", (f"Sec-WebSocket-Key: {KEY.decode()}",), {}),
]


async def _conversation(port: int, request: bytes) -> bytes:
    """Send C{request} with a ping and a close behind it; everything the server sent until it closed."""
    r = await raw(port)
    r.send(request + ws_frame(b"hi", opcode=9) + ws_frame(b"\x03\xe8", opcode=8))
    await until(lambda: r.lost, 10, what="the server answers and closes")
    assert r.head is not None
    return r.head + b"\r\n\r\n" + bytes(r.buf) + b"".join(bytes([0x80 | op, len(p)]) + p for op, p in r.frames)


@pytest.fixture
def autobahn_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of Autobahn's own processHandshake."""
    calls: list[int] = []
    original = WebSocketServerProtocol.processHandshake

    def counted(self: Any) -> None:
        calls.append(1)
        original(self)

    monkeypatch.setattr(WebSocketServerProtocol, "processHandshake", counted)
    return calls


@pytest.mark.parametrize("name, fields, keywords", PLAIN + UNUSUAL, ids=[c[0] for c in PLAIN + UNUSUAL])
@pytest_twisted.ensureDeferred
async def test_fast_and_autobahn_handshakes_say_the_same_bytes(
    make_node: Any,
    queue: str,
    secret_file: str,
    autobahn_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    fields: tuple[str, ...],
    keywords: dict[str, Any],
) -> None:
    node = await make_node(queue, allowed_origins=ORIGINS, token_secret_file=secret_file, trusted_proxies=1)
    request = _request(node.port, *fields, **keywords)
    fast = await _conversation(node.port, request)
    assert len(autobahn_calls) == (0 if (name, fields, keywords) in PLAIN else 1)
    monkeypatch.setattr(handshake, "answer", lambda protocol, head: False)
    slow = await _conversation(node.port, request)
    assert fast == slow
    if name == "bare":
        assert fast.startswith(b"HTTP/1.1 101 ") and fast.endswith(b"\x8a\x02hi\x88\x02\x03\xe8")


def test_extension_offers_are_read_as_autobahn_reads_them() -> None:
    protocol = WebSocketServerProtocol()
    for header in (
        "permessage-deflate; client_max_window_bits, permessage-deflate",
        'permessage-deflate; server_max_window_bits="10"; Client_No_Context_Takeover',
        " , x-foo; a=b=c; a=d,, ",
        "permessage-deflate;;",
    ):
        assert parse_extensions(header) == protocol._parseExtensionsHeader(header)
