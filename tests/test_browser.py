"""The demo page and pushservice.js, driven in a real headless Chromium.

Uses Debian's /usr/bin/chromium and /usr/bin/chromedriver through Selenium
(the `browser` fixture, tests/support/browser.py); nothing here ever
downloads a browser or a driver (skips when they are missing). "Nothing
more arrived" is a marker pushed last and shown on the page, never a sleep.
"""

import functools
import json
import time
import uuid

import pytest
from support.browser import (
    by_id,
    messages_in,
    offset_key,
    open_demo,
    opens,
    page_messages,
    page_notices,
    page_state,
    sockets,
    wait_for,
)
from support.clients import token
from support.waiting import new_marker, until_sync

pytestmark = pytest.mark.slow  # real Chromium and twistd: the quick loop skips them


def shown_until_marker(driver, push):
    """Push a marker broadcast last (with push); once the page shows it, every message shown before it."""
    marker = new_marker()
    push(marker)
    wait_for(driver, lambda d: marker in [m["content"] for m in page_messages(d)], "the marker to show")
    shown = page_messages(driver)
    assert shown[-1]["content"] == marker, shown
    return shown[:-1]


def test_redis_push_shows_on_page(browser, twistd_service, redis_sync):
    """An item LPUSHed on the queue appears on the open demo page as a .message."""
    proc = twistd_service()
    open_demo(browser, proc)
    redis_sync.lpush(proc.queue, "hello from redis")
    wait_for(
        browser,
        lambda d: any(m["content"] == "hello from redis" for m in page_messages(d)),
        "the pushed message to show",
    )
    [msg] = page_messages(browser)
    assert msg["offset"], "every shown message carries its offset"
    assert msg["channel"] == "", "a plain item is a broadcast (channel null)"


def test_publish_from_form_is_acked_and_broadcast_back(browser, twistd_service):
    """A message sent from the page's form is acked and comes back to the sender."""
    proc = twistd_service()
    open_demo(browser, proc)
    text = "from the form " + uuid.uuid4().hex[:8]
    by_id(browser, "content").send_keys(text)
    by_id(browser, "send").click()
    result = wait_for(
        browser,
        lambda d: by_id(d, "publish-result").text.startswith(("ack", "error")),
        "the publish result",
    )
    assert result and by_id(browser, "publish-result").text.startswith("ack")
    wait_for(
        browser, lambda d: any(m["content"] == text for m in page_messages(d)), "the published message to come back"
    )
    assert [m["content"] for m in page_messages(browser)].count(text) == 1


def test_reconnect_across_restart_misses_nothing(browser, twistd_service, redis_sync):
    """Across a server restart the page reconnects and shows every message exactly once, in order."""
    proc = twistd_service()
    open_demo(browser, proc)
    browser.execute_script("window.resumed = []; ps.on('resumed', (f) => resumed.push(f));")
    assert opens(browser) == 1
    texts = ["restart-%d-%s" % (i, uuid.uuid4().hex[:6]) for i in range(6)]
    for t in texts[:3]:
        redis_sync.lpush(proc.queue, t)
    wait_for(browser, lambda d: len(page_messages(d)) == 3, "the first 3 messages")

    proc.restart()
    # Pushed at once: the page is most likely still backing off, so these
    # reach it through the `since` replay (or live, if it is already back).
    for t in texts[3:]:
        redis_sync.lpush(proc.queue, t)
    wait_for(browser, lambda d: opens(d) >= 2 and page_state(d) == "open", "the page to reconnect")
    wait_for(browser, lambda d: len(page_messages(d)) >= 6, "all 6 messages")
    # a late duplicate (a replay overlapping live traffic) would show before a marker pushed now
    shown = shown_until_marker(browser, functools.partial(redis_sync.lpush, proc.queue))
    assert [m["content"] for m in shown] == texts, shown
    offsets = [offset_key(m["offset"]) for m in shown]
    assert offsets == sorted(offsets) and len(set(offsets)) == 6, shown
    resumed = browser.execute_script("return window.resumed;")
    assert [r["recovered"] for r in resumed] == [True], resumed
    assert page_notices(browser) == [], "a complete replay is no gap"


def test_token_goes_in_first_frame_never_in_url(browser, twistd_service, redis_sync, secret_file):
    """With a token the page connects with auth=1, sends the token in a first auth frame, and gets its user's messages."""
    proc = twistd_service("--token-secret-file", secret_file, "--require-token")
    alice = token("alice")
    open_demo(browser, proc, "#token=" + alice)
    redis_sync.lpush(proc.queue, json.dumps({"content": "for bob", "user": "bob"}))
    redis_sync.lpush(proc.queue, json.dumps({"content": "for alice", "user": "alice"}))
    wait_for(browser, lambda d: any(m["content"] == "for alice" for m in page_messages(d)), "alice's message")

    seen = sockets(browser)
    assert len(seen["urls"]) == 1 and "auth=1" in seen["urls"][0], seen["urls"]
    assert not any(alice in url or "token=" in url for url in seen["urls"]), seen["urls"]
    assert json.loads(seen["sent"][0]) == {"id": 1, "type": "auth", "token": alice}
    assert json.loads(seen["received"][0]) == {"type": "ack", "id": 1}
    assert [m["content"] for m in page_messages(browser)] == ["for alice"], "bob's message is not alice's"
    assert alice not in proc.log()


