"""
Headless Chromium through Selenium, and reading the demo page.

Uses Debian's /usr/bin/chromium and /usr/bin/chromedriver; nothing here
ever downloads a browser or a driver (the C{browser} fixture skips when
they are missing). Selenium is imported only when a browser is started.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .web import scrape

__all__ = [
    "MISSING",
    "TIMEOUT",
    "after_client_timers",
    "available",
    "by_id",
    "messages_in",
    "offset_key",
    "open_demo",
    "opens",
    "page_messages",
    "page_notices",
    "page_state",
    "sockets",
    "start_chromium",
    "wait_for",
]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT = 20  # seconds: the bound of every wait in a browser test
MISSING = (
    f"headless browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
    "apt-get install chromium chromium-driver"
)

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


def available() -> bool:
    """Whether Chromium and its driver are installed."""
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def start_chromium(profile: Path) -> Any:
    """
    A headless Chromium with the WebSocket recorder, its profile in
    C{profile}. Set SE_OFFLINE=true first, so Selenium Manager fetches nothing.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

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
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER})
    return driver


def by_id(driver: Any, element_id: str) -> Any:
    """The page's element with this id."""
    return driver.find_element("id", element_id)


def page_messages(driver: Any) -> list[dict[str, str]]:
    """The shown messages, oldest first, as dicts (offset, channel, content)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        """
        return Array.from(document.querySelectorAll('#messages .message')).reverse().map(
            (el) => ({offset: el.dataset.offset, channel: el.dataset.channel,
                      content: el.querySelector('.content').textContent}));"""
    )


def page_notices(driver: Any) -> list[dict[str, str]]:
    """The demo's notice lines (gaps, errors), oldest first, as dicts (kind, reason, channel, code, text)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        """
        return Array.from(document.querySelectorAll('#messages .notice')).reverse().map(
            (el) => ({kind: el.classList.contains('gap') ? 'gap' : 'error', reason: el.dataset.reason || '',
                      channel: el.dataset.channel || '', code: el.dataset.code || '', text: el.textContent}));"""
    )


def page_state(driver: Any) -> str:
    return by_id(driver, "state").text  # type: ignore[no-any-return]


def opens(driver: Any) -> int:
    """How many times the demo page's client opened a connection."""
    return int(by_id(driver, "state").get_attribute("data-opens"))


def sockets(driver: Any) -> dict[str, list[str]]:
    """What the recorder saw: {urls, sent, received} (frames as raw strings)."""
    return driver.execute_script("return window.__ws;")  # type: ignore[no-any-return]


def offset_key(offset: str) -> tuple[int, int]:
    """An offset as a sortable pair."""
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    """Wait (bounded) for C{condition(driver)}; on timeout say what the page showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1).until(condition)
    except TimeoutException:
        try:
            logs = [entry["message"] for entry in driver.get_log("browser")]
        except Exception:  # the log is only a diagnostic
            logs = []
        try:
            shown = f"state={page_state(driver)!r} messages={page_messages(driver)!r} notices={page_notices(driver)!r}"
        except Exception:  # not the demo page
            shown = ""
        raise AssertionError(
            f"timed out after {TIMEOUT}s waiting for {what}; {shown} sockets={sockets(driver)!r} console={logs!r}"
        ) from None


def open_demo(driver: Any, proc: Any, fragment: str = "") -> None:
    """Open the demo page of the node C{proc} and wait until it is connected."""
    driver.get(proc.url + "/" + fragment)
    wait_for(driver, lambda d: page_state(d) == "open", "the demo page to connect")


def after_client_timers(driver: Any, client: str = "ps") -> None:
    """
    Wait until a timer set now for the client's longest backoff
    (C{options.maxDelay}) has fired. Browsers run timers in deadline order,
    so any reconnect the client scheduled before this call has been tried by
    then: "no reconnect happened" without guessing at a sleep.
    """
    driver.execute_script(
        "window.__timersDone = false;"
        f"setTimeout(() => {{ window.__timersDone = true; }}, {client}.options.maxDelay + 1);"
    )
    wait_for(driver, lambda d: d.execute_script("return window.__timersDone;"), "the client's timers to pass")


def messages_in(proc: Any) -> float:
    """The node's pushservice_messages_in_total (messages it read from the log), from /metrics."""
    return scrape(proc.url).plain.get("pushservice_messages_in_total", 0.0)
