"""
permessage-deflate (RFC 7692), in-process against a real redis-server: what
is negotiated with which offer, that compressing and plain clients get every
message once and in order (live, catching up, resuming, across a restart),
and that a zip bomb costs its sender the connection and nobody else anything.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import pytest_twisted
from support.clients import connect
from support.deflating import (
    bomb_frame,
    inflate,
    offer_request,
    read_frames,
    response_extensions,
    slow_reader,
    take_frames,
    websockets_session,
)
from support.raw import raw, ws_frame
from support.waiting import timed, until
from twisted.internet import threads

from pushservice.deflate import deflate_frame, deflated_join
from pushservice.logentry import Message
from pushservice.wire import text_frame

# Offers as real clients send them: Chromium and Node's ws, Python websockets (same), Firefox, and explicit ones.
CHROMIUM = "permessage-deflate; client_max_window_bits"
FIREFOX = "permessage-deflate"
BOTH_NO_TAKEOVER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
CLIENT_WINDOW_10 = "permessage-deflate; client_max_window_bits=10"
SERVER_WINDOW_15 = "permessage-deflate; server_max_window_bits=15; client_max_window_bits"


def json_item(size: int, n: int) -> str:
    """A JSON envelope of about C{size} bytes, different for each C{n} (so it compresses like real data)."""
    rng = random.Random(n)
    words = ["price", "symbol", "ACME", "volume", "bid", "ask", "status", "ok", "update", "item"]
    text = ""
    while len(text) < size - 40:
        text += f" {rng.choice(words)}{rng.randint(0, 999)}"
    return json.dumps({"content": {"n": n, "text": text}})


def items(count: int) -> list[str]:
    """C{count} items, 64-byte and 2 KB ones alternating."""
    return [json_item(64 if n % 2 else 2048, n) for n in range(count)]


# -- the compressed frames -----------------------------------------------------------


@pytest.mark.parametrize("size", [60, 2048, 70_000])
def test_compressed_frame_inflates_to_the_payload(size):
    """A frame's compressed form has RSV1 set, the same opcode, and inflates to the same payload."""
    payload = json_item(size, 1).encode()
    (op, rsv1, body), *rest = take_frames(bytearray(deflate_frame(text_frame(payload))))
    assert not rest and op == 1 and rsv1
    assert inflate(body) == payload


def test_each_message_of_a_batch_inflates_on_its_own():
    """Messages compressed as one batch share nothing: each inflates with a fresh inflater, whatever came before."""
    payloads = [json_item(300, 7).encode()] * 3 + [json_item(2048, 8).encode()]
    messages = [Message((1, n), None, None, text_frame(p)) for n, p in enumerate(payloads)]
    frames = take_frames(bytearray(deflated_join(messages)))
    assert [inflate(body) for _, _, body in frames] == payloads
    assert all(rsv1 for _, rsv1, _ in frames)
    assert [m.deflated for m in messages] == [deflate_frame(m.frame) for m in messages], "kept, same bytes"


def test_a_message_that_would_not_shrink_goes_plain():
    """A payload deflate cannot shrink is sent as its plain frame (RSV1 clear), as RFC 7692 allows."""
    for payload in (b'"ok"', b'{"type":"ack","id":7}'):
        frame = text_frame(payload)
        assert deflate_frame(frame) is frame


# -- negotiation ----------------------------------------------------------------------


async def handshake(port: int, offer: str) -> str | None:
    client = await raw(port)
    client.send(offer_request(port, offer))
    await until(lambda: client.head is not None or client.lost, what="handshake response")
    assert client.status == 101, client.head
    client.abort()
    return response_extensions(client.head or b"")


async def pushed_through_websockets(url: str, redis_sync: Any, queue: str, pushed: list[str]) -> tuple[Any, list[Any]]:
    """A C{websockets} client's negotiated extensions and the contents of C{pushed}, LPUSHed once it connected."""

    def script(recv: Any) -> list[Any]:
        redis_sync.lpush(queue, *pushed)
        return [recv()["content"] for _ in pushed]

    return await timed(threads.deferToThread(websockets_session, url, script), 20)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("offer", [CHROMIUM, FIREFOX, BOTH_NO_TAKEOVER, CLIENT_WINDOW_10, SERVER_WINDOW_15])
async def test_offers_of_browsers_and_libraries_are_accepted(node, offer):
    """Each common offer is accepted, saying both sides keep no context between messages."""
    answer = await handshake(node.port, offer)
    assert answer is not None and answer.startswith("permessage-deflate")
    params = {p.strip() for p in answer.split(";")[1:]}
    assert {"server_no_context_takeover", "client_no_context_takeover"} <= params
    assert not any(p.startswith("server_max_window_bits") and p != "server_max_window_bits=15" for p in params)


