"""pushservice.js's token handling, on a bare page against real twistd nodes in headless Chromium.

The page is a node's /healthz (same origin, no demo script) with only
/pushservice.js loaded; the test drives `PushService` itself. "No retry
happened" is a browser timer set past the client's longest backoff, never a
sleep (support.browser.after_client_timers).
"""

import json

import pytest
from support.browser import after_client_timers, sockets, wait_for
from support.clients import token

pytestmark = pytest.mark.slow  # real Chromium and twistd: the quick loop skips them

# Every event the client emits, summarized, in order, in window.events.
LOAD = """
const done = arguments[arguments.length - 1];
const script = document.createElement("script");
script.src = "/pushservice.js";
script.onload = () => {
  window.events = [];
  window.watch = (ps) => {
    ps.on("state", (s) => events.push(["state", s]));
    ps.on("open", () => events.push(["open"]));
    ps.on("message", (c) => events.push(["message", c]));
    ps.on("error", (e) => events.push(["error", {code: e.code, fatal: !!e.fatal, closeCode: e.closeCode || null}]));
    ps.on("gap", (info) => events.push(["gap", info.reason]));
    return ps;
  };
  done(true);
};
script.onerror = () => done(false);
document.head.appendChild(script);
"""


def open_bare(driver, proc):
    driver.get(proc.url + "/healthz")
    assert driver.execute_async_script(LOAD), "/pushservice.js did not load"


def events(driver, kind=None):
    return [e for e in driver.execute_script("return window.events;") if kind is None or e[0] == kind]


def test_refused_token_stops_until_set_token(browser, twistd_service, redis_sync, secret_file):
    """A token the server refuses is an error (forbidden, fatal) and no retry; setToken() connects again."""
    proc = twistd_service("--token-secret-file", secret_file, "--require-token")
    open_bare(browser, proc)
    forged = token("alice", secret=b"not-the-servers-secret-0123456789")
    browser.execute_script(
        "window.ps = watch(new PushService({token: arguments[0], minDelay: 50, maxDelay: 200}));", forged
    )
    wait_for(browser, lambda d: events(d, "error"), "the refusal")
    after_client_timers(browser)  # a retry would have been tried by now
    assert events(browser, "error") == [["error", {"code": "forbidden", "fatal": True, "closeCode": None}]]
    assert len(sockets(browser)["urls"]) == 1, "a refused token is not sent again"
    assert browser.execute_script("return ps.state;") == "closed"

    good = token("alice")
    browser.execute_script("ps.setToken(arguments[0]);", good)
    wait_for(browser, lambda d: events(d, "open"), "the connection with the new token")
    redis_sync.lpush(proc.queue, json.dumps({"content": "hello alice", "user": "alice"}))
    wait_for(browser, lambda d: events(d, "message"), "alice's message")
    seen = sockets(browser)
    assert [json.loads(f)["token"] for f in seen["sent"]] == [forged, good]
    assert not any("token" in url for url in seen["urls"]), seen["urls"]


def test_token_function_refreshes_an_expired_token(browser, twistd_service, redis_sync, secret_file):
    """When the token expires (close 4003) a token function is asked for a new one and the page reconnects."""
    proc = twistd_service("--token-secret-file", secret_file, "--require-token")
    open_bare(browser, proc)
    short, fresh = token("alice", ttl=2), token("alice")
    browser.execute_script(
        "window.tokens = arguments[0];"
        "window.ps = watch(new PushService({token: () => Promise.resolve(tokens.shift()), minDelay: 50}));",
        [short, fresh],
    )
    wait_for(browser, lambda d: len(events(d, "open")) == 2, "the reconnect with the fresh token")
    assert events(browser, "error") == [["error", {"code": "token_expired", "fatal": False, "closeCode": 4003}]]
    redis_sync.lpush(proc.queue, json.dumps({"content": "still alice", "user": "alice"}))
    wait_for(browser, lambda d: events(d, "message"), "alice's message after the refresh")
    seen = sockets(browser)
    assert [json.loads(f) for f in seen["sent"]] == [
        {"id": 1, "type": "auth", "token": short},
        {"id": 2, "type": "auth", "token": fresh},
    ]
    assert not any("token" in url for url in seen["urls"]), seen["urls"]


