"""Self-test of the load generator's delivery checkers (no server needed).

Feeds Client.data_received() synthetic streams (raw and pushservice-style JSON
frames, with duplicates, gaps, reordering, warm-ups, pings, other JSON frames,
a fragmented message) cut at random points, and compares its counts with a
plain reference implementation; then sends the same streams over socket
pairs to the C reader (bench/reader.c) and compares its totals. Also times
the Python checker per message.

    python bench/selftest.py
"""
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loadgen  # noqa: E402
from producer import WARMUP, make_item  # noqa: E402


class FakeTransport:
    def __init__(self):
        self.out = []

    def write(self, d):
        self.out.append(d)

    def close(self):
        pass


def frame(payload, op=0x1, fin=True):
    n = len(payload)
    b0 = (0x80 if fin else 0) | op
    if n < 126:
        head = bytes((b0, n))
    elif n < 65536:
        head = bytes((b0, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 127)) + n.to_bytes(8, "big")
    return head + payload


def wrap(item, i):
    return json.dumps({"type": "message", "content": item.decode(), "channel": None,
                       "offset": "%d-%d" % (1732000000000 + i, i)}).encode()


def make_stream(seqs, as_json, rng, extras=True):
    out = []
    for i, s in enumerate(seqs):
        item = make_item(s)
        out.append(frame(wrap(item, i) if as_json else item))
        if extras and rng.random() < 0.01:
            out.append(rng.choice([
                frame(b"hi", op=0x9),
                frame(wrap(WARMUP, 0) if as_json else WARMUP),
                frame(b'{"type":"ack","id":1}'),
            ]))
    return out


def reference(seqs, count):
    seen, maxseq, dup, ooo = set(), -1, 0, 0
    for s in seqs:
        if s in seen:
            dup += 1
            continue
        if s < maxseq:
            ooo += 1
        seen.add(s)
        maxseq = max(maxseq, s)
    return dict(n=len(seqs), unique=len(seen), dup=dup, ooo=ooo)


def cut(frames, rng, max_chunk):
    """The frames' bytes in pieces of 1 to max_chunk bytes, cut at random points."""
    data = b"".join(frames)
    pos = 0
    while pos < len(data):
        k = rng.randint(1, max_chunk)
        yield data[pos:pos + k]
        pos += k


def feed(frames, rng, max_chunk):
    loop = asyncio.new_event_loop()
    c = loadgen.Client(b"h", b"/", loop.create_future())
    c.hs = None
    c.transport = FakeTransport()
    for piece in cut(frames, rng, max_chunk):
        c.data_received(piece)
    loop.close()
    return c


def check_case(name, seqs, as_json, rng, max_chunk, count):
    loadgen.COUNT = count
    frames = make_stream(seqs, as_json, rng)
    c = feed(frames, rng, max_chunk)
    want = reference(seqs, count)
    got = dict(n=c.n, unique=c.unique(), dup=c.dup, ooo=c.ooo)
    ok = got == want and c.bad == 0 and not c.buf
    print("%-40s %s %s" % (name, "ok " if ok else "BAD", "" if ok else (got, want, c.bad, c.buf[:20])))
    return ok


