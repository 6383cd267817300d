"""
--workers without processes: the option, the handoff document, the restart
backoff, which endpoints can be shared, and how a worker's output becomes the
parent's log lines.
"""

from __future__ import annotations

import json
import socket

import pytest
from twisted.logger import LogLevel, eventAsJSON, formatEvent
from twisted.python import usage

from pushservice.config import Config, parse_redis_url
from pushservice.handoff import Handoff, Socket, TLSMaterial
from pushservice.service import PushService
from pushservice.tap import Options, makeService
from pushservice.workerprocess import MAX_LINE, WorkerProcess
from pushservice.workers import MAX_RESTART_DELAY, RESTART_DELAY, WorkerPool, restart_delay


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_workers_option_default_one_builds_a_node() -> None:
    """Without --workers the service is the node itself; --workers 3 builds a WorkerPool of 3."""
    assert isinstance(makeService(parse()), PushService)
    pool = makeService(parse("--workers", "3"))
    assert isinstance(pool, WorkerPool) and pool.config.workers == 3


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_workers_option_rejects_non_positive(value: str) -> None:
    """--workers takes a positive whole number; anything else is a usage error naming it."""
    with pytest.raises(usage.UsageError, match="--workers"):
        parse("--workers", value)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tls:/etc/pushservice/certs:port=8443",
        "ssl:8443:privateKey=k.pem:dhParameters=dh.pem",
        "ssl:8443:privateKey=k.pem:sslmethod=TLSv1_2_METHOD",
        "haproxy:ssl:8443:privateKey=k.pem",
    ],
)
def test_unshareable_endpoints_are_refused_with_workers(endpoint: str, tmp_path) -> None:
    """Endpoints a worker cannot rebuild from a socket and PEM text are a usage error with --workers > 1."""
    with pytest.raises(usage.UsageError, match="--listen") as raised:
        parse("--workers", "2", "--listen", endpoint)
    assert "worker" in str(raised.value) or "not a Twisted endpoint" in str(raised.value)


def test_handoff_round_trip_keeps_every_field() -> None:
    """A Handoff read back from its JSON equals the original: Config (sentinels too), sockets, TLS, secret."""
    redis = parse_redis_url("redis+sentinel://u:p%40ss@s1:26379,s2:26380/mymaster/3")
    config = Config(
        listen=("tcp:8000", "ssl:8443:privateKey=k.pem"),
        redis=redis,
        queue="jobs",
        allowed_origins=("https://a.example:443",),
        address_limits_exempt=("10.0.0.0/8", "unix"),
        require_token=True,
        token_secret_file="/etc/secret",
        workers=1,
    )
    tls = TLSMaterial("-----BEGIN PRIVATE KEY-----\n...", "-----BEGIN CERTIFICATE-----\n...", ("chain1", "chain2"))
    handoff = Handoff(
        number=2,
        parent_pid=1234,
        reactor="twisted.internet.epollreactor",
        config=config,
        sockets=(Socket(4, socket.AF_INET, "tcp:8000"), Socket(5, socket.AF_INET6, "ssl:8443", tls, haproxy=True)),
        token_secret=b"\x00s3cr\xffet\n",
        workers=3,
    )
    back = Handoff.from_json(handoff.to_json())
    assert back == handoff
    assert back.config.redis is not None and back.config.redis.sentinels == (("s1", 26379), ("s2", 26380))


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b'{"number": 1}', json.dumps({"x": 1}).encode()])
def test_handoff_refuses_what_is_not_one(data: bytes) -> None:
    """Anything but a whole handoff document is a ValueError, not a half-configured worker."""
    with pytest.raises(ValueError, match="not a worker handoff"):
        Handoff.from_json(data)


def test_restart_delay_doubles_while_workers_die_young_and_resets_after_a_stable_run() -> None:
    """Young deaths in a row wait 0.5, 1, 2, ... up to the cap; a worker that ran a while restarts quickly again."""
    delays, deaths = [], 0
    for _ in range(10):
        delay, deaths = restart_delay(0.2, deaths)
        delays.append(delay)
    assert delays[:4] == [RESTART_DELAY, 2 * RESTART_DELAY, 4 * RESTART_DELAY, 8 * RESTART_DELAY]
    assert delays[-1] == MAX_RESTART_DELAY and max(delays) == MAX_RESTART_DELAY
    assert restart_delay(3600.0, deaths) == (RESTART_DELAY, 1)


def _relay() -> tuple[WorkerProcess, list[dict], list[object]]:
    published: list[dict] = []
    ended: list[object] = []
    return WorkerProcess(7, lambda p, reason: ended.append(reason), published.append), published, ended


