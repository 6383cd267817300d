"""permessage-deflate against real twistd nodes: Chromium negotiating it, and a zip bomb's memory cost."""

from __future__ import annotations

import json
import socket

import pytest
from support.browser import wait_for
from support.deflating import bomb_frame, offer_request, read_frames, response_extensions, websockets_session
from test_deflate import CHROMIUM, items

pytestmark = pytest.mark.slow  # real twistd processes and Chromium: the quick loop skips them

OPEN = """
const done = arguments[arguments.length - 1];
const ws = new WebSocket(arguments[0]);
window.got = [];
ws.onmessage = (ev) => got.push(JSON.parse(ev.data));
ws.onopen = () => done(ws.extensions);
ws.onerror = () => done(null);
"""


def peak_memory(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_chromium_negotiates_compression_and_receives_every_message(browser, twistd_service, redis_sync):
    """Chromium's WebSocket negotiates permessage-deflate and gets every 64 B and 2 KB message, in order."""
    proc = twistd_service()
    browser.get(proc.url + "/healthz")
    extensions = browser.execute_async_script(OPEN, f"ws://127.0.0.1:{proc.port}/")
    assert extensions and extensions.startswith("permessage-deflate"), extensions
    pushed = items(40)
    redis_sync.lpush(proc.queue, *pushed)
    wait_for(browser, lambda d: len(d.execute_script("return got;")) >= len(pushed), "every message")
    got = browser.execute_script("return got;")
    assert [f["content"] for f in got] == [json.loads(i)["content"] for i in pushed]


def test_zip_bomb_costs_the_node_no_more_than_the_frame_limit(twistd_service, redis_sync):
    """A frame that inflates to 256 MiB closes with 1009 without the node inflating it: its peak memory barely moves."""
    proc = twistd_service()
    assert proc.proc is not None
    bomb = bomb_frame(256 << 20)
    assert len(bomb) < 1 << 20, "under the default --max-frame-size on the wire"
    before = peak_memory(proc.proc.pid)
    s = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
    s.sendall(offer_request(proc.port, CHROMIUM))
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert "permessage-deflate" in (response_extensions(head) or "")
    s.sendall(bomb)
    frames = read_frames(s, 1)
    assert frames and frames[0][0] == 8 and int.from_bytes(frames[0][2][:2], "big") == 1009
    grown = peak_memory(proc.proc.pid) - before
    assert grown < 32 << 20, f"peak memory grew {grown >> 20} MiB"
    pushed = items(6)

    def script(recv):
        redis_sync.lpush(proc.queue, *pushed)
        return [recv()["content"] for _ in pushed]

    extensions, got = websockets_session(f"ws://127.0.0.1:{proc.port}/", script)
    assert extensions is not None and got == [json.loads(i)["content"] for i in pushed]
