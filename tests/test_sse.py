"""
Server-Sent Events at GET /events (issue 12): the same routing, grants,
origin checks, resume and slow-client policy as a WebSocket, against
in-process nodes and a real redis-server, read by a raw SSE client
(tests/support/sse.py) and by a real ``curl -N``. Each round ends with a
marker broadcast: what was to reach a stream reaches it before the marker.
The pure re-encoding of frames as events is tested at every cut.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from typing import Any

import pytest
import pytest_twisted
from support.clients import connect, token
from support.raw import closed_by_peer, raw
from support.sse import EventClient, events_request, open_events
from support.waiting import new_marker, sleep, timed, until, until_sync
from support.web import scrape
from twisted.internet import protocol, threads

from pushservice.sse import FrameEvents, event
from pushservice.wire import message_payload, reply_frame, text_frame

# -- pure: frames to events ----------------------------------------------------------


def test_message_frames_become_events_whose_id_is_the_offset() -> None:
    """A message's event carries id: <offset> and the frame's JSON as data, unchanged."""
    payload = message_payload(b'{"a":1}', "news", b"17-3")
    assert event(payload) == b"id: 17-3\ndata: " + payload + b"\n\n"


def test_other_frames_become_named_events_without_an_id() -> None:
    """resumed and gap frames are events named by their type, with no id (a gap's offset is the next message's)."""
    gap = b'{"type":"gap","reason":"trimmed","missed":3,"offset":"9-0"}'
    assert event(gap) == b"event: gap\ndata: " + gap + b"\n\n"
    resumed = reply_frame("resumed", None, since="1-0", recovered=False)
    assert event(resumed) == b"event: resumed\ndata: " + resumed + b"\n\n"


def test_line_breaks_in_json_whitespace_become_separate_data_lines() -> None:
    """Content with CR/LF whitespace (a producer writing the log directly) cannot end or forge a field."""
    payload = message_payload(b'{"a":\r\n1,\r"b":\n2}', None, b"5-0")
    encoded = event(payload)
    assert b"\ndata: 1,\n" in encoded and encoded.count(b"\ndata: ") == 4
    lines = [line.removeprefix(b"data: ") for line in encoded.split(b"\n") if line.startswith(b"data: ")]
    assert json.loads(b"\n".join(lines))["content"] == {"a": 1, "b": 2}


@pytest.mark.parametrize("size", [10, 200, 70_000])
def test_frames_cut_anywhere_give_the_same_events(size: int) -> None:
    """However the outbox cuts its writes, the events come out whole, in order, each once."""
    payloads = [message_payload(b'"' + b"x" * size + b'"', None, b"1-%d" % i) for i in range(3)]
    stream = b"".join(text_frame(p) for p in payloads)
    whole = b"".join(event(p) for p in payloads)
    cuts = range(1, len(stream)) if size < 300 else [1, 2, 3, 9, 10, 11, size, len(stream) - 1]
    for cut in cuts:
        encoder = FrameEvents()
        first = encoder.feed(memoryview(stream)[:cut])
        assert first + encoder.feed(stream[cut:]) == whole and encoder.pending == 0


# -- helpers -----------------------------------------------------------------------


def push(redis: Any, queue: str, content: Any, channel: str | None = None, user: str | None = None) -> None:
    item: dict[str, Any] = {"content": content}
    if channel is not None:
        item["channel"] = channel
    if user is not None:
        item["user"] = user
    redis.lpush(queue, json.dumps(item))


async def to_marker(stream: EventClient, redis: Any, queue: str, marker: str | None = None) -> list[Any]:
    """Push a marker broadcast (unless given one pushed already); the contents of every message before it."""
    if marker is None:
        marker = new_marker()
        redis.lpush(queue, marker)
    await until(lambda: marker in [m["content"] for m in stream.messages()] or stream.lost, what="the marker")
    contents = [m["content"] for m in stream.messages()]
    assert marker in contents, f"the stream ended: {stream.events[-3:]}"
    return contents[: contents.index(marker)]


# -- delivery and resume -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_stream_gets_its_channels_and_broadcasts_in_order(node, queue, redis_sync):
    """Messages of its channels and broadcasts, in order, each an event whose id is its offset; others not."""
    stream = await open_events(node.port, "channels=news,sport")
    assert stream.status == 200 and stream.header("content-type") == "text/event-stream; charset=utf-8"
    await stream.wait(1, "joined")
    for i in range(5):
        push(redis_sync, queue, i, channel=("news", "other", "sport", None, "news")[i])
    assert await to_marker(stream, redis_sync, queue) == [0, 2, 3, 4]
    for e in stream.of_type("message"):
        assert e.id == e.json()["offset"]
    assert stream.retry is not None and 2000 <= stream.retry < 4000


@pytest_twisted.ensureDeferred
async def test_last_event_id_resumes_after_exactly_that_message(node, queue, redis_sync):
    """A reconnect with Last-Event-ID gets every message after it once, in order, after recovered true."""
    stream = await open_events(node.port, "channels=news")
    push(redis_sync, queue, "a", "news")
    push(redis_sync, queue, "b", "news")
    seen = await stream.wait(2)
    stream.abort()
    for c in ("c", "d", "e"):
        push(redis_sync, queue, c, "news")
    # the query's since is older: the header (what a browser sends on its own reconnect) wins
    again = await open_events(node.port, "channels=news&since=0-1", last_event_id=seen[-1].id)
    assert await to_marker(again, redis_sync, queue) == ["c", "d", "e"]
    (resumed,) = again.of_type("resumed")
    assert resumed.json() == {"type": "resumed", "since": seen[-1].id, "recovered": True}
    assert resumed.id is None and again.events.index(resumed) == 0


@pytest_twisted.ensureDeferred
async def test_a_stream_that_saw_no_message_resumes_from_where_it_joined(node, queue, redis_sync):
    """The joined event's id is a resume point: nothing published while away is missed, nothing older replayed."""
    push(redis_sync, queue, "before")
    first = await open_events(node.port)
    await to_marker(first, redis_sync, queue)
    second = await open_events(node.port)
    (joined,) = await second.wait(1, "joined")
    second.abort()
    push(redis_sync, queue, "while away")
    again = await open_events(node.port, last_event_id=joined.id)
    assert await to_marker(again, redis_sync, queue) == ["while away"]


