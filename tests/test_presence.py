"""
Presence across nodes (issue 13): the ``presence`` request, opt-in join/leave
events, grants, anonymous counts, one user in many tabs counted once, and a
node killed with -9 dropping out within the TTL. Two in-process nodes on one
real redis-server (quick), and real twistd processes for the kill (slow).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import pytest_twisted
from support.clients import Client, Refused, connect, token
from support.waiting import timed, until
from twisted.internet import threads

from pushservice.config import parse_redis_url

FAST = {"presence_flush": 0.05}


async def two_nodes(make_node: Any, queue: str, secret_file: str, **options: Any) -> tuple[Any, Any]:
    """Two nodes of one deployment (one queue), verifying tokens, flushing presence quickly."""
    config = {**FAST, "token_secret_file": secret_file, **options}
    return await make_node(queue, **config), await make_node(queue, **config)


async def user(port: int, sub: str | None, listen: str = "room", **claims: Any) -> Client:
    """A connection of C{sub} (None: anonymous) subscribed to C{listen} (channels) from its URL."""
    query = f"channels={listen}"
    if sub is not None:
        query += f"&token={token(sub, **claims)}"
    return await connect(port, query)


async def presence(client: Client, channel: str = "room", rid: int = 1, skip_events: bool = False) -> dict[str, Any]:
    """C{client}'s answer to a presence request for C{channel} (join/leave events before it kept, if C{skip_events})."""
    client.send({"id": rid, "type": "presence", "channel": channel})
    while True:
        frame = await client.next()
        if not (skip_events and frame["type"] in ("join", "leave")):
            return frame
        client.stashed = [*getattr(client, "stashed", []), frame]  # type: ignore[attr-defined]


def events(client: Client) -> list[dict[str, Any]]:
    """Every join/leave C{client} got and did not read yet (kept by L{presence} too), taken."""
    stashed, client.stashed = getattr(client, "stashed", []), []  # type: ignore[attr-defined]
    return [f for f in [*stashed, *client.drain()] if f["type"] in ("join", "leave")]


async def settled(
    client: Client, users: list[str], anonymous: int | None = None, channel: str = "room", skip_events: bool = False
) -> None:
    """Wait until C{channel}'s presence, asked by C{client}, is C{users} (and C{anonymous})."""

    async def right() -> bool:
        reply = await presence(client, channel, skip_events=skip_events)
        if reply["type"] == "error" and reply["code"] == "unavailable":
            return False  # Redis coming back
        assert reply["type"] == "presence", reply
        return reply["users"] == users and (anonymous is None or reply["anonymous"] == anonymous)

    await until(right, 10, f"presence of {channel} = {users}, anonymous {anonymous}", interval=0.05)


async def watcher(port: int, sub: str, channel: str = "room", **claims: Any) -> Client:
    """A connection of C{sub} subscribed to C{channel} with presence events."""
    client = await connect(port, f"token={token(sub, **claims)}")
    reply = await client.request({"id": "w", "type": "subscribe", "channel": channel, "presence": True})
    assert reply == {"type": "subscribed", "channel": channel, "id": "w"}, reply
    return client


@pytest_twisted.ensureDeferred
async def test_presence_lists_users_of_every_node_and_forgets_who_left(make_node, queue, secret_file):
    """Users on two nodes are listed by a presence request on either; one who leaves is gone from both."""
    a, b = await two_nodes(make_node, queue, secret_file)
    alice, bob = await user(a.port, "alice"), await user(b.port, "bob")
    reply = await presence(alice)
    assert reply["channel"] == "room" and reply["id"] == 1 and reply["user_count"] >= 1
    await settled(alice, ["alice", "bob"], 0)
    await settled(bob, ["alice", "bob"], 0)
    await bob.close()
    await settled(alice, ["alice"], 0)
    await alice.close()


