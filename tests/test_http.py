"""
The HTTP side of a port as an attacker meets it: raw loopback sockets send
what a library would refuse to (bodies on GET, LF-only heads, huge
Content-Lengths, pipelined requests), against an in-process node and a real
redis-server; plus pure tests of the head parser and of AddressLimits on a
task.Clock. Two client addresses on loopback come from --trusted-proxies 1
and X-Forwarded-For. Every wait is bounded, every loop bounded in count.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import pytest_twisted
from support.clients import Refused, connect
from support.raw import Raw, ask, raw, raw_ws, upgrade_request, ws_frame
from support.waiting import sleep, until
from twisted.internet import task, threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import globalLogPublisher
from twisted.web import resource, server

from pushservice import limits as limits_module
from pushservice.config import Config
from pushservice.httphead import HeadError, parse_head
from pushservice.limits import AddressLimits

# -- helpers -----------------------------------------------------------------------


def request(port: int, method: str = "GET", path: str = "/healthz", *headers: str, body: bytes = b"") -> bytes:
    """One request head (CRLF line ends) with extra C{headers} lines, then C{body}."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def headers_of(r: Raw) -> dict[str, list[str]]:
    """The response head's fields, by lower-cased name."""
    assert r.head is not None
    fields: dict[str, list[str]] = {}
    for line in r.head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return fields


def port_factory(node: Any) -> Any:
    return node.parts.ports[0].factory


def address_limits(node: Any) -> Any:
    return node.parts.factory.addresses


# -- methods and bodies ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_other_methods_get_405_without_the_body_being_read(node):
    """POST/PUT/DELETE/PATCH/OPTIONS with an 800 MB Content-Length (or chunked) get 405 + Allow at once, unread."""
    for method, path in (("POST", "/"), ("PUT", "/healthz"), ("DELETE", "/nope"), ("PATCH", "/"), ("OPTIONS", "*")):
        # a few bytes of an 800 MB body: an answer proves the server did not wait to read the rest
        r = await ask(node.port, request(node.port, method, path, "Content-Length: 800000000", body=b"x" * 10))
        assert r.status == 405, (method, r.head)
        assert headers_of(r)["allow"] == ["GET, HEAD"]
        assert headers_of(r)["connection"] == ["close"]
    chunked = request(node.port, "POST", "/", "Transfer-Encoding: chunked", body=b"10000000\r\nabc")
    assert (await ask(node.port, chunked)).status == 405
    await until(lambda: port_factory(node).http_connections() == 0, what="no HTTP connection left")