def test_worker_log_events_become_parent_events_prefixed_with_the_worker() -> None:
    """A JSON log event from fd 3 is published with its level and namespace, its text prefixed ``worker N:``."""
    relay, published, _ = _relay()
    event = {"log_format": "connected to {where}", "where": "redis", "log_level": LogLevel.warn, "log_namespace": "x.y"}
    line = eventAsJSON(event).encode() + b"\n"
    relay.childDataReceived(3, line[:10])  # a line may come in pieces
    assert published == []
    relay.childDataReceived(3, line[10:])
    assert len(published) == 1
    assert formatEvent(published[0]) == "worker 7: connected to redis"
    assert published[0]["log_level"] == LogLevel.warn and published[0]["log_namespace"] == "x.y"


def test_worker_raw_output_and_overlong_lines_are_logged_bounded(capture_log) -> None:  # type: ignore[no-untyped-def]
    """stderr lines are logged as errors of that worker; a line without end is cut at MAX_LINE; the rest flushes at exit."""
    relay, published, ended = _relay()
    relay.childDataReceived(2, b"Traceback (most recent call last):\nValueError: boom\n")
    relay.childDataReceived(3, b"not json at all\n")
    relay.childDataReceived(1, b"x" * (MAX_LINE + 10))
    relay.childDataReceived(1, b"tail without newline")
    relay.processEnded("the reason")
    texts = [(e["log_level"], formatEvent(e)) for e in capture_log]
    assert (LogLevel.error, "worker 7 (stderr): ValueError: boom") in texts
    assert (LogLevel.info, "worker 7: not json at all") in texts
    assert any(text == "worker 7: " + "x" * MAX_LINE for _, text in texts)
    assert any(text.endswith("tail without newline") for _, text in texts)
    assert published == [] and ended == ["the reason"]


@pytest.fixture
def capture_log():  # type: ignore[no-untyped-def]
    """The events logged through twisted.logger while the test runs."""
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_worker_pool_pickles_with_its_config_only() -> None:
    """pushservice-mktap --workers 2 can write a .tap: the pool pickles as its Config, nothing live."""
    import pickle

    pool = makeService(parse("--workers", "2", "--queue", "jobs"))
    back = pickle.loads(pickle.dumps(pool))
    assert isinstance(back, WorkerPool) and back.config == pool.config and back.pids == {}


def test_metrics_of_several_workers_merge_into_one_exposition() -> None:
    """Two workers' /metrics texts become one: each family's HELP and TYPE once, every worker's samples."""
    from prometheus_client.parser import text_string_to_metric_families

    from pushservice.metrics import Stats, render
    from pushservice.sharedmetrics import merge

    texts = []
    for number, connections in (("1", 3), ("2", 5)):
        stats = Stats()
        stats.labels = {"worker": number}
        stats.connections = connections
        stats.errors["forbidden"] = connections
        texts.append(render(stats))
    merged = merge(texts).decode()
    assert merged.count("# HELP pushservice_connections ") == 1
    assert merged.count("# TYPE pushservice_errors_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    by_worker = {s.labels["worker"]: s.value for s in families["pushservice_connections"].samples}
    assert by_worker == {"1": 3.0, "2": 5.0}
    errors = {(s.labels["worker"], s.labels["code"]): s.value for s in families["pushservice_errors"].samples}
    assert errors == {("1", "forbidden"): 3.0, ("2", "forbidden"): 5.0}
    assert merge([texts[0]]) == texts[0], "one worker's text comes back as it was"


def test_a_worker_whose_parent_does_not_read_its_log_never_blocks() -> None:
    """A full log pipe (a paused parent): lines wait up to MAX_HELD, then are dropped and counted, nothing blocks."""
    import os

    from twisted.logger import eventFromJSON

    from pushservice.workerprocess import MAX_HELD, ParentLog

    read_end, write_end = os.pipe()
    try:
        log = ParentLog(write_end)
        event = {"log_format": "line {i} " + "x" * 200, "log_level": None, "log_namespace": "t", "log_time": 1.0}
        for i in range(5000):  # ~1.2 MB: several times what the pipe and MAX_HELD hold together
            log({**event, "i": i})
        assert log.dropped > 0
        os.set_blocking(read_end, False)

        def drain() -> bytes:
            out = b""
            while True:
                try:
                    out += os.read(read_end, 1 << 16)
                except BlockingIOError:
                    return out

        received = b""
        for _ in range(100):  # the parent reads again: what waited goes out, then the note of what was dropped
            received += drain()
            log.flush()
        received += drain()
        lines = received.decode().splitlines()
        events = [eventFromJSON(line) for line in lines]  # whole lines only, never a cut one
        numbers = [e["i"] for e in events if "i" in e]
        assert numbers == list(range(len(numbers))), "what went out went out in order"
        assert len(received) > MAX_HELD
        notes = [e for e in events if "dropped" in e.get("log_format", "")]
        assert len(notes) == 1 and notes[0]["n"] == 5000 - len(numbers)
    finally:
        os.close(read_end)
        os.close(write_end)