@pytest_twisted.ensureDeferred
async def test_a_connection_sees_itself_at_once(make_node, queue, secret_file):
    """A presence request right after subscribing includes the asker: the node writes its changes first."""
    a, _ = await two_nodes(make_node, queue, secret_file, presence_flush=30)
    carol = await connect(a.port, f"token={token('carol')}")
    assert (await carol.request({"type": "subscribe", "channel": "lobby"}))["type"] == "subscribed"
    reply = await presence(carol, "lobby")
    assert reply["users"] == ["carol"] and reply["user_count"] == 1, reply
    await carol.close()


@pytest_twisted.ensureDeferred
async def test_anonymous_connections_are_counted_not_listed(make_node, queue, secret_file):
    """Anonymous connections on both nodes are a count; connections on other channels do not count."""
    a, b = await two_nodes(make_node, queue, secret_file)
    anonymous = [await user(a.port, None), await user(b.port, None), await user(b.port, None)]
    elsewhere = await user(a.port, None, "other")
    await settled(elsewhere, [], 3)
    await settled(elsewhere, [], 1, channel="other")
    await anonymous[0].close()
    await settled(elsewhere, [], 2)
    for client in [*anonymous[1:], elsewhere]:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_one_user_in_many_tabs_is_one_user_and_leaves_with_its_last_tab(make_node, queue, secret_file):
    """Tabs of one user on two nodes: listed once, one join event, the leave only when its last tab goes."""
    a, b = await two_nodes(make_node, queue, secret_file)
    watching = await watcher(a.port, "watcher")
    assert await watching.next_of("join") == {"type": "join", "channel": "room", "user": "watcher"}
    tabs = [await user(a.port, "dave"), await user(b.port, "dave"), await user(b.port, "dave")]
    assert await watching.next_of("join") == {"type": "join", "channel": "room", "user": "dave"}
    await settled(watching, ["dave", "watcher"])
    reply = await presence(watching)
    assert reply["user_count"] == 2, reply
    for tab in tabs[:2]:
        await tab.close()
    await settled(watching, ["dave", "watcher"])  # its last tab is still there
    assert watching.pending() == 0, watching.drain()
    await tabs[2].close()
    assert await watching.next_of("leave") == {"type": "leave", "channel": "room", "user": "dave"}
    await settled(watching, ["watcher"])
    assert watching.pending() == 0, watching.drain()
    await watching.close()


@pytest_twisted.ensureDeferred
async def test_events_go_only_to_subscribers_that_asked(make_node, queue, secret_file):
    """Join/leave events reach subscribers with presence true, not plain subscribers, not other channels."""
    a, b = await two_nodes(make_node, queue, secret_file)
    plain = await user(a.port, "plain")
    other = await watcher(b.port, "other", channel="elsewhere")
    assert (await other.next_of("join"))["user"] == "other"
    watching = await watcher(b.port, "watcher")
    assert (await watching.next_of("join"))["user"] == "watcher"
    erin = await user(a.port, "erin")
    assert await watching.next_of("join") == {"type": "join", "channel": "room", "user": "erin"}
    await erin.close()
    assert await watching.next_of("leave") == {"type": "leave", "channel": "room", "user": "erin"}
    # subscribing again without presence stops the events
    again = await watching.request({"type": "subscribe", "channel": "room"})
    assert again["type"] == "subscribed"
    frank = await user(a.port, "frank")
    await settled(watching, ["frank", "plain", "watcher"])
    for client in (plain, other, watching):
        assert client.drain() == [], client
    for client in (plain, other, watching, frank):
        await client.close()


@pytest_twisted.ensureDeferred
async def test_private_channel_presence_needs_the_grant(make_node, queue, secret_file):
    """Presence of a private channel, asked or subscribed to, is refused without the grant and given with it."""
    a, b = await two_nodes(make_node, queue, secret_file)
    member = await user(b.port, "hr-lead", "private:hr", channels=["private:hr"])
    for outsider in (await connect(a.port), await connect(a.port, f"token={token('mallory')}")):
        reply = await outsider.request({"id": 7, "type": "presence", "channel": "private:hr"})
        assert reply["type"] == "error" and reply["code"] == "forbidden" and reply["id"] == 7, reply
        sub = {"id": 8, "type": "subscribe", "channel": "private:hr", "presence": True}
        reply = await outsider.request(sub)
        assert reply["type"] == "error" and reply["code"] == "forbidden", reply
        await outsider.close()
    granted = await connect(a.port, f"token={token('auditor', channels=['private:*'])}")
    await settled(granted, ["hr-lead"], 0, channel="private:hr")
    await granted.close()
    await member.close()