@pytest_twisted.ensureDeferred
async def test_a_get_with_a_body_gets_413(node):
    """GET or HEAD with Content-Length > 0 or any Transfer-Encoding: 413 on the head, whatever the path."""
    cases = [
        request(node.port, "GET", "/healthz", "Content-Length: 5", body=b"hello"),
        request(node.port, "GET", "/nope", "Content-Length: 800000000", body=b"x"),
        request(node.port, "GET", "/", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
        request(node.port, "HEAD", "/healthz", "Transfer-Encoding: gzip, chunked"),
    ]
    for data in cases:
        r = await ask(node.port, data)
        assert r.status == 413, (data[:40], r.head)
    # an explicit empty body is no body
    assert (await ask(node.port, request(node.port, "GET", "/healthz", "Content-Length: 0"))).status == 200


@pytest_twisted.ensureDeferred
async def test_an_upgrade_with_a_body_is_refused_and_not_read_as_frames(node, redis_sync):
    """A WebSocket upgrade declaring a body gets 400; the body (a valid publish frame) is never processed."""
    frame = ws_frame(json.dumps({"type": "message", "content": "smuggled"}).encode())
    for field in (f"Content-Length: {len(frame)}", "Transfer-Encoding: chunked"):
        data = upgrade_request(node.port).replace(b"\r\n\r\n", f"\r\n{field}\r\n\r\n".encode()) + frame
        r = await ask(node.port, data)
        assert r.status == 400, r.head
        assert r.frames == []
    assert redis_sync.llen(node.config.queue) == 0
    assert node.stats.connections == 0


@pytest_twisted.ensureDeferred
async def test_malformed_heads_get_400_at_once(make_node, queue):
    """LF-only, bare-CR, folded, space-before-colon and Host-less heads get 400 long before any sweep."""
    node = await make_node(queue, handshake_timeout=30)  # a close within 5 s is not the sweep's
    cases = [
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\nHost: x\nUpgrade: websocket\n",  # not even finished: the first bare LF decides
        upgrade_request(node.port).replace(b"\r\n", b"\n"),
        b"GET /healthz HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\n",
        b"GET http://evil.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    for data in cases:
        r = await ask(node.port, data)
        assert r.status == 400, (data, r.head)
    assert (await ask(node.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")).status == 505
    assert (await ask(node.port, request(node.port, "GET", "/", *[f"X-{i}: {i}" for i in range(101)]))).status == 431
    r = await raw(node.port)
    r.send(b"GET /" + b"a" * 20000)
    await until(lambda: r.lost, 5, what="an oversized head is refused without its end")
    assert r.status == 431


@pytest_twisted.ensureDeferred
async def test_upgrades_elsewhere_get_404_and_plain_http_never_upgrades(node):
    """Upgrade: websocket to any path but / is 404; a HEAD upgrade is 405; / with a query upgrades."""
    for path in ("/healthz", "/ws", "//", "/pushservice.js"):
        r = await ask(node.port, upgrade_request(node.port, path))
        assert r.status == 404, (path, r.head)
    head_upgrade = upgrade_request(node.port).replace(b"GET ", b"HEAD ", 1)
    r = await ask(node.port, head_upgrade)
    assert r.status == 405 and headers_of(r)["allow"] == ["GET"] and r.buf == b""
    ws = await raw(node.port)
    ws.send(upgrade_request(node.port, "/?channels=a"))
    await until(lambda: ws.head is not None, what="101")
    assert ws.status == 101
    ws.abort()
    page = await ask(node.port, request(node.port, "GET", "/", "Connection: Upgrade"))  # no Upgrade field
    assert page.status == 200 and b"<html" in bytes(page.buf).lower()


@pytest_twisted.ensureDeferred
async def test_a_head_sent_with_the_connect_is_served_at_accept_and_a_late_one_after(node, monkeypatch):
    """The router reads a new connection at once: a head already there is served then; else it waits."""
    from pushservice import router

    reads: list[bytes] = []

    def spy(transport: Any) -> bytes:
        reads.append(router_read(transport))
        return reads[-1]

    router_read = router.read_now
    monkeypatch.setattr(router, "read_now", spy)
    early = socket.create_connection(("127.0.0.1", node.port))  # the kernel completes the connect
    early.sendall(upgrade_request(node.port))  # ...and the head is there before the node accepts
    late = await raw(node.port)
    await until(lambda: len(reads) == 2, what="both connections accepted")
    assert sorted(reads) == [b"", upgrade_request(node.port)], reads
    late.send(upgrade_request(node.port))
    await until(lambda: late.head is not None, what="the late head answered")
    assert late.status == 101
    early.setblocking(False)
    answer = b""

    def answered() -> bool:
        nonlocal answer
        try:
            answer += early.recv(4096)
        except BlockingIOError:
            pass
        return b"\r\n\r\n" in answer

    await until(answered, what="the early head answered")
    assert answer.startswith(b"HTTP/1.1 101 ")
    early.close()
    late.abort()


@pytest_twisted.ensureDeferred
async def test_hostile_bytes_waiting_at_accept_are_refused_as_if_read_later(node, monkeypatch):
    """
    What is already in a socket when the node accepts it goes through the
    same rules: an LF-only head 400, a 20 KB head without its end 431, a
    connection reset before the accept nothing; the port serves on.
    """
    import struct

    from pushservice import router

    reads: list[bytes] = []
    real = router.read_now
    monkeypatch.setattr(router, "read_now", lambda t: reads.append(real(t)) or reads[-1])
    lf_only = socket.create_connection(("127.0.0.1", node.port))
    lf_only.sendall(b"GET / HTTP/1.1\nHost: x\n\n")
    oversized = socket.create_connection(("127.0.0.1", node.port))
    oversized.sendall(b"GET /" + b"a" * 20000)
    reset = socket.create_connection(("127.0.0.1", node.port))
    reset.sendall(upgrade_request(node.port))
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()  # an RST, with the head unread
    for s in (lf_only, oversized):
        s.settimeout(5)
    heads = [await threads.deferToThread(_answer_or_reset, s) for s in (lf_only, oversized)]
    assert heads[0].startswith(b"HTTP/1.1 400 ") and heads[1].startswith(b"HTTP/1.1 431 "), heads
    for s in (lf_only, oversized):
        s.close()
    await until(lambda: len(reads) >= 2, what="the connections accepted (the reset one may never be)")
    assert any(r.startswith(b"GET / HTTP/1.1\nHost") for r in reads)
    assert any(r.startswith(b"GET /aaaa") for r in reads)
    page = await ask(node.port, request(node.port))
    assert page.status == 200


def _answer_or_reset(s: socket.socket) -> bytes:
    """What C{s} receives first: b"" if the server closed or reset it. Blocks."""
    try:
        return s.recv(100)
    except ConnectionResetError:
        return b""


@pytest_twisted.ensureDeferred
async def test_a_failure_serving_a_connection_at_accept_drops_it_and_the_port_goes_on(node, monkeypatch):
    """An exception while serving a head read at accept (a bug) drops that connection only."""
    from pushservice import router

    def broken(data: bytes) -> Any:
        raise RuntimeError("a bug in the head parser")

    monkeypatch.setattr(router, "parse_head", broken)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        early = socket.create_connection(("127.0.0.1", node.port))
        early.sendall(upgrade_request(node.port))
        early.settimeout(5)
        assert await threads.deferToThread(_answer_or_reset, early) == b""  # dropped, nothing answered
        early.close()
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e["log_failure"].value for e in events if "log_failure" in e]
    assert [str(f) for f in failures] == ["a bug in the head parser"], failures
    monkeypatch.undo()
    page = await ask(node.port, request(node.port))
    assert page.status == 200


# -- one request per connection, deadlines ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keep_alive_gets_one_response_then_close(make_node, queue):
    """A keep-alive client's pipelined or dripped second request is never served: one response, Connection: close."""
    node = await make_node(queue, handshake_timeout=30)
    two = request(node.port, "GET", "/healthz", "Connection: keep-alive") + request(node.port, "GET", "/nope")
    r = await ask(node.port, two)
    assert r.status == 200 and headers_of(r)["connection"] == ["close"], bytes(r.buf)
    assert bytes(r.buf).count(b"HTTP/1.1") == 0  # no second response
    dripper = await raw(node.port)
    dripper.send(request(node.port, "GET", "/pushservice.js", "Connection: keep-alive"))
    second = request(node.port, "GET", "/healthz")
    for i in range(len(second)):  # bounded: the server closes long before the drip ends
        if dripper.lost:
            break
        dripper.send(second[i : i + 1])
        await sleep(0.05)  # time on purpose: a drip, one byte at a time
    await until(lambda: dripper.lost, 5, what="closed after the first response")
    assert dripper.status == 200 and b"HTTP/1.1" not in bytes(dripper.buf)


class _Pending(resource.Resource):
    """A response that never comes, as from a stuck backend."""

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        return server.NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_plain_http_is_cut_at_http_timeout(make_node, queue):
    """A plain HTTP connection dripping bytes while its response never comes is aborted --http-timeout after accept."""
    node = await make_node(queue, http_timeout=1, handshake_timeout=30)
    port_factory(node).site.resource.putChild(b"pending", _Pending())
    started = time.monotonic()
    r = await raw(node.port)
    r.send(request(node.port, "GET", "/pending"))
    sent = 0
    for _ in range(100):  # bounded: one byte every 0.1 s, 10 s at most
        if r.lost:
            break
        r.send(b"x")
        sent += 1
        await sleep(0.1)  # time on purpose: a drip that outlives --http-timeout
    assert r.lost, "the drip kept the connection alive"
    # the deadline, not something sooner: it lived at least its second, and never got an answer
    assert time.monotonic() - started >= 0.9 and sent >= 1 and r.head is None
    await until(lambda: port_factory(node).http_connections() == 0, what="uncounted")
    assert address_limits(node).open_connections("127.0.0.1") == 0


@pytest_twisted.ensureDeferred
async def test_max_http_connections_closes_new_ones_while_websockets_work(make_node, queue, redis_sync):
    """Past --max-http-connections a new connection is closed unanswered; open WebSockets keep receiving."""
    node = await make_node(queue, max_http_connections=4, handshake_timeout=30)
    client = await connect(node.port)
    stalled = [await raw(node.port) for _ in range(4)]
    for r in stalled:
        r.send(b"GE")
    await until(lambda: port_factory(node).http_connections() == 4, what="4 heads waiting")
    extra = await raw(node.port)
    extra.send(request(node.port))
    await until(lambda: extra.lost, 5, what="the 5th connection closed at once")
    assert extra.head is None and extra.buf == b""
    with pytest.raises(Refused):
        await connect(node.port, timeout=5)  # a new handshake is a connection sending its head too
    redis_sync.lpush(queue, "still served")
    assert (await client.next_of("message"))["content"] == "still served"
    for r in stalled:
        r.abort()
    await until(lambda: port_factory(node).http_connections() == 0, what="the stalled ones uncounted")
    assert (await ask(node.port, request(node.port))).status == 200
    late = await connect(node.port)
    for c in (client, late):
        await c.close()


# -- per-address limits ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_per_address_cap_answers_429_and_frees_on_close(make_node, queue):
    """At max_connections_per_address a handshake or GET gets 429; refused handshakes hold no slot; a close frees one."""
    node = await make_node(
        queue, address_limits_exempt=(), max_connections_per_address=3, allowed_origins=("https://good.example:*",)
    )
    limits = address_limits(node)
    # refused handshakes (403 by onConnect, 400 by Autobahn) and plain GETs give their slot back
    for _ in range(4):
        try:
            await connect(node.port, headers={"Origin": "https://evil.example"})
        except Refused as e:
            assert "403" in e.reason
        r = await ask(node.port, upgrade_request(node.port).replace(b"Sec-WebSocket-Version: 13\r\n", b""))
        assert r.status == 400
        assert (await ask(node.port, request(node.port))).status == 200
    await until(lambda: limits.open_connections("127.0.0.1") == 0, what="every slot released")
    clients = [await connect(node.port) for _ in range(3)]
    with pytest.raises(Refused) as refused:
        await connect(node.port, headers={"X-Forwarded-For": "10.1.2.3"})  # not trusted: still 127.0.0.1
    assert "429" in refused.value.reason
    r = await ask(node.port, request(node.port))
    assert r.status == 429 and int(headers_of(r)["retry-after"][0]) >= 1
    await clients.pop().close()
    await until(lambda: limits.open_connections("127.0.0.1") == 2, what="a slot freed")
    clients.append(await connect(node.port))
    for c in clients:
        await c.close()
    await until(lambda: limits.open_connections("127.0.0.1") == 0, what="all released")


@pytest_twisted.ensureDeferred
async def test_handshake_rate_answers_429_with_retry_after_and_spares_a_bystander(make_node, queue):
    """Past the handshake burst one address gets 429 + Retry-After; forged left XFF entries do not help; others connect."""
    node = await make_node(
        queue, address_limits_exempt=(), trusted_proxies=1, address_handshake_rate=0.01, address_handshake_burst=3
    )
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    for _ in range(3):
        await (await connect(node.port, headers=attacker)).close()
    with pytest.raises(Refused) as refused:
        await connect(node.port, headers=attacker)
    assert "429" in refused.value.reason
    # a client-written entry left of the one the trusted proxy appended changes nothing
    forged = request(node.port, "GET", "/healthz", "X-Forwarded-For: 10.9.8.7, 203.0.113.7")
    r = await ask(node.port, forged)
    assert r.status == 429 and int(headers_of(r)["retry-after"][0]) >= 1, r.head
    bystander = await connect(node.port, headers={"X-Forwarded-For": "198.51.100.9"})
    assert (await ask(node.port, request(node.port, "GET", "/healthz", "X-Forwarded-For: 198.51.100.10"))).status == 200
    await bystander.close()


@pytest_twisted.ensureDeferred
async def test_frame_budget_is_not_refilled_by_reconnecting(make_node, queue):
    """A client that spent its frame burst, reconnects at once, is rate_limited on its first frame; a bystander is not."""
    node = await make_node(queue, address_limits_exempt=(), trusted_proxies=1, client_rate=0.01, client_burst=5)
    greedy = {"X-Forwarded-For": "203.0.113.8"}
    client = await connect(node.port, headers=greedy)
    for i in range(5):
        assert (await client.request({"type": "subscribe", "channel": f"c{i}", "id": i}))["type"] == "subscribed"
    assert (await client.request({"type": "subscribe", "channel": "more", "id": 5}))["code"] == "rate_limited"
    await client.close()
    await until(lambda: address_limits(node).open_connections("203.0.113.8") == 0, what="closed on the server")
    again = await connect(node.port, headers=greedy)
    reply = await again.request({"type": "subscribe", "channel": "c9", "id": 9})
    assert reply["type"] == "error" and reply["code"] == "rate_limited", reply
    bystander = await connect(node.port, headers={"X-Forwarded-For": "198.51.100.11"})
    assert (await bystander.request({"type": "subscribe", "channel": "c9", "id": 1}))["type"] == "subscribed"
    for c in (again, bystander):
        await c.close()


# -- Server header ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_response_says_server_pushservice(make_node, queue):
    """200, 404, 405, 413, 400, 431, 429, 101, 403 and Autobahn's 400 and 503 all say exactly Server: pushservice."""
    node = await make_node(queue, max_connections=1, allowed_origins=("https://good.example:*",))
    port = node.port
    answers = [
        (await ask(port, request(port, "GET", "/healthz")), 200),
        (await ask(port, request(port, "HEAD", "/pushservice.js")), 200),
        (await ask(port, request(port, "GET", "/nope")), 404),
        (await ask(port, request(port, "POST", "/")), 405),
        (await ask(port, request(port, "GET", "/", "Content-Length: 1", body=b"x")), 413),
        (await ask(port, b"GET / HTTP/1.1\nHost: x\n\n"), 400),
        (await ask(port, upgrade_request(port).replace(b"\r\n\r\n", b"\r\nOrigin: https://evil.example\r\n\r\n")), 403),
        (await ask(port, upgrade_request(port).replace(b"Sec-WebSocket-Key", b"X-Key")), 400),
        (await ask(port, request(port, "GET", "/", *[f"X-{i}: {i}" for i in range(101)])), 431),
    ]
    first = await raw_ws(port)
    answers.append((first, 101))
    answers.append((await ask(port, upgrade_request(port)), 503))
    first.abort()
    capped = await make_node(f"{queue}-capped", address_limits_exempt=(), max_connections_per_address=1)
    holder = await raw_ws(capped.port)
    answers.append((await ask(capped.port, request(capped.port)), 429))
    holder.abort()
    for r, status in answers:
        assert r.status == status, (status, r.head)
        assert headers_of(r)["server"] == ["pushservice"], (status, r.head)


# -- the head parser, pure ----------------------------------------------------------------------


def test_parse_head_reads_what_it_serves():
    """A normal head: method, target, path, lower-cased fields, repeated ones joined, no body."""
    head = parse_head(
        b"GET /?channels=a HTTP/1.1\r\nHost: x\r\nUpgrade: h2c, WebSocket\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"x-forwarded-for:5.6.7.8 \r\n\r\n"
    )
    assert (head.method, head.target, head.path, head.version) == (b"GET", b"/?channels=a", b"/", b"HTTP/1.1")
    assert head.fields[b"x-forwarded-for"] == b"1.2.3.4, 5.6.7.8"
    assert head.wants_websocket() and not head.has_body
    assert not parse_head(b"GET / HTTP/1.0\r\nUpgrade: websocketx\r\n\r\n").wants_websocket()  # 1.0: Host optional


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),  # control character in a value
        (b"GET / HTTP/1.1\r\nHost: x\r\n\tfolded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa1\r\n\r\n", 400),  # an Arabic-Indic digit
        (b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    ],
)
def test_parse_head_refuses_what_could_be_read_two_ways(data, status):
    """Heads a proxy, Autobahn or twisted.web could read differently are refused with their status."""
    with pytest.raises(HeadError) as e:
        parse_head(data)
    assert e.value.status == status


def test_parse_head_sees_every_body():
    """Content-Length above 0 (repeated but equal is one) and any Transfer-Encoding mean a body."""
    assert parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n").content_length == 3
    assert parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n").has_body
    assert not parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").has_body


# -- AddressLimits on a task.Clock -------------------------------------------------------------


def _limits(clock: task.Clock, **overrides: Any) -> AddressLimits:
    overrides.setdefault("address_limits_exempt", ())
    return AddressLimits(clock, Config(**overrides))


def test_address_of_peer_and_forwarded_for():
    """Peer IP, an IPv6 /64, v4-mapped as v4, "unix"; the N-th X-Forwarded-For entry from the right when trusted."""
    plain = _limits(task.Clock())
    assert plain.address_of(IPv4Address("TCP", "192.0.2.1", 5), b"10.0.0.1") == "192.0.2.1"  # untrusted XFF
    assert plain.address_of(IPv6Address("TCP", "2001:db8:1:2:3:4:5:6", 5), None) == "2001:db8:1:2::/64"
    assert plain.address_of(IPv6Address("TCP", "::ffff:192.0.2.9", 5), None) == "192.0.2.9"
    assert plain.address_of(UNIXAddress(b"/run/push.sock"), None) == "unix"
    one = _limits(task.Clock(), trusted_proxies=1)
    peer = IPv4Address("TCP", "127.0.0.1", 5)
    assert one.address_of(peer, b"10.9.8.7, 203.0.113.7") == "203.0.113.7"
    assert one.address_of(peer, b"[2001:db8::1]:443") == "2001:db8::/64"
    assert one.address_of(peer, b"198.51.100.1:5555") == "198.51.100.1"
    assert one.address_of(peer, None) == "127.0.0.1"
    two = _limits(task.Clock(), trusted_proxies=2)
    assert two.address_of(peer, b"1.1.1.1, 2.2.2.2, 3.3.3.3") == "2.2.2.2"
    assert two.address_of(peer, b"2.2.2.2") == "2.2.2.2"  # fewer entries than proxies: the leftmost, as Autobahn
    assert len(one.address_of(peer, b"x" * 1000)) == 64


def test_admit_counts_open_connections_per_address():
    """At the cap admit refuses (Retry-After 5); release frees one slot; other addresses are apart."""
    limits = _limits(task.Clock(), max_connections_per_address=2, address_handshake_burst=100)
    assert limits.admit("a") is None and limits.admit("a") is None
    refused = limits.admit("a")
    assert refused is not None and "open connections" in refused.why and refused.retry_after == 5
    assert limits.admit("b") is None
    limits.release("a")
    assert limits.open_connections("a") == 1 and limits.admit("a") is None
    for address in ("a", "a", "b"):
        limits.release(address)
    assert limits.open_connections("a") == limits.open_connections("b") == 0


def test_admit_limits_handshakes_per_second_with_a_burst():
    """The burst passes, the next gets Retry-After of the refill time; tokens return at the rate."""
    clock = task.Clock()
    limits = _limits(clock, address_handshake_rate=0.5, address_handshake_burst=3)
    for _ in range(3):
        assert limits.admit("a") is None
        limits.release("a")
    refused = limits.admit("a")
    assert refused is not None and "new connections" in refused.why and refused.retry_after == 2
    assert limits.admit("b") is None
    clock.advance(1.9)
    assert limits.admit("a") is not None  # refusals cost nothing extra: 0.95 tokens, not yet 1
    clock.advance(0.1)
    assert limits.admit("a") is None


def test_frame_bucket_carries_over_reconnects():
    """A new connection starts where the address's closed ones left (the lowest), refilled since; unknown is full."""
    clock = task.Clock()
    limits = _limits(clock, client_rate=1.0, client_burst=10)
    assert limits.frame_bucket("a").level() == 10
    spent = limits.frame_bucket("a")
    idle = limits.frame_bucket("a")
    for _ in range(10):
        assert spent.take()
    limits.save_frame_bucket("a", spent)
    limits.save_frame_bucket("a", idle)  # closing an idle connection last does not launder the spent budget
    assert limits.frame_bucket("a").level() == 0
    clock.advance(4)
    fresh = limits.frame_bucket("a")
    assert fresh.level() == 4 and fresh.take()
    assert limits.frame_bucket("b").level() == 10


def test_budget_tables_forget_refilled_addresses_and_stay_bounded(monkeypatch):
    """Entries go once they would be full again; never more than MAX_REMEMBERED per table."""
    clock = task.Clock()
    limits = _limits(clock, address_handshake_rate=10, address_handshake_burst=20, client_rate=5, client_burst=10)
    for i in range(50):
        address = f"10.0.0.{i}"
        assert limits.admit(address) is None
        limits.release(address)
        limits.save_frame_bucket(address, limits.frame_bucket(address) if i % 2 else _spent(limits, address))
    assert limits.remembered() == 50 + 25  # full buckets are not stored
    clock.advance(2.0)  # both horizons: 20/10 and 10/5 seconds
    limits.admit("x")
    limits.frame_bucket("x")
    assert limits.remembered() == 1
    monkeypatch.setattr(limits_module, "MAX_REMEMBERED", 10)
    for i in range(30):
        limits.admit(f"10.1.0.{i}")
    assert limits.remembered() == 10


def _spent(limits: AddressLimits, address: str) -> Any:
    bucket = limits.frame_bucket(address)
    bucket.take()
    return bucket


def test_loopback_and_private_addresses_are_spared_by_default():
    """By default a proxy's address (loopback, private) is never limited; public addresses are; the list is an option."""
    clock = task.Clock()
    spared = AddressLimits(clock, Config(max_connections_per_address=1, address_handshake_burst=1))
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.9", "172.20.0.1", "fd00:1:2:3::/64", "unix"):
        assert [spared.admit(address) for _ in range(5)] == [None] * 5, address
        assert spared.frame_bucket(address).level() == Config().client_burst
    assert spared.admit("203.0.113.7") is None
    assert spared.admit("203.0.113.7") is not None
    strict = AddressLimits(clock, Config(max_connections_per_address=1, address_limits_exempt=("10.0.0.0/8",)))
    assert strict.admit("127.0.0.1") is None and strict.admit("127.0.0.1") is not None
    assert strict.admit("10.9.9.9") is None and strict.admit("10.9.9.9") is None