@pytest_twisted.ensureDeferred
async def test_a_resume_older_than_history_is_told(make_node, queue, redis_sync):
    """Past --history, the resumed event says recovered false, as on the WebSocket; the rest still comes."""
    node = await make_node(queue, history=3)
    stream = await open_events(node.port)
    push(redis_sync, queue, "old")
    (old,) = await stream.wait(1)
    stream.abort()
    for i in range(5):
        push(redis_sync, queue, i)
    await until(lambda: node.stats.messages_in >= 6, what="the node read them (and let 'old' go)")
    again = await open_events(node.port, last_event_id=old.id)
    got = await to_marker(again, redis_sync, queue)
    assert got[-2:] == [3, 4] and "old" not in got
    assert again.of_type("resumed")[0].json()["recovered"] is False


@pytest_twisted.ensureDeferred
async def test_user_messages_reach_only_that_users_stream(make_node, queue, secret_file, redis_sync):
    """A user-addressed message reaches the stream of that token's user, not an anonymous one."""
    node = await make_node(queue, token_secret_file=secret_file)
    alice = await open_events(node.port, f"token={token('alice')}")
    anon = await open_events(node.port)
    push(redis_sync, queue, "for alice", user="alice")
    marker = new_marker()
    redis_sync.lpush(queue, marker)
    assert await to_marker(alice, redis_sync, queue, marker) == ["for alice"]
    assert await to_marker(anon, redis_sync, queue, marker) == []