@pytest_twisted.ensureDeferred
async def test_bad_presence_frames_are_refused(make_node, queue, secret_file):
    """A presence request without a valid channel, or a presence flag that is not a boolean, gets bad_request."""
    a, _ = await two_nodes(make_node, queue, secret_file)
    client = await connect(a.port)
    for frame in (
        {"id": 1, "type": "presence"},
        {"id": 1, "type": "presence", "channel": "a*"},
        {"id": 1, "type": "presence", "channel": 5},
        {"id": 1, "type": "subscribe", "channel": "room", "presence": "yes"},
    ):
        reply = await client.request(frame)
        assert reply["type"] == "error" and reply["code"] == "bad_request" and reply["id"] == 1, (frame, reply)
    assert (await presence(client))["type"] == "presence"  # and the connection lives on
    await client.close()


@pytest_twisted.ensureDeferred
async def test_presence_lists_at_most_the_configured_users(make_node, queue, secret_file):
    """Past --presence-max-users the reply lists that many, counts all, and says truncated."""
    a, _ = await two_nodes(make_node, queue, secret_file, presence_max_users=2)
    clients = [await user(a.port, f"u{i}") for i in range(4)]
    reply = await presence(clients[0])
    assert reply["user_count"] == 4 and len(reply["users"]) == 2 and reply["truncated"] is True, reply
    for client in clients:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_stopped_node_takes_its_users_out_at_once(make_node, queue, secret_file):
    """A node stopped cleanly writes its connections' leaves: watchers elsewhere get them without waiting for the TTL."""
    a, b = await two_nodes(make_node, queue, secret_file)
    watching = await watcher(a.port, "watcher")
    assert (await watching.next_of("join"))["user"] == "watcher"
    await user(b.port, "gina")
    assert (await watching.next_of("join"))["user"] == "gina"
    started = time.monotonic()
    await timed(b.stop(), 30)
    assert await watching.next_of("leave") == {"type": "leave", "channel": "room", "user": "gina"}
    assert time.monotonic() - started < 5
    await settled(watching, ["watcher"])
    await watching.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_node_killed_with_sigkill_drops_out_within_the_ttl(twistd_service, secret_file, queue):
    """Two twistd nodes; one killed with -9: within --presence-ttl and a third, its users leave and are not listed."""
    ttl = 1.5
    options = ("--token-secret-file", secret_file, "--presence-ttl", str(ttl), "--presence-flush", "0.05")
    a = twistd_service(*options, queue=queue)
    b = twistd_service(*options, queue=queue)
    watching = await watcher(a.port, "watcher")
    assert (await watching.next_of("join"))["user"] == "watcher"
    await user(b.port, "henry")
    await user(b.port, "watcher")  # also on the killed node: the watcher stays, on node a
    assert (await watching.next_of("join"))["user"] == "henry"
    await settled(watching, ["henry", "watcher"])
    killed = time.monotonic()
    b.kill()  # SIGKILL: nothing written on the way out
    leave = await watching.next_of("leave", timeout=ttl * 4 / 3 + 5)
    assert leave == {"type": "leave", "channel": "room", "user": "henry"}
    took = time.monotonic() - killed
    assert took <= ttl * 4 / 3 + 1.5, took
    await settled(watching, ["watcher"], 0)
    assert watching.drain() == []
    await watching.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_presence_comes_back_after_redis_loses_everything(make_node, own_redis, queue, secret_file):
    """Redis killed and restarted empty: presence requests say unavailable meanwhile, then every node writes its part again."""
    own = own_redis()
    a, b = await two_nodes(
        make_node, queue, secret_file, redis=parse_redis_url(own.url), presence_ttl=1.5, redis_timeout=1
    )
    watching = await watcher(a.port, "watcher")
    ivy = await user(b.port, "ivy")
    await settled(watching, ["ivy", "watcher"], 0, skip_events=True)
    await threads.deferToThread(own.stop, signal.SIGKILL)
    reply = await presence(watching, skip_events=True)
    assert reply["type"] == "error" and reply["code"] == "unavailable", reply
    await threads.deferToThread(own.start)  # empty: nothing was saved
    await settled(watching, ["ivy", "watcher"], 0, skip_events=True)
    seen = events(watching)

    def both_in() -> bool:
        seen.extend(events(watching))
        last = {f["user"]: f["type"] for f in seen}  # events during the outage may come and go: the last ones count
        return all(last.get(u, "join") == "join" for u in ("ivy", "watcher"))

    await until(both_in, 10, "the last events say both are in")
    await ivy.close()
    await until(lambda: {"type": "leave", "channel": "room", "user": "ivy"} in events(watching), 10, "ivy's leave")
    await watching.close()


