"""The demo page and pushservice.js, driven in a real headless Chromium.

Uses Debian's /usr/bin/chromium and /usr/bin/chromedriver through Selenium;
nothing here ever downloads a browser or a driver (skips when they are
missing). Needs the conftest fixtures `redis_server`, `redis_sync` and
`twistd_service`.
"""

import os
import time
import uuid

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (a test dependency) is not installed")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT = 20  # seconds: the bound of every wait below

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="headless browser tests need Debian's chromium and chromium-driver "
    "(%s, %s): apt-get install chromium chromium-driver" % (CHROMIUM, CHROMEDRIVER),
)


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


def page_state(driver):
    return driver.find_element(By.ID, "state").text


def wait_for(driver, condition, what):
    """Wait (bounded) for condition(driver); on timeout say what the page showed."""
    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1).until(condition)
    except TimeoutException:
        try:
            logs = [entry["message"] for entry in driver.get_log("browser")]
        except Exception:  # the log is only a diagnostic
            logs = []
        raise AssertionError(
            "timed out after %ss waiting for %s; state=%r messages=%r console=%r"
            % (TIMEOUT, what, page_state(driver), page_messages(driver), logs)
        ) from None


def open_demo(driver, proc):
    driver.get(proc.url + "/")
    wait_for(driver, lambda d: page_state(d) == "open", "the demo page to connect")


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
    opens = lambda d: int(d.find_element(By.ID, "state").get_attribute("data-opens"))  # noqa: E731
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
