"""The demo page and pushservice.js, driven in a real headless Chromium.

Uses Debian's /usr/bin/chromium and /usr/bin/chromedriver through Selenium;
nothing here ever downloads a browser or a driver (skips when they are
missing). Needs the conftest fixtures `redis_server`, `redis_sync` and
`twistd_service`. The fixtures and helpers here are shared with
test_browser_client.py.
"""

import json
import os
import re
import time
import urllib.request
import uuid

import jwt
import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (a test dependency) is not installed")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT = 20  # seconds: the bound of every wait below
SECRET = b"browser-test-secret-0123456789abcdef"

# Installed before any page script runs: records every WebSocket URL the page
# opens and every frame it sends or receives, whoever built them.
RECORDER = """
(() => {
  const Native = window.WebSocket;
  const seen = window.__ws = {urls: [], sent: [], received: []};
  class Recording extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      seen.urls.push(String(url));
      this.addEventListener("message", (ev) => seen.received.push(String(ev.data)));
    }
    send(data) { seen.sent.push(String(data)); return super.send(data); }
  }
  window.WebSocket = Recording;
})();
"""

pytestmark = [
    pytest.mark.slow,  # real Chromium and twistd: the quick loop skips them
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="headless browser tests need Debian's chromium and chromium-driver "
        "(%s, %s): apt-get install chromium chromium-driver" % (CHROMIUM, CHROMEDRIVER),
    ),
]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    # Both paths given explicitly, and Selenium Manager told to stay offline,
    # so nothing tries to fetch a browser or a driver.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
        "--user-data-dir=%s" % (tmp_path / "chromium-profile"),
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER})
    try:
        yield driver
    finally:
        driver.quit()


def page_messages(driver):
    """The shown messages, oldest first, as dicts (offset, channel, content)."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('#messages .message')).reverse().map(
            (el) => ({offset: el.dataset.offset, channel: el.dataset.channel,
                      content: el.querySelector('.content').textContent}));""")


def page_notices(driver):
    """The demo's notice lines (gaps, errors), oldest first, as dicts (kind, reason, channel, code, text)."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('#messages .notice')).reverse().map(
            (el) => ({kind: el.classList.contains('gap') ? 'gap' : 'error', reason: el.dataset.reason || '',
                      channel: el.dataset.channel || '', code: el.dataset.code || '', text: el.textContent}));""")


def page_state(driver):
    return driver.find_element(By.ID, "state").text


def sockets(driver):
    """What the recorder saw: {urls, sent, received} (frames as raw strings)."""
    return driver.execute_script("return window.__ws;")


def secret_file(tmp_path):
    path = tmp_path / "token-secret"
    path.write_bytes(SECRET + b"\n")
    return str(path)


def mint(sub="alice", ttl=600, secret=SECRET, **claims):
    return jwt.encode({"sub": sub, "exp": int(time.time()) + ttl, **claims}, secret, algorithm="HS256")


def wait_for(driver, condition, what):
    """Wait (bounded) for condition(driver); on timeout say what the page showed."""
    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1).until(condition)
    except TimeoutException:
        try:
            logs = [entry["message"] for entry in driver.get_log("browser")]
        except Exception:  # the log is only a diagnostic
            logs = []
        try:
            shown = "state=%r messages=%r notices=%r" % (
                page_state(driver),
                page_messages(driver),
                page_notices(driver),
            )
        except Exception:  # not the demo page
            shown = ""
        raise AssertionError(
            "timed out after %ss waiting for %s; %s sockets=%r console=%r"
            % (TIMEOUT, what, shown, sockets(driver), logs)
        ) from None


def open_demo(driver, proc, fragment=""):
    driver.get(proc.url + "/" + fragment)
    wait_for(driver, lambda d: page_state(d) == "open", "the demo page to connect")