# -- refusals --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_private_channels_need_a_granting_token(make_node, queue, secret_file, redis_sync):
    """private: channels: 403 without a granting token (query or Bearer), the messages with one."""
    node = await make_node(queue, token_secret_file=secret_file)
    assert (await open_events(node.port, "channels=private:hr")).status == 403
    other = token("bob", channels=["news"])
    assert (await open_events(node.port, f"channels=private:hr&token={other}")).status == 403
    assert (await open_events(node.port, "channels=news&token=not.a.jwt")).status == 403
    expired = token("alice", ttl=-10, channels=["private:*"])
    assert (await open_events(node.port, f"channels=private:hr&token={expired}")).status == 403
    granted = token("alice", channels=["private:hr"])
    stream = await open_events(node.port, "channels=private:hr", f"Authorization: Bearer {granted}")
    assert stream.status == 200
    push(redis_sync, queue, "secret", channel="private:hr")
    assert await to_marker(stream, redis_sync, queue) == ["secret"]


@pytest_twisted.ensureDeferred
async def test_require_token_refuses_a_stream_without_one(make_node, queue, secret_file):
    """With --require-token a stream without a token gets 401 and a WWW-Authenticate header."""
    node = await make_node(queue, token_secret_file=secret_file, require_token=True)
    refused = await open_events(node.port)
    assert refused.status == 401 and refused.header("www-authenticate") == "Bearer"
    assert (await open_events(node.port, f"token={token('alice')}")).status == 200


@pytest_twisted.ensureDeferred
async def test_origins_are_checked_and_allowed_ones_may_read(make_node, queue):
    """Another site's Origin gets 403; an allowed one gets the stream and CORS leave to read it."""
    node = await make_node(queue, allowed_origins=("https://app.example.com:443",))
    assert (await open_events(node.port, "", "Origin: https://evil.example.com")).status == 403
    ok = await open_events(node.port, "", "Origin: https://app.example.com")
    assert ok.status == 200 and ok.header("access-control-allow-origin") == "https://app.example.com"


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("since=yesterday", (), 400),
        ("channels=a*b", (), 400),
        ("auth=1", (), 400),
        ("", ("Last-Event-ID: ../etc",), 400),
        ("token=a", ("Authorization: Bearer b",), 400),
        ("", ("Authorization: Basic YTpi",), 400),
        ("channels=" + ",".join(f"c{i}" for i in range(101)), (), 400),
        ("since=%ff", (), 400),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_stream_requests_are_refused_clearly(node, query, headers, status):
    """A query or header the stream cannot serve gets its status and a sentence, and costs nothing else."""
    refused = await open_events(node.port, query, *headers)
    assert refused.status == status
    await until(lambda: refused.lost, what="the refusal closes the connection")
    assert node.stats.connections == 0


@pytest_twisted.ensureDeferred
async def test_other_methods_and_bodies_on_events_are_refused(node):
    """HEAD and POST /events get 405, a GET with a body 413."""
    for data, status in (
        (b"HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", 405),
        (b"GET /events HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", 413),
    ):
        r = await raw(node.port)
        r.send(data)
        await until(lambda r=r: r.lost, what="the answer")
        assert r.status == status, r.head


# -- lifetime ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_stream_outlives_http_timeout_but_an_unfinished_head_does_not(make_node, queue, redis_sync):
    """--http-timeout does not end a stream; a head that never ends is still cut at --handshake-timeout."""
    node = await make_node(queue, http_timeout=0.5, handshake_timeout=0.5, sse_keepalive=0.2)
    stream = await open_events(node.port)
    slow = await raw(node.port)
    slow.send(b"GET /events HTTP/1.1\r\nHost: x\r\n")
    await until(lambda: slow.lost, 5, "the unfinished head is cut")
    await sleep(1.5)  # three --http-timeout spans pass on purpose
    assert not stream.lost and stream.comments >= 3
    assert await to_marker(stream, redis_sync, queue) == []