def test_token_function_giving_the_refused_token_again_stops(browser, twistd_service, secret_file):
    """A token function that returns the token just refused stops the client (token_refused) without a connect."""
    proc = twistd_service("--token-secret-file", secret_file)
    open_bare(browser, proc)
    forged = token("alice", secret=b"not-the-servers-secret-0123456789")
    browser.execute_script(
        "window.ps = watch(new PushService({token: () => arguments[0], minDelay: 50, maxDelay: 200}));", forged
    )
    wait_for(browser, lambda d: len(events(d, "error")) == 2, "the refusal, then the stop")
    after_client_timers(browser)  # a retry would have been tried by now
    assert events(browser, "error") == [
        ["error", {"code": "forbidden", "fatal": False, "closeCode": None}],
        ["error", {"code": "token_refused", "fatal": True, "closeCode": None}],
    ]
    assert len(sockets(browser)["urls"]) == 1


def test_no_token_on_a_token_only_deployment_stops(browser, twistd_service, secret_file):
    """Without a token where one is required, the close 4001 is an auth_required error and the client stops."""
    proc = twistd_service("--token-secret-file", secret_file, "--require-token", "--auth-timeout", "1")
    open_bare(browser, proc)
    browser.execute_script("window.ps = watch(new PushService({minDelay: 50, maxDelay: 200}));")
    wait_for(browser, lambda d: events(d, "error"), "the 4001 close")
    after_client_timers(browser)  # a retry would have been tried by now
    assert events(browser, "error") == [["error", {"code": "auth_required", "fatal": True, "closeCode": 4001}]]
    assert len(sockets(browser)["urls"]) == 1


def test_presence_in_the_browser_client(browser, twistd_service, secret_file):
    """subscribe(ch, {presence: true}) gives join/leave events, presence(ch) the users; both survive a node restart."""
    proc = twistd_service("--token-secret-file", secret_file, "--presence-flush", "0.05")
    open_bare(browser, proc)
    browser.execute_script(
        "window.presenceEvents = [];"
        "window.ps = watch(new PushService({token: arguments[0], minDelay: 50, maxDelay: 200}));"
        "for (const kind of ['join', 'leave']) ps.on(kind, (ev) => presenceEvents.push([kind, ev.channel, ev.user]));"
        "ps.subscribe('room', {presence: true}).then((r) => { window.subscribed = r.type; });",
        token("alice"),
    )
    wait_for(browser, lambda d: d.execute_script("return window.subscribed;") == "subscribed", "the subscribe")
    wait_for(browser, lambda d: ["join", "room", "alice"] in d.execute_script("return presenceEvents;"), "own join")
    browser.execute_script("window.bob = new PushService({token: arguments[0], channels: ['room']});", token("bob"))
    wait_for(browser, lambda d: ["join", "room", "bob"] in d.execute_script("return presenceEvents;"), "bob's join")
    browser.execute_script("ps.presence('room').then((r) => { window.who = r; });")
    who = wait_for(browser, lambda d: d.execute_script("return window.who;"), "the presence reply")
    assert who["users"] == ["alice", "bob"] and who["user_count"] == 2 and who["anonymous"] == 0, who
    browser.execute_script("bob.close();")
    wait_for(browser, lambda d: ["leave", "room", "bob"] in d.execute_script("return presenceEvents;"), "bob's leave")

    proc.restart()  # the page reconnects and asks for the events again
    wait_for(browser, lambda d: len(events(d, "open")) == 2, "the reconnect")
    subscribes = [json.loads(f) for f in sockets(browser)["sent"] if '"subscribe"' in f]
    assert [f.get("presence") for f in subscribes] == [True, True], subscribes
    browser.execute_script("window.carol = new PushService({token: arguments[0], channels: ['room']});", token("carol"))
    wait_for(browser, lambda d: ["join", "room", "carol"] in d.execute_script("return presenceEvents;"), "carol's join")
