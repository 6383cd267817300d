"""
Server-Sent Events in a real headless Chromium (the `browser` fixture):
the browser's own EventSource, and pushservice.js falling back to it when
the WebSocket cannot connect, each across a real twistd restart with
messages pushed while the node was down: every message once, in order.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from support.browser import offset_key, wait_for
from support.processes import free_port
from support.waiting import new_marker

pytestmark = pytest.mark.slow  # real Chromium and twistd: the quick loop skips them

# an EventSource of the page's own, recording what it gets
EVENT_SOURCE = """
window.got = []; window.opens = 0; window.resumed = [];
const es = window.es = new EventSource("/events?channels=news");
es.onmessage = (ev) => got.push(Object.assign(JSON.parse(ev.data), {lastEventId: ev.lastEventId}));
es.onopen = () => { opens += 1; };
es.addEventListener("resumed", (ev) => resumed.push(JSON.parse(ev.data)));
"""

# pushservice.js whose WebSocket URL has nothing listening: it must fall back to the stream
FALLBACK = """
window.got = []; window.opens = 0; window.resumed = []; window.errors = [];
const c = window.client = new PushService("ws://127.0.0.1:%d/", {
  channels: ["news"], sseUrl: location.origin + "/events", minDelay: 50, maxDelay: 400});
c.on("message", (content, msg) => got.push(msg));
c.on("open", () => { opens += 1; });
c.on("resumed", (f) => resumed.push(f));
c.on("error", (e) => errors.push(e.code));
"""


def got(driver: Any) -> list[dict[str, Any]]:
    return driver.execute_script("return window.got;")  # type: ignore[no-any-return]


def contents_until_marker(driver: Any, push: Any) -> list[Any]:
    marker = new_marker()
    push(marker)
    wait_for(driver, lambda d: marker in [m["content"] for m in got(d)], "the marker")
    shown = [m["content"] for m in got(driver)]
    return shown[: shown.index(marker)]


def restart_missing_nothing(driver: Any, proc: Any, redis_sync: Any, opens: str) -> list[dict[str, Any]]:
    """Push 3, restart the node, push 3 while it is down; the 6 arrive once, in order."""
    texts = [f"sse-{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    for t in texts[:3]:
        redis_sync.lpush(proc.queue, f'{{"content": "{t}", "channel": "news"}}')
    wait_for(driver, lambda d: len(got(d)) == 3, "the first 3 messages")
    proc.stop()
    for t in texts[3:]:
        redis_sync.lpush(proc.queue, f'{{"content": "{t}", "channel": "news"}}')
    proc.start()
    wait_for(driver, lambda d: d.execute_script(f"return {opens};") >= 2, "the stream to reconnect")
    shown = contents_until_marker(driver, lambda m: redis_sync.lpush(proc.queue, m))
    assert shown == texts, shown
    offsets = [offset_key(m["offset"]) for m in got(driver)[:6]]
    assert offsets == sorted(offsets) and len(set(offsets)) == 6
    return got(driver)[:6]


def test_event_source_across_a_restart_misses_nothing(browser, twistd_service, redis_sync):
    """The browser's EventSource reconnects by itself with Last-Event-ID and gets every message once, in order."""
    proc = twistd_service("--sse-retry", "0.3")
    browser.get(proc.url + "/")
    browser.execute_script(EVENT_SOURCE)
    wait_for(browser, lambda d: d.execute_script("return window.opens;") == 1, "the stream to open")
    messages = restart_missing_nothing(browser, proc, redis_sync, "window.opens")
    assert all(m["lastEventId"] == m["offset"] for m in messages)
    resumed = browser.execute_script("return window.resumed;")
    assert resumed == [{"type": "resumed", "since": messages[2]["offset"], "recovered": True}], resumed


def test_pushservice_js_falls_back_to_the_stream_and_resumes(browser, twistd_service, redis_sync):
    """With the WebSocket unreachable, pushservice.js streams over SSE, across a restart, missing nothing."""
    proc = twistd_service("--sse-retry", "0.3")
    browser.get(proc.url + "/")
    browser.execute_script(FALLBACK % free_port())
    wait_for(browser, lambda d: d.execute_script("return window.opens;") == 1, "the fallback stream to open")
    assert browser.execute_script("return window.client.transport;") == "sse"
    restart_missing_nothing(browser, proc, redis_sync, "window.opens")
    assert browser.execute_script("return window.client.transport;") == "sse"
    assert [r["recovered"] for r in browser.execute_script("return window.resumed;")] == [True]
    # subscribing reopens the stream with the channel, from the resume point
    browser.execute_script("window.sub = null; client.subscribe('sport').then((r) => { window.sub = r; });")
    wait_for(browser, lambda d: d.execute_script("return window.sub;") is not None, "subscribed over the stream")
    redis_sync.lpush(proc.queue, '{"content": "sport news", "channel": "sport"}')
    wait_for(browser, lambda d: "sport news" in [m["content"] for m in got(d)], "the new channel's message")
    publish = "window.pub = null; client.publish(1).catch((e) => { window.pub = e.code; });"
    browser.execute_script(publish)
    wait_for(browser, lambda d: d.execute_script("return window.pub;") == "unavailable", "publish refused")