@pytest_twisted.ensureDeferred
async def test_an_expired_token_ends_the_stream_with_4003(make_node, queue, secret_file):
    """When the stream's token expires, a close event says 4003 and the connection ends, as on the WebSocket."""
    node = await make_node(queue, token_secret_file=secret_file)
    stream = await open_events(node.port, f"token={token('alice', ttl=1)}")
    await until(lambda: stream.lost, 10, "the stream ends at expiry")
    assert [e.json()["code"] for e in stream.of_type("close")] == [4003]
    assert node.stats.connections == 0


@pytest_twisted.ensureDeferred
async def test_a_stream_holds_its_address_slot_until_it_closes(make_node, queue):
    """Streams count against --max-connections-per-address while open (429 past it) and give the slot back."""
    node = await make_node(queue, max_connections_per_address=2, address_limits_exempt=())
    first, second = await open_events(node.port), await open_events(node.port)
    assert (first.status, second.status) == (200, 200)
    third = await open_events(node.port)
    assert third.status == 429
    first.abort()
    await until(lambda: node.stats.sse_connections == 1, what="the first stream gone")
    assert (await open_events(node.port)).status == 200


@pytest_twisted.ensureDeferred
async def test_shutdown_ends_streams_with_a_close_event(make_node, queue):
    """SIGTERM's graceful stop: each stream gets a close event with 1001, then the connection ends."""
    node = await make_node(queue)
    stream = await open_events(node.port)
    await stream.wait(1, "joined")
    await node.stop()
    assert stream.lost
    (close,) = stream.of_type("close")
    assert close.json() == {"type": "close", "code": 1001, "reason": "server shutting down"}


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_stream_that_does_not_read_is_dropped_and_others_go_on(make_node, queue, redis_sync):
    """The slow-client policy: a stream that takes nothing is dropped; a reading one gets every message."""
    node = await make_node(queue, slow_client_seconds=1)
    reader = await open_events(node.port)

    def stalled() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", node.port))
        s.sendall(events_request(node.port))
        return s

    s = await threads.deferToThread(stalled)
    await until(lambda: node.stats.sse_connections == 2, what="both streams open")
    big = "x" * 30_000
    for i in range(150):
        push(redis_sync, queue, [i, big])
    await until(lambda: node.stats.slow_disconnects == 1, 20, "the stalled stream is dropped")
    assert node.stats.sse_slow_disconnects == 1, "counted as an event stream's"
    assert await threads.deferToThread(closed_by_peer, s)
    got = await to_marker(reader, redis_sync, queue)
    assert [c[0] for c in got] == list(range(150))


@pytest_twisted.ensureDeferred
async def test_metrics_count_connections_by_transport(make_node, queue, redis_sync):
    """/metrics: connections, deliveries and slow drops by transport; pushservice_connections counts both."""
    node = await make_node(queue)
    ws = await connect(node.port)
    stream = await open_events(node.port)
    await stream.wait(1, "joined")
    metrics = await threads.deferToThread(scrape, node.url)
    assert metrics.plain["pushservice_connections"] == 2
    assert metrics.labelled[("pushservice_transport_connections", (("transport", "sse"),))] == 1
    assert metrics.labelled[("pushservice_transport_connections", (("transport", "websocket"),))] == 1
    assert metrics.labelled[("pushservice_transport_connections_accepted_total", (("transport", "sse"),))] == 1
    redis_sync.lpush(queue, "one", json.dumps({"content": "two", "channel": "elsewhere"}), "three")
    await stream.wait(2, "message")  # "one" and "three": neither connection is on "elsewhere"
    await ws.messages(2)
    metrics = await threads.deferToThread(scrape, node.url)
    assert metrics.labelled[("pushservice_transport_messages_out_total", (("transport", "sse"),))] == 2
    assert metrics.labelled[("pushservice_transport_messages_out_total", (("transport", "websocket"),))] == 2
    assert metrics.labelled[("pushservice_transport_slow_disconnects_total", (("transport", "sse"),))] == 0
    await ws.close()
    stream.abort()
    await until(lambda: node.stats.connections == 0, what="both gone")


