"""
What permessage-deflate costs and saves in pushservice's fan-out, in one
process: the real FanOut, Outbox and compressed frames (pushservice.deflate),
writing to sinks that count bytes instead of sockets. So the CPU figure is
the node's own work per delivery (framing, compressing once per message,
handing bytes over), without the kernel's send(), which compression makes
cheaper for big messages (fewer bytes to copy).

    .venv/bin/python bench/compression.py --quick     # ~5 s
    .venv/bin/python bench/compression.py --peers 1000 --batches 200
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's pushservice, not an installed one

from pushservice.fanout import FanOut  # noqa: E402
from pushservice.logentry import Message  # noqa: E402
from pushservice.metrics import Stats  # noqa: E402
from pushservice.outbox import Outbox  # noqa: E402
from pushservice.wire import message_payload, text_frame  # noqa: E402


class CountingSink:
    """A socket that takes everything at once, counting bytes."""

    def __init__(self) -> None:
        self.bytes = 0

    def send_now(self, data: bytes | memoryview) -> int:
        self.bytes += len(data)
        return len(data)

    def direct_socket(self) -> None:
        return None  # no socket: every share goes through send_now

    def queued(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def drop_slow(self, why: str) -> None:
        raise AssertionError(why)


class Peer:
    def __init__(self, clock: Clock, deflate: bool) -> None:
        self.user = None
        self.channels: set[str] = set()
        self.sink = CountingSink()
        self.outbox = Outbox(self, self.sink, None, clock, 1 << 20, deflate)  # type: ignore[arg-type]


def content(size: int, rng: random.Random) -> bytes:
    """JSON content of about C{size} bytes (the frame adds ~70): words and numbers, like a feed."""
    words = ["price", "symbol", "ACME", "volume", "bid", "ask", "status", "ok", "update", "item"]
    text = ""
    while len(text) < size - 12:
        text += f" {rng.choice(words)}{rng.randint(0, 999)}"
    return json.dumps({"text": text}).encode()


def run(size: int, deflate: bool, peers: int, batches: int, per_batch: int) -> dict[str, float]:
    clock = Clock()
    rng = random.Random(size)
    all_peers = [Peer(clock, deflate) for _ in range(peers)]
    stats = Stats()
    fanout = FanOut(clock, lambda message: all_peers, stats)
    index = 0
    cpu = 0.0
    for b in range(batches):
        batch = []
        for _ in range(per_batch):  # new messages each batch: each is compressed once, as live
            offset = f"{1733065200000 + b}-{index}".encode()
            batch.append(Message((b, index), None, None, text_frame(message_payload(content(size, rng), None, offset))))
            index += 1
        start = time.process_time()
        fanout.write(batch, index - per_batch, index - 1)
        while clock.getDelayedCalls():
            clock.advance(0)
        cpu += time.process_time() - start
    deliveries = peers * batches * per_batch
    assert stats.deliveries == deliveries, (stats.deliveries, deliveries)
    wire = sum(p.sink.bytes for p in all_peers)
    return {"us_per_delivery": cpu / deliveries * 1e6, "bytes_per_delivery": wire / deliveries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--per-batch", type=int, default=10, help="messages per batch")
    parser.add_argument("--rounds", type=int, default=3, help="the best of this many runs is reported")
    parser.add_argument("--quick", action="store_true", help="100 peers, 20 batches, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.peers, args.batches, args.rounds = 100, 20, 1
    print(f"{args.peers} connections, {args.batches} batches of {args.per_batch} broadcasts; best of {args.rounds}")
    print(f"{'message':>8} {'deflate':>8} {'CPU us/delivery':>16} {'wire B/delivery':>16}")
    for size in (64, 2048):
        for deflate in (False, True):
            best = min(
                (run(size, deflate, args.peers, args.batches, args.per_batch) for _ in range(args.rounds)),
                key=lambda r: r["us_per_delivery"],
            )
            print(
                f"{size:>7}B {'on' if deflate else 'off':>8} "
                f"{best['us_per_delivery']:>16.3f} {best['bytes_per_delivery']:>16.0f}"
            )


if __name__ == "__main__":
    main()