@pytest_twisted.ensureDeferred
async def test_an_offer_for_a_smaller_server_window_is_declined_for_the_next(node):
    """An offer asking for a window under 32 KiB is declined; a next acceptable offer in the list is taken."""
    assert await handshake(node.port, "permessage-deflate; server_max_window_bits=10") is None
    answer = await handshake(node.port, "permessage-deflate; server_max_window_bits=10, " + CHROMIUM)
    assert answer is not None and "server_max_window_bits" not in answer


@pytest_twisted.ensureDeferred
async def test_no_compression_option_declines_every_offer(make_node, queue, redis_sync):
    """With --no-compression no offer is accepted, and a client that offered one gets plain messages."""
    node = await make_node(queue, compression=False)
    assert await handshake(node.port, CHROMIUM) is None
    url = f"ws://127.0.0.1:{node.port}/"
    pushed = items(4)
    extensions, got = await pushed_through_websockets(url, redis_sync, queue, pushed)
    assert extensions is None and got == [json.loads(i)["content"] for i in pushed]


# -- delivery to compressing clients ---------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("compression", ["deflate", None])
async def test_websockets_client_gets_every_message_once_in_order(node, queue, compression):
    """The websockets client, compressing or declining, gets every 64 B and 2 KB message intact, once, in order."""
    from redis import Redis

    # broadcasts and channel messages, 64 B and 2 KB, mixed in each batch
    pushed = [i if k % 3 else json.dumps({**json.loads(i), "channel": "news"}) for k, i in enumerate(items(400))]
    url = f"ws://127.0.0.1:{node.port}/?channels=news"
    host, port = "127.0.0.1", node.config.redis.port

    def script(recv):
        r = Redis(host=host, port=port, socket_timeout=10)
        for n in range(0, len(pushed), 50):
            r.lpush(queue, *pushed[n : n + 50])
        r.close()
        return [recv() for _ in pushed]

    extensions, frames = await timed(threads.deferToThread(websockets_session, url, script, compression), 30)
    assert (extensions is not None and extensions.startswith("permessage-deflate")) == (compression is not None)
    assert [f["content"] for f in frames] == [json.loads(i)["content"] for i in pushed]
    assert [f["channel"] for f in frames] == [None if k % 3 else "news" for k in range(len(pushed))]
    offsets = [tuple(map(int, f["offset"].split("-"))) for f in frames]
    assert offsets == sorted(set(offsets))


@pytest_twisted.ensureDeferred
async def test_compressing_and_plain_clients_share_a_mixed_batch(node, redis_sync):
    """In one batch of broadcasts, channel and user messages, a compressing and a plain client get the same stream."""
    from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept

    offers = {
        "perMessageCompressionOffers": [PerMessageDeflateOffer()],
        "perMessageCompressionAccept": lambda response: PerMessageDeflateResponseAccept(response),
    }
    packed = await connect(node.port, "channels=news", options=offers)
    plain = await connect(node.port, "channels=news")
    mixed = [json.dumps({"content": k, "channel": ["news", "other", None][k % 3]}) for k in range(60)]
    redis_sync.lpush(
        node.config.queue,
        *(json.dumps({"content": json_item(2048, k)}) if k % 7 == 0 else i for k, i in enumerate(mixed)),
    )
    expected = 60 - 20  # the "other" channel is neither's
    a, b = await packed.messages(expected), await plain.messages(expected)
    assert [f["content"] for f in a] == [f["content"] for f in b]
    assert packed._perMessageCompress is not None and plain._perMessageCompress is None
    await packed.close()
    await plain.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_raw_frames_are_compressed_and_a_slow_reader_catches_up_with_valid_ones(make_node, queue, redis_sync):
    """A compressing client that stops reading catches up from history with compressed frames that each inflate alone."""
    node = await make_node(queue, history_bytes=64 << 20)
    reader = await timed(threads.deferToThread(slow_reader, node.port, CHROMIUM))
    # ~13 MB plain, ~6 MB compressed: far past the socket buffers and --slow-client-bytes' floor
    pushed = [json_item(16384, n) for n in range(800)] + items(200)
    for n in range(0, len(pushed), 100):
        redis_sync.lpush(queue, *pushed[n : n + 100])
    await until(lambda: node.hub.peers and not next(iter(node.hub.peers)).outbox.live, what="the client to fall behind")
    frames = await timed(threads.deferToThread(read_frames, reader, len(pushed)), 40)
    assert all(op == 1 for op, _, _ in frames), [op for op, _, _ in frames if op != 1]
    contents = [json.loads(inflate(body) if rsv1 else body)["content"] for _, rsv1, body in frames]
    assert contents == [json.loads(i)["content"] for i in pushed]
    assert all(rsv1 for _, rsv1, _ in frames), "every one of these JSON messages shrinks"


