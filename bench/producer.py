"""Producer: LPUSH numbered, timestamped 64-byte items onto a Redis list.

Every item is exactly 64 ASCII bytes:

    SSSSSSSSSSSS TTTTTTTTTTTTTTTTTTT ...........................
    seq (12 digits), space, push time (time.time_ns(), 19 digits), space, '.' padding

``--rate 0`` pushes all items "at once": they are built first, then sent by
pipelined multi-value LPUSHes (``--batch`` values per command), so they are
popped in seq order. ``--rate R`` pushes one item every 1/R s on a fixed
schedule (no drift; a late push is sent at once and counted as ``late``).
Prints one JSON line: pushed, first/last push time, elapsed, late.
"""
import argparse
import json
import sys
import time

import redis

ITEM_LEN = 64
WARMUP = b"warmup".ljust(ITEM_LEN, b".")


def make_item(seq, ts_ns=None):
    if ts_ns is None:
        ts_ns = time.time_ns()
    return (b"%012d %019d " % (seq, ts_ns)).ljust(ITEM_LEN, b".")


def parse_item(item):
    """(seq, ts_ns) of an item made by make_item; None for a warm-up item."""
    if item[:1] == b"w":
        return None
    return int(item[:12]), int(item[13:32])


def push_at_once(r, queue, count, first_seq, batch):
    items = [make_item(first_seq + i) for i in range(count)]
    first_ts = int(items[0][13:32])
    pipe = r.pipeline(transaction=False)
    for i in range(0, count, batch):
        pipe.lpush(queue, *items[i:i + batch])
    pipe.execute()
    return first_ts, time.time_ns(), 0


def push_at_rate(r, queue, count, first_seq, rate):
    period = 1.0 / rate
    t0 = time.monotonic()
    late = 0
    first_ts = None
    for i in range(count):
        due = t0 + i * period
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -period:
            late += 1
        item = make_item(first_seq + i)
        if first_ts is None:
            first_ts = int(item[13:32])
        r.lpush(queue, item)
    return first_ts, time.time_ns(), late


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--queue", default="messages")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first-seq", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0,
                   help="items per second; 0 = all at once (pipelined)")
    p.add_argument("--batch", type=int, default=500,
                   help="values per LPUSH when pushing at once")
    p.add_argument("--warmup", action="store_true",
                   help="push a single warm-up item and exit")
    a = p.parse_args(argv)
    r = redis.Redis(host=a.redis_host, port=a.redis_port, socket_timeout=30)
    if a.warmup:
        r.lpush(a.queue, WARMUP)
        print(json.dumps({"pushed": 1}))
        return 0
    t = time.monotonic()
    if a.rate > 0:
        first_ts, last_ts, late = push_at_rate(r, a.queue, a.count, a.first_seq, a.rate)
    else:
        first_ts, last_ts, late = push_at_once(r, a.queue, a.count, a.first_seq, a.batch)
    print(json.dumps({"pushed": a.count, "first_push_ns": first_ts,
                      "last_push_ns": last_ts, "elapsed_s": time.monotonic() - t,
                      "late": late}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