def run_reader(exe, streams, count, rng, max_chunk):
    """Send each stream (a list of frames) over a socket pair of its own to
    the C reader, cut at random points, after a warm-up item; return its
    result line and latencies."""
    pairs = [socket.socketpair() for _ in streams]
    tmp = tempfile.mkdtemp(prefix="selftest-reader-")
    fds_file, lat_file = os.path.join(tmp, "fds"), os.path.join(tmp, "lat")
    with open(fds_file, "w") as f:
        f.write("".join("%d\n" % b.fileno() for _, b in pairs))
    p = subprocess.Popen([exe, str(count), "1", "0.3", fds_file, lat_file],
                         pass_fds=[b.fileno() for _, b in pairs],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    for a, b in pairs:
        b.close()
        a.sendall(frame(WARMUP))
    assert p.stdout.readline() == b"warm\n"
    p.stdin.write(b"go\n")
    p.stdin.flush()
    for (a, _), frames in zip(pairs, streams):
        for piece in cut(frames, rng, max_chunk):
            a.sendall(piece)
    p.stdin.write(b"stall\n")
    p.stdin.flush()
    out = p.stdout.read()
    p.wait(30)
    with open(lat_file, "rb") as f:
        lat = array("q", f.read())
    shutil.rmtree(tmp)
    for a, _ in pairs:
        a.close()
    # every item was made in this run, before it was sent: 0 <= latency < 60 s
    n_lat = len(lat) if all(0 <= v < 60_000_000_000 for v in lat) else -1
    return json.loads(out.decode().splitlines()[-1]), n_lat


def check_reader(exe, rng):
    """The C reader against the reference, on the same kinds of streams."""
    ok = True
    count = 3000
    for as_json in (False, True):
        kind = "json" if as_json else "raw"
        for max_chunk in (7, 300, 5000, 70000):
            cases = streams(rng, count)
            frames = [make_stream(seqs, as_json, rng) for _, seqs in cases]
            got, n_lat = run_reader(exe, frames, count, rng, max_chunk)
            want = dict(n=0, unique=0, dup=0, ooo=0)
            for _, seqs in cases:
                for k, v in reference(seqs, count).items():
                    want[k] += v
            have = dict(n=got["deliveries"], unique=got["unique"], dup=got["duplicates"],
                        ooo=got["out_of_order"])
            good = have == want and got["bad_frames"] == 0 and n_lat == want["n"] \
                and got["never_warm"] == 0
            print("%-40s %s %s" % ("C reader %s chunk<=%d" % (kind, max_chunk),
                                   "ok " if good else "BAD", "" if good else (have, want, got)))
            ok &= good
    item = make_item(0)
    frames = [frame(item[:20], fin=False), frame(item[20:], op=0x0), frame(make_item(1)),
              frame(wrap(make_item(2), 2)), frame(b"oops", op=0x3),
              frame((1001).to_bytes(2, "big"), op=0x8), frame(make_item(3))]
    got, n_lat = run_reader(exe, [frames], 10, rng, 1000)
    good = (got["deliveries"] == 3 and got["unique"] == 3 and got["bad_frames"] == 1
            and got["closed"] == 1 and n_lat == 3)
    print("%-40s %s %s" % ("C reader fragment + bad op + close", "ok " if good else "BAD",
                           "" if good else got))
    return ok and good


def streams(rng, count):
    """Clean, duplicated, gapped and swapped sequences of 0..count-1."""
    clean = list(range(count))
    dups = list(range(count))
    for _ in range(20):
        j = rng.randrange(len(dups))
        dups.insert(j + 1, dups[j])
    gaps = [s for s in range(count) if rng.random() > 0.01]
    swapped = list(range(count))
    for _ in range(20):
        j = rng.randrange(count - 1)
        swapped[j], swapped[j + 1] = swapped[j + 1], swapped[j]
    return [("clean", clean), ("dups", dups), ("gaps", gaps), ("swapped", swapped)]


def main():
    rng = random.Random(1)
    ok = True
    count = 3000
    for as_json in (False, True):
        kind = "json" if as_json else "raw"
        cases = streams(rng, count)
        for max_chunk in (7, 300, 5000, 70000):
            for label, seqs in cases:
                ok &= check_case("%s %s chunk<=%d" % (kind, label, max_chunk), seqs, as_json, rng,
                                 max_chunk, count)
    # a fragmented message and a close frame
    loadgen.COUNT = 10
    item = make_item(0)
    frames = [frame(item[:20], fin=False), frame(item[20:], op=0x0), frame(make_item(1)),
              frame((1001).to_bytes(2, "big"), op=0x8)]
    c = feed(frames, rng, 1000)
    good = c.n == 2 and c.unique() == 2 and c.close_code == 1001
    print("%-40s %s" % ("fragment + close", "ok " if good else "BAD"))
    ok &= good
    exe = loadgen.build_reader()
    if exe is None:
        print("C reader: no C compiler, not checked")
        ok = False
    else:
        ok &= check_reader(exe, rng)
    # speed
    for as_json in (False, True):
        n = 200000
        loadgen.COUNT = n
        frames = make_stream(range(n), as_json, rng, extras=False)
        data = b"".join(frames)
        for chunk in (65536, 4096, 200):
            loop = asyncio.new_event_loop()
            c = loadgen.Client(b"h", b"/", loop.create_future())
            c.hs = None
            c.transport = FakeTransport()
            chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
            t = time.perf_counter()
            for ch in chunks:
                c.data_received(ch)
            dt = time.perf_counter() - t
            loop.close()
            print("speed %-4s reads of %6d B: %.2f us/message" % (
                "json" if as_json else "raw", chunk, dt / n * 1e6))
    del loadgen.LAT[:]
    loadgen.LATS.clear()
    print("selftest", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