# -- curl -N --------------------------------------------------------------------------------


class _Output(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.ended = False

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def processEnded(self, reason: Any) -> None:
        self.ended = True


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest_twisted.ensureDeferred
async def test_curl_n_streams_events_as_they_come(node, queue, redis_sync):
    """``curl -N /events``: each message shows up while the stream stays open, as an id and a data line."""
    from twisted.internet import reactor

    out = _Output()
    url = f"http://127.0.0.1:{node.port}/events?channels=news"
    reactor.spawnProcess(out, shutil.which("curl"), ["curl", "-sN", "--max-time", "20", url], env=None)
    try:
        await until(lambda: b"event: joined" in out.out, what="curl shows the joined event")
        for i in range(3):
            push(redis_sync, queue, f"hello {i}", "news")
            await until(lambda i=i: f'"content":"hello {i}"'.encode() in out.out, what=f"curl shows message {i}")
        assert not out.ended
        events = [e for e in out.out.split(b"\n\n") if b'"type":"message"' in e]
        assert len(events) == 3 and all(e.startswith(b"id: ") for e in events)
    finally:
        if not out.ended:
            out.transport.signalProcess("TERM")
        await timed(until(lambda: out.ended, what="curl ends"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_resumes_across_a_restart_with_last_event_id(twistd_service, redis_sync, tmp_path):
    """curl -N on a real twistd: after a restart, -H 'Last-Event-ID: <last id>' gets what was missed, once, in order."""
    proc = twistd_service()
    url = f"{proc.url}/events?channels=news"

    def curl(out: Any, *headers: str) -> subprocess.Popen[bytes]:
        extra = [arg for h in headers for arg in ("-H", h)]
        return subprocess.Popen(["curl", "-sN", "--max-time", "60", *extra, url], stdout=out)

    def messages(path: Any) -> list[tuple[str, Any]]:
        found = []
        for block in path.read_bytes().split(b"\n\n"):
            fields = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
            if b"id" in fields and b'"type":"message"' in fields.get(b"data", b""):
                found.append((fields[b"id"].decode(), json.loads(fields[b"data"])["content"]))
        return found

    first_out = tmp_path / "first.txt"
    with open(first_out, "wb") as out:
        first = curl(out)
    until_sync(lambda: b"event: joined" in first_out.read_bytes(), what="the first stream joined")
    for i in range(3):
        push(redis_sync, proc.queue, i, "news")
    until_sync(lambda: len(messages(first_out)) == 3, what="3 messages")
    proc.stop()
    assert first.wait(10) == 0, "curl ends cleanly when the stream ends (a close event, then EOF)"
    assert b"event: close" in first_out.read_bytes()
    for i in range(3, 6):
        push(redis_sync, proc.queue, i, "news")
    proc.start()
    last_id = messages(first_out)[-1][0]
    second_out = tmp_path / "second.txt"
    with open(second_out, "wb") as out:
        second = curl(out, f"Last-Event-ID: {last_id}")
    try:
        marker = new_marker()
        redis_sync.lpush(proc.queue, marker)
        until_sync(lambda: marker in [c for _, c in messages(second_out)], what="the marker")
        assert [c for _, c in messages(first_out) + messages(second_out)] == [0, 1, 2, 3, 4, 5, marker]
    finally:
        second.terminate()
        second.wait(10)


@pytest_twisted.ensureDeferred
async def test_a_stream_over_a_unix_socket(make_node, queue, redis_sync, tmp_path):
    """--listen unix:...: a stream opens and gets messages there too (no TCP peer address)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    path = str(tmp_path / "push.sock")
    node = await make_node(queue, listen=(f"unix:{path}",))
    stream = await timed(connectProtocol(UNIXClientEndpoint(reactor, path), EventClient()))
    stream.transport.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await stream.wait(1, "joined")
    assert await to_marker(stream, redis_sync, queue) == []
    assert node.stats.sse_connections == 1