def wait_until(predicate, what):
    """Poll predicate() (bounded by TIMEOUT) until it returns something true; return that."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out after %ss waiting for %s" % (TIMEOUT, what))


def messages_in(proc):
    """The node's pushservice_messages_in_total (messages it read from the log), from /metrics."""
    with urllib.request.urlopen(proc.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(r"^pushservice_messages_in_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0


def opens(driver):
    return int(driver.find_element(By.ID, "state").get_attribute("data-opens"))


def offset_key(offset):
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


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
    browser.find_element(By.ID, "content").send_keys(text)
    browser.find_element(By.ID, "send").click()
    result = wait_for(
        browser,
        lambda d: d.find_element(By.ID, "publish-result").text.startswith(("ack", "error")),
        "the publish result",
    )
    assert result and browser.find_element(By.ID, "publish-result").text.startswith("ack")
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
    time.sleep(1.0)  # let any late duplicate (a replay overlapping live traffic) arrive

    shown = page_messages(browser)
    assert [m["content"] for m in shown] == texts, shown
    offsets = [offset_key(m["offset"]) for m in shown]
    assert offsets == sorted(offsets) and len(set(offsets)) == 6, shown
    resumed = browser.execute_script("return window.resumed;")
    assert [r["recovered"] for r in resumed] == [True], resumed
    assert page_notices(browser) == [], "a complete replay is no gap"


def test_token_goes_in_first_frame_never_in_url(browser, twistd_service, redis_sync, tmp_path):
    """With a token the page connects with auth=1, sends the token in a first auth frame, and gets its user's messages."""
    proc = twistd_service("--token-secret-file", secret_file(tmp_path), "--require-token")
    token = mint(sub="alice")
    open_demo(browser, proc, "#token=" + token)
    redis_sync.lpush(proc.queue, json.dumps({"content": "for bob", "user": "bob"}))
    redis_sync.lpush(proc.queue, json.dumps({"content": "for alice", "user": "alice"}))
    wait_for(browser, lambda d: any(m["content"] == "for alice" for m in page_messages(d)), "alice's message")

    seen = sockets(browser)
    assert len(seen["urls"]) == 1 and "auth=1" in seen["urls"][0], seen["urls"]
    assert not any(token in url or "token=" in url for url in seen["urls"]), seen["urls"]
    assert json.loads(seen["sent"][0]) == {"id": 1, "type": "auth", "token": token}
    assert json.loads(seen["received"][0]) == {"type": "ack", "id": 1}
    assert [m["content"] for m in page_messages(browser)] == ["for alice"], "bob's message is not alice's"
    assert token not in proc.log()


def test_frames_are_sent_id_first(browser, twistd_service):
    """Every frame the client sends has "id" as its first member, so the server can echo it unparsed."""
    proc = twistd_service()
    open_demo(browser, proc)
    browser.find_element(By.ID, "sub-channel").send_keys("news")
    browser.find_element(By.ID, "subscribe").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "subscribe-result").text.startswith("subscribed"), "subscribed")
    browser.find_element(By.ID, "content").send_keys("id first")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "publish-result").text.startswith("ack"), "the ack")
    browser.find_element(By.ID, "unsubscribe").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "subscribe-result").text.startswith("unsub"), "unsubscribed")

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
    wait_until(lambda: messages_in(proc) >= len(during), "the new node to read the 20 messages")
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
    time.sleep(0.5)  # let any late duplicate or second gap arrive

    gaps = browser.execute_script("return window.gaps;")
    assert [(g["reason"], g["frame"]["type"], g["frame"]["recovered"]) for g in gaps] == [("resume", "resumed", False)]
    assert [(n["kind"], n["reason"]) for n in page_notices(browser)] == [("gap", "resume")]
    shown = [m["content"] for m in page_messages(browser)]
    replayed = shown[3:-3]
    assert shown[:3] == before and shown[-3:] == after, shown
    assert replayed == during[len(during) - len(replayed) :], "whatever was replayed is the newest, in order"
    offsets = [offset_key(m["offset"]) for m in page_messages(browser)]
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
    # lastOffset stays at "first": the page hears none of these, so its resume point is behind the history.
    time.sleep(0.5)
    browser.find_element(By.ID, "sub-channel").send_keys("news")
    browser.find_element(By.ID, "subscribe").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "subscribe-result").text.startswith("subscribed"), "subscribed")
    assert "did not reach back" in browser.find_element(By.ID, "subscribe-result").text
    wait_for(browser, lambda d: page_notices(d), "the gap notice")
    assert [(n["kind"], n["reason"], n["channel"]) for n in page_notices(browser)] == [("gap", "subscribe", "news")]


def test_log_reset_shows_gap(browser, twistd_service, redis_sync):
    """When Redis loses the log under a running node, the page shows the server's gap (reset) and goes on."""
    proc = twistd_service()
    open_demo(browser, proc)
    redis_sync.lpush(proc.queue, "before the reset")
    wait_for(browser, lambda d: len(page_messages(d)) == 1, "the first message")
    redis_sync.delete(proc.queue + ":log", proc.queue + ":seq")
    time.sleep(0.1)  # a new millisecond: the recreated log's first id must not be the old last one
    redis_sync.lpush(proc.queue, "after the reset")
    wait_for(browser, lambda d: len(page_messages(d)) == 2, "the message after the reset")
    wait_for(browser, lambda d: page_notices(d), "the gap notice")
    assert [(n["kind"], n["reason"]) for n in page_notices(browser)] == [("gap", "reset")]