@pytest_twisted.ensureDeferred
async def test_a_sub_that_is_not_unicode_is_refused(make_node, queue, secret_file):
    """A token whose sub is a lone surrogate escape is refused: presence never has to store a user Redis cannot hold."""
    a, _ = await two_nodes(make_node, queue, secret_file)
    with pytest.raises(Refused) as refused:
        await user(a.port, "\ud800")
    assert "403" in refused.value.reason
    client = await connect(a.port, "auth=1&channels=room")
    reply = await client.request({"id": 1, "type": "auth", "token": token("\ud800x")})
    assert reply["type"] == "error" and reply["code"] == "forbidden" and "Unicode" in reply["message"], reply
    await client.close()


def script_calls(redis_sync: Any) -> int:
    """How many Lua scripts Redis ran so far (EVAL and EVALSHA)."""
    stats = redis_sync.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


@pytest_twisted.ensureDeferred
async def test_redis_traffic_does_not_grow_with_connections(make_node, queue, secret_file, redis_sync):
    """200 users joining one node cost a few coalesced writes, not one per connection; so do their leaves."""
    a = await make_node(queue, token_secret_file=secret_file, presence_flush=0.2)
    before = script_calls(redis_sync)
    clients = [await user(a.port, f"u{i}") for i in range(200)]
    reply = await presence(clients[0])
    assert reply["user_count"] == 200, reply
    joined = script_calls(redis_sync) - before
    for client in clients:
        client.sendClose(1000)
    await until(lambda: a.stats.connections == 0, 10, "every connection closed")
    await a.parts.factory.node.presence.store.flush()
    left = script_calls(redis_sync) - before - joined
    # flushes every 0.2 s while connecting, the presence query, a heartbeat or two
    assert joined < 40 and left < 10, (joined, left)
    assert (await presence(await user(a.port, "last")))["users"] == ["last"]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_silent_pubsub_connection_is_noticed(make_node, redis_server, queue, secret_file):
    """The events connection going silent (no FIN, no RST) is pinged, dropped and made again: events flow on."""
    from support.proxy import SilentProxy

    proxy = SilentProxy(redis_server.port)
    try:
        options = {"presence_ttl": 1.5, "redis_timeout": 1}
        a = await make_node(
            queue,
            **FAST,
            **options,
            token_secret_file=secret_file,
            redis=parse_redis_url(f"redis://127.0.0.1:{proxy.port}/0"),
        )
        b = await make_node(queue, **FAST, **options, token_secret_file=secret_file)
        watching = await watcher(a.port, "watcher")
        assert (await watching.next_of("join"))["user"] == "watcher"
        assert proxy.silence() == 4  # requests, mover, tailer, presence events
        kate = await user(b.port, "kate")
        # noticed within a third of the TTL plus the Redis timeout, not TCP keepalive's 25 s
        assert await watching.next_of("join", timeout=8) == {"type": "join", "channel": "room", "user": "kate"}
        await kate.close()
        await watching.close()
    finally:
        proxy.stop()