def test_frames_are_sent_id_first(browser, twistd_service):
    """Every frame the client sends has "id" as its first member, so the server can echo it unparsed."""
    proc = twistd_service()
    open_demo(browser, proc)
    by_id(browser, "sub-channel").send_keys("news")
    by_id(browser, "subscribe").click()
    wait_for(browser, lambda d: by_id(d, "subscribe-result").text.startswith("subscribed"), "subscribed")
    by_id(browser, "content").send_keys("id first")
    by_id(browser, "send").click()
    wait_for(browser, lambda d: by_id(d, "publish-result").text.startswith("ack"), "the ack")
    by_id(browser, "unsubscribe").click()
    wait_for(browser, lambda d: by_id(d, "subscribe-result").text.startswith("unsub"), "unsubscribed")

    sent = sockets(browser)["sent"]
    assert [json.loads(f)["type"] for f in sent] == ["subscribe", "message", "unsubscribe"], sent
    assert all(f.startswith('{"id":') for f in sent), sent


def test_restart_beyond_short_history_shows_one_gap_then_goes_on(browser, twistd_service, redis_sync):
    """A page resuming past --history 5 (20 pushed while the server was down) gets one gap event, then live messages."""
    proc = twistd_service("--history", "5")
    open_demo(browser, proc)
    browser.execute_script("window.gaps = []; ps.on('gap', (info) => gaps.push(info));")
    before = ["before-%d" % i for i in range(3)]
    for t in before:
        redis_sync.lpush(proc.queue, t)
    wait_for(browser, lambda d: len(page_messages(d)) == 3, "the first 3 messages")

    # The page must come back only once the new node has read the 20 (else it gets them live,
    # rightly recovered): a long backoff holds it, an "online" event (the client skips its wait) lets it go.
    browser.execute_script("ps.options.minDelay = ps.options.maxDelay = 60000;")
    proc.stop()
    during = ["during-%d" % i for i in range(20)]
    for t in during:
        redis_sync.lpush(proc.queue, t)
    proc.start()
    until_sync(lambda: messages_in(proc) >= len(during), 20, "the new node to read the 20 messages")
    assert opens(browser) == 1 and page_state(browser) != "open", "the page waited"
    browser.execute_script(
        "ps.options.minDelay = 250; ps.options.maxDelay = 10000; window.dispatchEvent(new Event('online'));"
    )
    wait_for(browser, lambda d: opens(d) >= 2 and page_state(d) == "open", "the page to reconnect")
    wait_for(browser, lambda d: len(page_notices(d)) >= 1, "the gap notice")
    after = ["after-%d" % i for i in range(3)]
    for t in after:
        redis_sync.lpush(proc.queue, t)
    wait_for(browser, lambda d: [m["content"] for m in page_messages(d)][-3:] == after, "the messages after the gap")
    # a late duplicate or a second gap would arrive before a marker pushed now
    messages = shown_until_marker(browser, functools.partial(redis_sync.lpush, proc.queue))

    gaps = browser.execute_script("return window.gaps;")
    assert [(g["reason"], g["frame"]["type"], g["frame"]["recovered"]) for g in gaps] == [("resume", "resumed", False)]
    assert [(n["kind"], n["reason"]) for n in page_notices(browser)] == [("gap", "resume")]
    shown = [m["content"] for m in messages]
    replayed = shown[3:-3]
    assert shown[:3] == before and shown[-3:] == after, shown
    assert replayed == during[len(during) - len(replayed) :], "whatever was replayed is the newest, in order"
    offsets = [offset_key(m["offset"]) for m in messages]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


def test_subscribe_beyond_short_history_shows_gap(browser, twistd_service, redis_sync):
    """Subscribing with a since older than --history reaches back gives a subscribe gap for that channel."""
    proc = twistd_service("--history", "5")
    open_demo(browser, proc)
    redis_sync.lpush(proc.queue, "first")
    wait_for(browser, lambda d: len(page_messages(d)) == 1, "the first message")
    for i in range(10):
        redis_sync.lpush(proc.queue, json.dumps({"content": "news-%d" % i, "channel": "news"}))
    redis_sync.lpush(proc.queue, json.dumps({"content": "other", "channel": "other"}))
    # lastOffset stays at "first": the page hears none of these, so once the node has read them
    # its resume point is behind the history
    until_sync(lambda: messages_in(proc) >= 12, 20, "the node to read the 12 messages")
    by_id(browser, "sub-channel").send_keys("news")
    by_id(browser, "subscribe").click()
    wait_for(browser, lambda d: by_id(d, "subscribe-result").text.startswith("subscribed"), "subscribed")
    assert "did not reach back" in by_id(browser, "subscribe-result").text
    wait_for(browser, lambda d: page_notices(d), "the gap notice")
    assert [(n["kind"], n["reason"], n["channel"]) for n in page_notices(browser)] == [("gap", "subscribe", "news")]


def test_log_reset_shows_gap(browser, twistd_service, redis_sync):
    """When Redis loses the log under a running node, the page shows the server's gap (reset) and goes on."""
    proc = twistd_service()
    open_demo(browser, proc)
    redis_sync.lpush(proc.queue, "before the reset")
    wait_for(browser, lambda d: len(page_messages(d)) == 1, "the first message")
    redis_sync.delete(proc.queue + ":log", proc.queue + ":seq")
    time.sleep(0.1)  # time on purpose: a new millisecond, so the recreated log's first id is not the old last one
    redis_sync.lpush(proc.queue, "after the reset")
    wait_for(browser, lambda d: len(page_messages(d)) == 2, "the message after the reset")
    wait_for(browser, lambda d: page_notices(d), "the gap notice")
    assert [(n["kind"], n["reason"]) for n in page_notices(browser)] == [("gap", "reset")]
