"""
Broadcasts written straight to the sockets of connections with nothing
queued (pushservice.fanout's C-level loop over Outbox.direct), attacked
where it could lose, repeat or reorder: sockets that fill mid-batch (partial
sends, EAGAIN in the middle of the loop), connections that pause and catch up
while a batch is written over several reactor turns, clients that close
mid-batch. Real loopback sockets throughout; the end-to-end test runs an
in-process node on a real redis-server with raw clients, some of which do not
read until every message was pushed.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
from support.clients import token
from support.deflating import inflate, read_frames, slow_reader
from support.raw import blocking_upgrade, raw, raw_ws, upgrade_request
from support.waiting import sleep, timed, until
from twisted.internet import threads

from pushservice import fanout
from pushservice.fanout import FanOut
from pushservice.outbox import Outbox


class _Recorder:
    """An outbox's stand-in for the loop's error path: records what it was told was not taken."""

    def __init__(self) -> None:
        self.batch_done = -1
        self.rests: list[tuple[bytes, int]] = []

    def offer(self, data: bytes, sent: int | None = None) -> None:
        assert sent is not None
        self.rests.append((data, sent))


class _Peer:
    def __init__(self) -> None:
        self.outbox = _Recorder()


def _pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (server side, non-blocking with a small send buffer; client side)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server.setblocking(False)
    return server, client


def _fill(sock: socket.socket) -> None:
    """Send until the kernel takes nothing more (bounded)."""
    for _ in range(10_000):
        try:
            sock.send(b"x" * 65536)
        except BlockingIOError:
            return
    raise AssertionError("the socket never filled")


def test_send_direct_hands_partial_full_and_broken_sockets_to_their_outboxes() -> None:
    pairs = [_pair(rcvbuf=4096) for _ in range(6)]
    sockets = [server for server, _ in pairs]
    peers: list[Any] = [_Peer() for _ in pairs]
    _fill(sockets[1])  # EAGAIN in the middle of the loop
    _fill(sockets[4])
    pairs[3][1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    pairs[3][1].close()  # a reset connection: the send fails with an OSError, not EAGAIN
    try:
        sockets[3].send(b"x")  # the first send after a reset may still succeed; the next one fails
    except OSError:
        pass
    blob = b"y" * 3000
    assert FanOut._send_direct(peers, sockets, blob, bid=7) == 6
    told = {i: p.outbox.rests for i, p in enumerate(peers) if p.outbox.rests}
    assert set(told) >= {1, 3, 4}, told
    for i, rests in told.items():
        assert len(rests) == 1 and rests[0][0] is blob and 0 <= rests[0][1] < len(blob)
        assert peers[i].outbox.batch_done == 7
    for i in {0, 2, 5} - set(told):
        pairs[i][1].settimeout(10)
        assert pairs[i][1].recv(65536, socket.MSG_WAITALL) == blob  # the whole share, once
    for server, client in pairs:
        server.close()
        client.close()


def _items(frames: list[tuple[int, bool, bytes]]) -> list[str]:
    payloads = [inflate(p) if compressed else p for op, compressed, p in frames if op == 1]
    return [json.loads(p)["content"] for p in payloads if json.loads(p).get("type") == "message"]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_direct_broadcasts_to_full_and_pausing_sockets_lose_nothing(
    make_node: Any, queue: str, redis_sync: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "CHECK_EVERY", 4)  # batches are written over several turns of 16 connections
    monkeypatch.setattr(fanout, "SLICE", 16)
    rests: list[int] = []
    direct: list[int] = []
    real_offer, real_send = Outbox.offer, FanOut._send_direct

    def counted_offer(self: Outbox, data: bytes, sent: int | None = None) -> None:
        if sent is not None:  # the rest of a share the fan-out sent straight to the socket
            rests.append(sent)
        real_offer(self, data, sent)

    def counted_send(peers: list[Any], sockets: list[Any], blob: bytes, bid: int) -> int:
        direct.append(len(sockets))
        return real_send(peers, sockets, blob, bid)

    monkeypatch.setattr(Outbox, "offer", counted_offer)
    monkeypatch.setattr(FanOut, "_send_direct", staticmethod(counted_send))
    node = await make_node(queue, history_bytes=16 << 20)
    readers = [await raw_ws(node.port) for _ in range(40)]
    sleepers = [
        (await timed(threads.deferToThread(blocking_upgrade, node.port, upgrade_request(node.port))))[0]
        for _ in range(5)
    ]
    sleepers += [await timed(threads.deferToThread(slow_reader, node.port, "permessage-deflate")) for _ in range(5)]
    await until(lambda: node.stats.connections == 50, what="every connection open")
    # 100 small ones, then 3.6 MB per connection: more than a loopback socket takes unread (~2.8 MB)
    pushed = [f"m{n:05d}-" + ("z" * 3000 if n >= 100 else "") for n in range(1300)]
    redis_sync.lpush(queue, "warm")  # one broadcast through the slow path first: after it, connections go direct
    await until(lambda: all(len(r.json_frames()) >= 1 for r in readers), what="the warm-up everywhere")
    for n in range(100):  # one message at a time: each is a batch of its own, written straight to the sockets
        redis_sync.lpush(queue, pushed[n])
        await until(lambda n=n: all(len(r.json_frames()) >= n + 2 for r in readers), what=f"message {n}")
    steady = sum(direct)
    for n in range(100, len(pushed), 50):  # then bursts: sockets fill, shares are cut
        redis_sync.lpush(queue, *pushed[n : n + 50])
    await until(lambda: all(len(r.json_frames()) >= len(pushed) + 1 for r in readers), 60, what="every reader")
    for r in readers:
        assert [f["content"] for f in r.json_frames() if f.get("type") == "message"] == ["warm", *pushed]
    for s in sleepers:  # they read only now: everything, once, in order
        frames = await timed(threads.deferToThread(read_frames, s, len(pushed) + 1, 40.0), 50)
        assert _items(frames) == ["warm", *pushed]
    assert steady >= 4950, f"{steady} deliveries of 5,000 went straight to the sockets (compressing ones too)"
    assert rests, "no socket filled up: the partial-send path was not attacked"


class _SocketConnection:
    """A hub peer writing to a real socket (a socketpair): the fan-out may write to it itself."""

    def __init__(self, hub: Any, clock: Any) -> None:
        self.user = None
        self.channels: set[str] = set()
        self.sock, self.client = socket.socketpair()
        self.sock.setblocking(False)
        self.client.setblocking(False)
        self.buffer = bytearray()  # the transport's user-space buffer
        self.outbox = Outbox(self, self, hub, clock, 1 << 20)

    def send_now(self, data: bytes | memoryview) -> int:
        return 0 if self.buffer else self.sock.send(data)

    def queued(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        self.buffer += data

    def drop_slow(self, why: str) -> None:
        raise AssertionError(why)

    def direct_socket(self) -> socket.socket | None:
        return None if self.buffer else self.sock

    def numbers(self) -> list[int]:
        received = bytearray()
        for _ in range(1000):
            try:
                received += self.client.recv(65536)
            except BlockingIOError:
                break
        return [int(part) for part in received.decode().strip("<>").split("><")] if received else []


@pytest.mark.parametrize("change", ["pause", "subscribe"])
def test_a_connection_not_yet_written_in_a_half_written_broadcast_catches_it_up_once(
    monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """Written straight to sockets over two turns: one whose turn has not come pauses (or subscribes) in between."""
    from test_hub import make_hub, msg, run

    monkeypatch.setattr(fanout, "SLICE", 4)
    monkeypatch.setattr(fanout, "CHECK_EVERY", 2)
    hub, clock = make_hub()
    conns = [_SocketConnection(hub, clock) for _ in range(8)]
    for conn in conns:
        hub.add(conn)
    hub.deliver([msg(1)])  # through the outboxes: from here on, straight to the sockets
    run(clock)
    assert all(c.outbox.direct is c.sock for c in conns)
    hub.deliver([msg(2), msg(3)])  # the first four connections now, the others next turn
    got = {c: c.numbers() for c in conns}
    early = [c for c in conns if got[c] == [1, 2, 3]]
    late = [c for c in conns if got[c] == [1]]
    assert len(early) == 4 and len(late) == 4, got
    for conn in (early[0], late[0]):
        if change == "pause":
            conn.outbox.pause()
            conn.outbox.resume()
        else:
            hub.subscribe(conn, "news")
    run(clock)
    hub.deliver([msg(4)])
    run(clock)
    for conn in conns:
        assert got[conn] + conn.numbers() == [1, 2, 3, 4], (conns.index(conn), got[conn])
        conn.sock.close()
        conn.client.close()


def test_a_batch_for_one_channel_goes_straight_to_its_subscribers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_hub import make_hub, msg, run

    hub, clock = make_hub()
    conns = [_SocketConnection(hub, clock) for _ in range(6)]
    for conn in conns:
        hub.add(conn)
    for conn in conns[:3]:
        hub.subscribe(conn, "news")
    hub.deliver([msg(1)])
    run(clock)
    assert all(c.outbox.direct is c.sock for c in conns)
    sends: list[int] = []
    real = FanOut._send_direct

    def counted(peers: list[Any], sockets: list[Any], blob: bytes, bid: int) -> int:
        sends.append(len(sockets))
        return real(peers, sockets, blob, bid)

    monkeypatch.setattr(FanOut, "_send_direct", staticmethod(counted))
    hub.deliver([msg(2, "news"), msg(3, "news")])
    hub.deliver([msg(4, "other")])
    hub.deliver([msg(5, "news"), msg(6)])  # two audiences: each connection's share through its outbox
    run(clock)
    assert sends == [3, 0]
    for conn in conns:
        assert conn.numbers() == ([1, 2, 3, 5, 6] if conn in conns[:3] else [1, 6])
        conn.sock.close()
        conn.client.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_no_message_follows_the_servers_close_frame(
    make_node: Any, queue: str, redis_sync: Any, secret_file: str
) -> None:
    """A connection the server closes (its token expired) gets nothing after its close frame, while it
    does not answer the close and broadcasts keep coming: leaving OPEN ends the fan-out's own writes."""
    node = await make_node(queue, token_secret_file=secret_file)
    r = await raw(node.port)
    r.send(upgrade_request(node.port, "/?token=" + token("alice", ttl=1.5)))
    await until(lambda: r.head is not None, what="the handshake")
    assert r.status == 101
    redis_sync.lpush(queue, "warm")
    await until(lambda: len(r.json_frames()) >= 1, what="the warm-up")
    for n in range(40):  # 2 s of broadcasts, through the expiry at 1.5 s
        redis_sync.lpush(queue, f"m{n}")
        await sleep(0.05)
    await until(lambda: any(op == 8 for op, _ in r.frames), what="the close frame")
    opcodes = [op for op, _ in r.frames]
    assert opcodes.index(8) == len(opcodes) - 1, opcodes  # the close frame is the last thing sent
    assert r.close_code() == 4003 and len(r.json_frames()) > 5