@pytest_twisted.ensureDeferred
async def test_resume_across_a_restart_with_compression(make_node, queue, redis_sync):
    """A compressing client resumes with since= on a restarted node: the rest once, in order, then live."""
    node = await make_node(queue)
    url = f"ws://127.0.0.1:{node.port}/"
    first, later, live = items(30), items(60)[30:], [json_item(2048, 99)]

    def before(recv):
        redis_sync.lpush(queue, *first)
        return [recv() for _ in first]

    _, seen = await timed(threads.deferToThread(websockets_session, url, before), 20)
    await node.stop()
    redis_sync.lpush(queue, *later)  # while no node runs
    node = await make_node(queue)
    url = f"ws://127.0.0.1:{node.port}/?since={seen[9]['offset']}"

    def after(recv):
        frames = [recv() for _ in range(20 + len(later) + 1)]  # replay, resumed answer, then live
        redis_sync.lpush(queue, *live)
        return frames + [recv()]

    extensions, frames = await timed(threads.deferToThread(websockets_session, url, after), 30)
    assert extensions is not None and extensions.startswith("permessage-deflate")
    kinds = [f["type"] for f in frames]
    resumed = frames.pop(kinds.index("resumed"))
    assert resumed["recovered"] is True
    assert [f["content"] for f in frames] == [json.loads(i)["content"] for i in first[10:] + later + live]


# -- client frames ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_compressed_client_publishes_are_read_one_after_another(node, queue, redis_sync):
    """A compressing client's publishes are inflated, acked and delivered, each one (no context kept between them)."""
    url = f"ws://127.0.0.1:{node.port}/"
    sent = [json_item(2048, k) for k in range(3)]

    def script(recv):
        for k, content in enumerate(sent):
            recv.send(json.dumps({"type": "message", "content": content, "id": k}))
        return [recv() for _ in range(2 * len(sent))]  # an ack and the broadcast back, for each

    extensions, frames = await timed(threads.deferToThread(websockets_session, url, script), 20)
    assert extensions is not None
    assert sorted(f["id"] for f in frames if f["type"] == "ack") == [0, 1, 2]
    assert [f["content"] for f in frames if f["type"] == "message"] == sent


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_zip_bomb_is_closed_with_1009_and_others_go_on(make_node, queue, redis_sync):
    """A frame inflating past --max-frame-size closes its sender with 1009; another compressing client is served."""
    node = await make_node(queue, max_frame_size=64 * 1024)
    bomber = await raw(node.port)
    bomber.send(offer_request(node.port, CHROMIUM))
    await until(lambda: bomber.head is not None, what="handshake")
    bomb = bomb_frame(64 << 20)  # 64 MiB of spaces in ~64 KB, under the frame limit on the wire
    assert len(bomb) < 64 * 1024
    bomber.send(bomb)
    await until(lambda: bomber.close_code() is not None or bomber.lost, what="the bomber's close")
    assert bomber.close_code() == 1009
    url = f"ws://127.0.0.1:{node.port}/"
    pushed = items(10)
    extensions, got = await pushed_through_websockets(url, redis_sync, queue, pushed)
    assert extensions is not None and got == [json.loads(i)["content"] for i in pushed]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_corrupt_compressed_frame_is_closed_with_1007(node):
    """A compressed frame that does not inflate closes its sender with 1007 (invalid payload)."""
    client = await raw(node.port)
    client.send(offer_request(node.port, CHROMIUM))
    await until(lambda: client.head is not None, what="handshake")
    garbage = bytearray(ws_frame(b"\xff\xff\xff\xff not deflate"))
    garbage[0] |= 0x40  # RSV1: "compressed"
    client.send(bytes(garbage))
    await until(lambda: client.close_code() is not None or client.lost, what="the close")
    assert client.close_code() == 1007


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "offer", ["permessage-deflate; client_max_window_bits=99", "permessage-deflate; foo=bar", "x-webkit-deflate-frame"]
)
async def test_a_malformed_or_unknown_offer_costs_nothing_else(node, redis_sync, offer):
    """An offer RFC 7692 does not allow is refused with 400 saying why (Autobahn's rule), an unknown one ignored."""
    client = await raw(node.port)
    client.send(offer_request(node.port, offer))
    await until(lambda: client.head is not None or client.lost, what="handshake response")
    if offer.startswith("permessage-deflate"):
        assert client.status == 400 and b"illegal extension parameter" in (client.head or b""), client.head
    else:
        assert client.status == 101 and response_extensions(client.head or b"") is None
    client.abort()
    assert await handshake(node.port, CHROMIUM) is not None, "the next client is served as before"
