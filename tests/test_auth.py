"""Tokens, private channels, user addressing and origins, with real tokens, clients and Redis."""

from __future__ import annotations

import json
import time

import jwt
import pytest
import pytest_twisted
from support.clients import SECRET, Refused, connect, token
from support.waiting import timed

from pushservice.auth import AuthError, Grant, Policy, TokenVerifier, normalize_origin

# -- pure ---------------------------------------------------------------------


def test_verifier_accepts_a_good_token_and_reads_grants():
    """A valid HS256 token yields its user and channel patterns."""
    grant = TokenVerifier(SECRET).verify(token(channels=["private:a*"], publish=["news"]))
    assert grant.user == "alice" and grant.channels == ("private:a*",) and grant.publish == ("news",)


@pytest.mark.parametrize(
    "bad, why",
    [
        (token(exp=int(time.time()) - 10), "expired"),
        (token(secret=b"another-secret-0123456789abcdefgh"), "Signature"),
        (jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, None, algorithm="none"), "alg"),
        (token(sub=None), "sub"),
        (token(exp=None), "exp"),
        (token(channels="news"), "channels"),
        (token(sub=42), "ub"),
        ("not.a.token", "invalid"),
    ],
)
def test_verifier_rejects_bad_tokens(bad, why):
    """Expired, forged, unsigned, claim-less or malformed tokens are refused with a reason."""
    with pytest.raises(AuthError) as e:
        TokenVerifier(SECRET).verify(bad)
    assert why.lower() in str(e.value).lower()
    assert SECRET.decode() not in str(e.value)


def test_policy_private_channels_and_publish_modes():
    """private: channels need a matching grant; publishing follows the configured mode."""
    grant = Grant("u", time.time() + 60, channels=("private:team-*",), publish=("news.*",))
    on, off, by_token = Policy("on"), Policy("off"), Policy("token")
    assert on.may_subscribe(None, "news") and not on.may_subscribe(None, "private:team-1")
    assert on.may_subscribe(grant, "private:team-1") and not on.may_subscribe(grant, "private:other")
    assert on.may_publish(None, "news") and on.may_publish(None, None)
    assert not on.may_publish(grant, "private:team-1")
    assert not off.may_publish(grant, "news.x")
    assert by_token.may_publish(grant, "news.x") and not by_token.may_publish(grant, "sport")
    assert not by_token.may_publish(None, "news.x") and not by_token.may_publish(grant, None)


def test_origins_normalize_default_ports():
    """Origins compare as scheme://host:port, default ports made explicit."""
    assert normalize_origin("https://App.Example.com/") == "https://app.example.com:443"
    assert normalize_origin("http://localhost:8000") == "http://localhost:8000"
    assert normalize_origin("null") == "null"


# -- over the network ---------------------------------------------------------


async def refused(port: int, query: str = "", headers: dict | None = None) -> Refused:
    with pytest.raises(Refused) as e:
        await connect(port, query, headers=headers)
    return e.value


@pytest_twisted.ensureDeferred
async def test_handshake_rejects_bad_tokens_with_403(make_node, queue, secret_file):
    """A bad or expired token in the query is refused at the handshake with 403."""
    node = await make_node(queue, token_secret_file=secret_file)
    for bad in (token(exp=int(time.time()) - 5), token(secret=b"x" * 32), "garbage"):
        assert "403" in (await refused(node.port, f"token={bad}")).reason
    client = await connect(node.port, f"token={token()}")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_user_messages_reach_only_that_user(make_node, queue, secret_file, redis_sync):
    """An envelope with user reaches every connection of that user and nobody else."""
    node = await make_node(queue, token_secret_file=secret_file)
    alice1 = await connect(node.port, f"token={token(sub='alice')}")
    alice2 = await connect(node.port, f"token={token(sub='alice')}")
    bob = await connect(node.port, f"token={token(sub='bob')}")
    anon = await connect(node.port)
    redis_sync.lpush(queue, json.dumps({"content": "for alice", "user": "alice"}))
    redis_sync.lpush(queue, json.dumps({"content": "for all"}))
    for c in (alice1, alice2):
        assert (await c.next_of("message"))["content"] == "for alice"
    for c in (alice1, alice2, bob, anon):
        assert (await c.next_of("message"))["content"] == "for all"
        assert c.pending() == 0
        await c.close()


