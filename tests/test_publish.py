"""
POST /publish (issue 12): producers without Redis access publish with a
token whose publish grant covers the channel. Against in-process nodes and
a real redis-server (a test's own one to stop, for 503), with raw loopback
requests, so each refusal is seen as a client meets it; accepted items are
read back by real WebSocket clients, in order.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from support.clients import connect, token
from support.raw import Raw, ask, raw
from support.waiting import new_marker, until

from pushservice.config import parse_redis_url

PUBLISHER = token("backend", publish=["news", "private:hr", "*"])


def post(port: int, body: bytes, *headers: str, auth: str | None = PUBLISHER, length: bool = True) -> bytes:
    lines = ["POST /publish HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json", *headers]
    if auth is not None:
        lines.append(f"Authorization: Bearer {auth}")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answer(r: Raw) -> Any:
    return json.loads(bytes(r.buf))


@pytest_twisted.async_yield_fixture
async def publishing(make_node: Any, queue: str, secret_file: str) -> Any:
    """A node that verifies tokens, so it serves POST /publish."""
    yield await make_node(queue, token_secret_file=secret_file)


# -- accepted --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_published_item_reaches_websocket_clients(publishing, redis_sync, queue):
    """202 once Redis stored it; a subscriber of the channel gets it as a message, others do not."""
    node = publishing
    news = await connect(node.port, "channels=news")
    other = await connect(node.port, "channels=sport")
    r = await ask(node.port, post(node.port, b'{"content": {"hello": 1}, "channel": "news"}'))
    assert r.status == 202 and answer(r) == {"queued": 1}
    frame = await news.next_of("message")
    assert frame["content"] == {"hello": 1} and frame["channel"] == "news"
    marker = new_marker()
    redis_sync.lpush(queue, marker)
    assert await other.until_marker(marker) == []
    assert node.stats.http_publishes == 1


@pytest_twisted.ensureDeferred
async def test_a_batch_is_stored_in_body_order(publishing):
    """An array: every item, one LPUSH, delivered in the order of the body, user-addressed ones to that user only."""
    node = publishing
    alice = await connect(node.port, f"token={token('alice')}")
    anon = await connect(node.port)
    items = [{"content": i} for i in range(20)] + [{"content": "private", "user": "alice"}, {"content": "end"}]
    r = await ask(node.port, post(node.port, json.dumps(items).encode()))
    assert r.status == 202 and answer(r) == {"queued": 22}
    got = [f["content"] for f in await alice.messages(22)]
    assert got == [*range(20), "private", "end"]
    assert [f["content"] for f in await anon.messages(21)] == [*range(20), "end"]


# -- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "why"),
    [
        (None, "send a token"),
        ("not.a.jwt", "invalid token"),
        (token("backend", ttl=-10, publish=["*"]), "token expired"),
        (
            token("backend", publish=["*"], secret=b"another secret of 32 bytes or more, not the node's"),
            "invalid token",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_no_or_bad_token_is_401(publishing, auth, why):
    """No token, a malformed, expired or foreign one: 401 with WWW-Authenticate; nothing queued."""
    r = await ask(publishing.port, post(publishing.port, b'{"content": 1}', auth=auth))
    assert r.status == 401 and why in (bytes(r.buf).decode() if auth is None else answer(r)["message"])
    assert b"WWW-Authenticate: Bearer" in r.head
    assert publishing.stats.http_publishes == 0


@pytest_twisted.ensureDeferred
async def test_a_non_bearer_authorization_is_401(publishing):
    """Authorization: Basic is not a token."""
    r = await ask(publishing.port, post(publishing.port, b'{"content": 1}', "Authorization: Basic YTpi", auth=None))
    assert r.status == 401


@pytest.mark.parametrize(
    ("grant", "item"),
    [
        (["news"], {"content": 1, "channel": "sport"}),
        (["*"], {"content": 1, "channel": "private:hr"}),
        (["news", "news.*"], {"content": 1}),
        (["news"], {"content": 1, "user": "alice"}),
        ([], {"content": 1, "channel": "news"}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_channel_not_granted_is_403(publishing, redis_sync, queue, grant, item):
    """The publish grant decides: other channels, private ones without a private: pattern, broadcasts without '*'."""
    r = await ask(publishing.port, post(publishing.port, json.dumps(item).encode(), auth=token("p", publish=grant)))
    assert r.status == 403 and answer(r)["error"] == "forbidden"
    assert redis_sync.llen(queue) == 0


@pytest_twisted.ensureDeferred
async def test_one_forbidden_item_refuses_the_whole_batch(publishing, redis_sync, queue):
    """A batch is all or nothing: one item on a channel not granted and none is queued."""
    body = json.dumps([{"content": 1, "channel": "news"}, {"content": 2, "channel": "sport"}]).encode()
    r = await ask(publishing.port, post(publishing.port, body, auth=token("p", publish=["news"])))
    assert r.status == 403 and "sport" in answer(r)["message"]
    assert redis_sync.llen(queue) == 0


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"content": NaN}',
        b'{"content": 1, "content": 2}',
        b'{"content": 1} trailing',
        b'"just a string"',
        b"[]",
        b"[1]",
        b'{"channel": "news"}',
        b'{"content": 1, "channel": 5}',
        b'{"content": 1, "channel": "a*"}',
        b'{"content": 1, "user": ""}',
        b'{"content": 1, "topic": "x"}',
        b'{"content": "\xff"}',
        b"[" * 100 + b"]" * 100,
        b'{"content": 1' + b"0" * 200 + b"}",
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_bodies_are_400_and_nothing_is_queued(publishing, redis_sync, queue, body):
    """Anything but strict JSON envelopes (or a non-empty array of them) is 400 with why."""
    r = await ask(publishing.port, post(publishing.port, body))
    assert r.status == 400 and answer(r)["error"] == "bad_request", bytes(r.buf)
    assert redis_sync.llen(queue) == 0


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_413_before_it_is_read(make_node, queue, secret_file):
    """A Content-Length over --max-publish-body is refused on the head alone: the body is never sent."""
    node = await make_node(queue, token_secret_file=secret_file, max_publish_body=1000)
    head = post(node.port, b"", "Content-Length: 1001", length=False)
    r = await ask(node.port, head)
    assert r.status == 413 and b"--max-publish-body" in bytes(r.buf)
    ok = await ask(node.port, post(node.port, json.dumps({"content": "x" * 900}).encode()))
    assert ok.status == 202


@pytest_twisted.ensureDeferred
async def test_an_item_over_max_item_size_is_413(make_node, queue, secret_file, redis_sync):
    """An envelope bigger than --max-item-size (what ingest would dead-letter) is refused with 413."""
    node = await make_node(queue, token_secret_file=secret_file, max_item_size=100)
    r = await ask(node.port, post(node.port, json.dumps({"content": "x" * 200}).encode()))
    assert r.status == 413 and answer(r)["error"] == "too_large"
    assert redis_sync.llen(queue) == 0


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_is_411(publishing):
    """Transfer-Encoding: chunked is refused with 411 Length Required, unread."""
    head = post(publishing.port, b"", "Transfer-Encoding: chunked", length=False)
    r = await ask(publishing.port, head + b"5\r\nhello\r\n0\r\n\r\n")
    assert r.status == 411


@pytest_twisted.ensureDeferred
async def test_a_slow_body_is_cut_at_http_timeout(make_node, queue, secret_file):
    """A body that never completes does not hold the connection past --http-timeout."""
    node = await make_node(queue, token_secret_file=secret_file, http_timeout=0.5)
    r = await raw(node.port)
    r.send(post(node.port, b"", "Content-Length: 10", length=False) + b'{"con')
    await until(lambda: r.lost, 5, "the connection is cut")


@pytest_twisted.ensureDeferred
async def test_without_a_token_secret_publishing_is_404(node):
    """A node that cannot check tokens does not serve POST /publish: 404 saying why."""
    r = await ask(node.port, post(node.port, b'{"content": 1}'))
    assert r.status == 404 and b"--token-secret-file" in bytes(r.buf)


@pytest_twisted.ensureDeferred
async def test_other_methods_on_publish_are_405(publishing):
    """GET /publish is 405 (only POST is served there); POST elsewhere is 405 too."""
    r = await ask(publishing.port, f"GET /publish HTTP/1.1\r\nHost: 127.0.0.1:{publishing.port}\r\n\r\n".encode())
    assert r.status == 405 and b"Allow: POST" in r.head
    r = await ask(publishing.port, post(publishing.port, b"{}").replace(b"POST /publish", b"POST /other", 1))
    assert r.status == 405


@pytest_twisted.ensureDeferred
async def test_redis_down_is_503_within_the_redis_timeout(make_node, queue, secret_file, own_redis):
    """With Redis stopped, POST /publish answers 503 after --redis-timeout, and 202 again once it is back."""
    server = own_redis()
    node = await make_node(queue, token_secret_file=secret_file, redis=parse_redis_url(server.url), redis_timeout=1)
    server.stop()
    r = await ask(node.port, post(node.port, b'{"content": 1}'), timeout=10)
    assert r.status == 503 and answer(r)["error"] == "unavailable"
    server.start()
    await until(lambda: node.stats.redis_up, 30, "reconnected to Redis")

    async def accepted() -> bool:
        return (await ask(node.port, post(node.port, b'{"content": 2}'))).status == 202

    await until(accepted, 30, "202 once Redis is back")


@pytest_twisted.ensureDeferred
async def test_no_authorization_is_401_before_the_body_is_read(publishing):
    """A request without an Authorization header is refused on its head: its body is never waited for."""
    r = await ask(publishing.port, post(publishing.port, b"", "Content-Length: 5000", auth=None, length=False))
    assert r.status == 401 and b"WWW-Authenticate: Bearer" in r.head