@pytest_twisted.ensureDeferred
async def test_private_channels_need_a_grant(make_node, queue, secret_file, redis_sync):
    """private: channels are refused without a matching grant, at the handshake and on subscribe."""
    node = await make_node(queue, token_secret_file=secret_file)
    assert "403" in (await refused(node.port, "channels=private:team-1")).reason
    anon = await connect(node.port)
    reply = await anon.request({"type": "subscribe", "channel": "private:team-1", "id": 7})
    assert reply["type"] == "error" and reply["code"] == "forbidden" and reply["id"] == 7
    member = await connect(node.port, f"token={token(channels=['private:team-*'])}")
    reply = await member.request({"type": "subscribe", "channel": "private:team-1", "id": 8})
    assert reply == {"type": "subscribed", "channel": "private:team-1", "id": 8}
    redis_sync.lpush(queue, json.dumps({"content": "secret", "channel": "private:team-1"}))
    assert (await member.next_of("message"))["content"] == "secret"
    assert anon.pending() == 0
    await anon.close()
    await member.close()


@pytest_twisted.ensureDeferred
async def test_required_token_via_auth_frame(make_node, queue, secret_file, redis_sync):
    """With --require-token, frames before auth are forbidden; an auth frame unlocks; no auth closes 4001."""
    node = await make_node(queue, token_secret_file=secret_file, require_token=True, auth_timeout=1.0)
    watcher = await connect(node.port, f"token={token(sub='w')}")
    client = await connect(node.port, "channels=news")
    redis_sync.lpush(queue, "not for strangers")
    assert (await watcher.next_of("message"))["content"] == "not for strangers"
    reply = await client.request({"type": "subscribe", "channel": "x", "id": 1})
    assert reply["code"] == "forbidden" and reply["id"] == 1, "no broadcast before auth"
    reply = await client.request({"type": "auth", "token": "bad", "id": 2})
    assert reply["code"] == "forbidden" and reply["id"] == 2
    assert (await client.request({"type": "auth", "token": token(), "id": 3})) == {"type": "ack", "id": 3}
    redis_sync.lpush(queue, json.dumps({"content": "hi", "channel": "news"}))
    assert (await client.next_of("message"))["content"] == "hi"
    silent = await connect(node.port)
    code, _ = await timed(silent.closed)
    assert code == 4001
    await client.close()
    await watcher.close()


@pytest_twisted.ensureDeferred
async def test_publish_permissions(make_node, queue, secret_file):
    """--client-publish token needs a publish grant; off forbids all client publishing."""
    node = await make_node(queue, token_secret_file=secret_file, client_publish="token")
    anon = await connect(node.port)
    reply = await anon.request({"type": "message", "content": 1, "channel": "news", "id": 1})
    assert reply["code"] == "forbidden"
    writer = await connect(node.port, f"token={token(publish=['news'])}")
    assert (await writer.request({"type": "message", "content": 1, "channel": "news", "id": 2})) == {
        "type": "ack",
        "id": 2,
    }
    reply = await writer.request({"type": "message", "content": 1, "channel": "sport", "id": 3})
    assert reply["code"] == "forbidden"
    closed = await make_node(f"{queue}-off", client_publish="off")
    c = await connect(closed.port)
    assert (await c.request({"type": "message", "content": 1, "id": 4}))["code"] == "forbidden"
    for x in (anon, writer, c):
        await x.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_token_expiry_closes_the_connection(make_node, queue, secret_file):
    """A connection is closed with 4003 when its token expires."""
    node = await make_node(queue, token_secret_file=secret_file)
    client = await connect(node.port, f"token={token(ttl=2)}")
    code, _ = await timed(client.closed)
    assert code == 4003


@pytest_twisted.ensureDeferred
async def test_allowed_origins(make_node, queue):
    """Browsers from other origins get 403; the allowed origin (default port implied) connects."""
    node = await make_node(queue, allowed_origins=("https://app.example.com",))
    assert "403" in (await refused(node.port, headers={"Origin": "https://evil.example.com"})).reason
    ok = await connect(node.port, headers={"Origin": "https://app.example.com"})
    await ok.close()


@pytest_twisted.ensureDeferred
async def test_user_messages_reach_the_user_on_every_node(make_node, queue, secret_file, redis_sync):
    """A user-addressed message reaches that user's connections on two nodes of one queue, and nobody else."""
    first = await make_node(queue, token_secret_file=secret_file)
    second = await make_node(queue, token_secret_file=secret_file)
    alice = [await connect(n.port, f"token={token(sub='alice')}") for n in (first, second)]
    bob = [await connect(n.port, f"token={token(sub='bob')}") for n in (first, second)]
    redis_sync.lpush(queue, json.dumps({"content": "hi alice", "user": "alice"}))
    redis_sync.lpush(queue, json.dumps({"content": "all"}))
    offsets = set()
    for c in alice:
        frame = await c.next_of("message")
        assert frame["content"] == "hi alice"
        offsets.add(frame["offset"])
    assert len(offsets) == 1, "one message, one offset on every node"
    for c in alice + bob:
        assert (await c.next_of("message"))["content"] == "all"
        assert c.pending() == 0
        await c.close()
