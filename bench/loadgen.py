"""Load generator: holds many WebSocket connections to one server and checks
every delivery.

One asyncio process (uvloop when installed) with a minimal WebSocket client
per connection of its own: HTTP/1.1 upgrade with a Sec-WebSocket-Accept
check, unmasked server frames, masked pong and close. Each connection is a
non-blocking socket read with recvmsg() and SO_TIMESTAMPNS, so every read
carries the time the kernel received it: latency = that time - push time does
not include the load generator's own queueing while it works through
thousands of ready sockets (--timestamps app measures at the read instead).

Checking is per read, not per frame, where it pays: a big read is walked
frame header by frame header, then all its items are located and parsed at
once with numpy and the order check is one array compare; small reads,
control frames, fragments and unusual JSON go through a per-frame path
(bench/selftest.py checks both paths against a reference). Its own CPU time
is measured and reported, so a load-generator-bound run can be told from a
server-bound one.

Modes
  deliver  connect --clients, make sure each one is registered (a warm-up item
           must reach every connection), then run bench/producer.py
           (--messages items, at --rate per s or all at once) and wait for
           every delivery. Checks per connection: count, order (seq
           increasing by one), duplicates, and records the latency
           receive time - push time (both time.time_ns() on this machine).
  idle     server RSS (from /proc/PID/status, --server-pid) before and after
           connecting --clients idle connections; then a warm-up item must
           reach all of them (they are alive).
  connect  --clients handshakes, --concurrency in flight; handshakes/s.

Frames that start with '{' are pushservice JSON frames: the item is the
"content" member (--unwrap auto, the default). Other frames are the raw item
(peers broadcast it verbatim). A JSON frame whose type is not "message" is
counted as "other" and otherwise ignored.

Prints one JSON object (the result) on stdout; progress goes to stderr.
"""
import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import resource
import shutil
import socket
import struct
import sys
import time
import urllib.parse
from array import array

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from producer import WARMUP  # noqa: E402

time_ns = time.time_ns
LAT = array("q")          # latency of every delivery, ns (small reads)
LATS = []                 # numpy arrays of latencies, ns (bulk reads)
COUNT = 0                  # messages the producer pushes (seq 0..COUNT-1)
UNWRAP = "auto"


def log(*a):
    print("[loadgen]", *a, file=sys.stderr, flush=True)


def parse_head(head):
    """An HTTP response head -> (lines, status line split in 3, lower-cased headers)."""
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    return lines, lines[0].split(b" ", 2), headers


def raise_nofile(want=200000):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(open("/proc/sys/fs/nr_open").read())
    except OSError:
        nr_open = hard
    target = min(max(want, soft), nr_open)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def unwrap_json(p):
    """The item inside a pushservice frame, or None if not a message frame."""
    i = p.find(b'"content":')
    if i >= 0:
        j = i + 10
        if p[j:j + 1] == b" ":
            j += 1
        # fast path: our items are 64 plain ASCII bytes, no escapes
        if p[j:j + 1] == b'"' and p[j + 65:j + 66] == b'"':
            return p[j + 1:j + 65]
    try:
        obj = json.loads(p)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("type") != "message":
        return None
    c = obj.get("content")
    return c.encode() if isinstance(c, str) else None


BULK = 16                  # reads with at least this many items use numpy
BULK_BYTES = 8192          # reads at least this big are parsed by Client.bulk()
# the shape of an item: byte offsets and allowed ranges (digit, space, digit,
# digit, space, dot, dot)
SHAPE_AT = np.array([0, 12, 13, 31, 32, 33, 63])
SHAPE_LO = np.array([0x30, 0x20, 0x30, 0x30, 0x20, 0x2E, 0x2E], dtype=np.uint8)
SHAPE_HI = np.array([0x39, 0x20, 0x39, 0x39, 0x20, 0x2E, 0x2E], dtype=np.uint8)
D12 = np.arange(12)
D19 = np.arange(19)
P12 = 10 ** np.arange(11, -1, -1, dtype=np.int64)
P19 = 10 ** np.arange(18, -1, -1, dtype=np.int64)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("qq")
RECV_SIZE = 65536          # below malloc's mmap threshold
ANC_SIZE = socket.CMSG_SPACE(16)
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
READER_C = os.path.join(HERE, "reader.c")


def build_reader():
    """Compile bench/reader.c (once per version of its source) and return the
    executable's path, or None when no C compiler is at hand."""
    import subprocess
    import tempfile
    with open(READER_C, "rb") as f:
        tag = hashlib.sha1(f.read()).hexdigest()[:12]
    exe = os.path.join(tempfile.gettempdir(), "pushbench-reader-" + tag)
    if os.path.exists(exe):
        return exe
    cc = os.environ.get("CC", "cc")
    tmp = "%s.%d" % (exe, os.getpid())
    try:
        subprocess.run([cc, "-O2", "-o", tmp, READER_C], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except (OSError, subprocess.CalledProcessError) as e:
        log("cannot build the C reader (%s): reading in Python" % (getattr(e, "stderr", b"") or e))
        return None
    os.replace(tmp, exe)
    return exe


def mask_frame(opcode, payload):
    """A masked client frame (payloads < 126 bytes only: close and pong)."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + masked


class Client(asyncio.Protocol):
    """A minimal WebSocket client: HTTP/1.1 upgrade, unmasked server frames,
    masked pong and close. Checks every item it receives."""

    def __init__(self, host_hdr, path, ready):
        self.host_hdr = host_hdr
        self.path = path
        self.ready = ready        # future: set when the 101 was checked
        self.transport = None
        self.key = None
        self.hs = b""             # handshake bytes until the 101 is complete
        self.buf = b""            # unparsed frame bytes (a partial frame)
        self.frag = None          # fragmented message being assembled
        self.n = 0                # data deliveries (items with a seq)
        self.expected = 0         # next seq in the fast path; -1 after an anomaly
        self.seen = None          # set of seqs, only after the first anomaly
        self.maxseq = -1
        self.dup = 0
        self.ooo = 0
        self.bad = 0              # unparsable item, seq out of range, protocol error
        self.other = 0            # non-message JSON frames (acks, errors, ...)
        self.warm = 0
        self.last = 0             # time_ns of the last delivery
        self.closed = False
        self.close_code = None
        self.close_sent = False

    # -- connection ----------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.key = base64.b64encode(os.urandom(16))
        transport.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n"
                        % (self.path, self.host_hdr, self.key))

    def connection_lost(self, exc):
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during handshake: %r" % exc))

    def close(self):
        if self.transport is not None and not self.closed:
            if not self.close_sent:
                self.close_sent = True
                self.transport.write(mask_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()

    def _handshake(self, data):
        self.hs += data
        i = self.hs.find(b"\r\n\r\n")
        if i < 0:
            if len(self.hs) > 16384:
                self._fail_handshake("response headers too long")
            return None
        head, rest = self.hs[:i], self.hs[i + 4:]
        self.hs = None
        lines, status, headers = parse_head(head)
        accept = base64.b64encode(hashlib.sha1(self.key + GUID).digest())
        if len(status) < 2 or status[1] != b"101":
            self._fail_handshake("status %r" % lines[0][:80])
        elif headers.get(b"sec-websocket-accept") != accept:
            self._fail_handshake("bad Sec-WebSocket-Accept")
        elif headers.get(b"sec-websocket-extensions"):
            self._fail_handshake("unrequested extension")
        else:
            self.ready.set_result(self)
            return rest
        return None

    def _fail_handshake(self, why):
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("handshake failed: " + why))
        self.transport.close()

    # -- frames --------------------------------------------------------------
    def data_received(self, data, now=None):
        if self.hs is not None:
            data = self._handshake(data)
            if not data:
                return
        if self.buf:
            data = self.buf + data
        if now is None:
            now = time_ns()
        n = len(data)
        if n >= BULK_BYTES:
            self.buf = data[self.bulk(data, n, now):]
            return
        pos = 0
        starts = []               # offsets of the items in data
        add = starts.append
        find = data.find
        while n - pos >= 2:
            b1 = data[pos + 1]
            if data[pos] != 0x81 or b1 > 126:      # not an unfragmented text frame
                if starts:                          # keep the checks in order
                    self.items(data, starts, now)
                    starts = []
                    add = starts.append
                nxt = self.slow_frame(data, pos, now)
                if nxt < 0:
                    break
                pos = nxt
                continue
            if b1 == 126:
                if n - pos < 4:
                    break
                ps = pos + 4
                end = ps + (data[pos + 2] << 8 | data[pos + 3])
            else:
                ps = pos + 2
                end = ps + b1
            if end > n:
                break
            c = data[ps]
            if c == 0x7B and UNWRAP != "no":                    # '{': JSON frame
                i = find(b'"content":', ps, end)
                if i > 0 and end - i > 76:
                    i += 10
                    if data[i] == 0x20:
                        i += 1
                    if data[i] == 0x22 and data[i + 65] == 0x22 \
                            and 0x30 <= data[i + 1] <= 0x39:
                        add(i + 1)
                        pos = end
                        continue
                self.payload(data[ps:end], now)             # other JSON, warm-up
            elif 0x30 <= c <= 0x39 and end - ps >= 64:      # raw item
                add(ps)
            else:
                self.payload(data[ps:end], now)
            pos = end
        if starts:
            self.items(data, starts, now)
        self.buf = data[pos:]

    def bulk(self, data, n, now):
        """A big read: walk the frame headers only, then find and check all
        items of each run of plain text frames at once. Returns the offset of
        the first byte not consumed (a partial frame)."""
        pos = run = 0
        nf = 0
        while n - pos >= 2:
            b1 = data[pos + 1]
            if data[pos] != 0x81 or b1 > 126:      # control frame, fragment, ...
                if nf:
                    self.run(data, run, pos, nf, now)
                    nf = 0
                nxt = self.slow_frame(data, pos, now)
                if nxt < 0:
                    return pos
                pos = run = nxt
                continue
            if b1 == 126:
                if n - pos < 4:
                    break
                end = pos + 4 + (data[pos + 2] << 8 | data[pos + 3])
            else:
                end = pos + 2 + b1
            if end > n:
                break
            nf += 1
            pos = end
        if nf:
            self.run(data, run, pos, nf, now)
        return pos

    def run(self, data, a, b, nf, now):
        """data[a:b] holds nf complete unfragmented text frames: locate the
        items by their shape (12 digits, space, 19 digits, space, dots)."""
        arr = np.frombuffer(data, dtype=np.uint8, count=b, offset=0)
        sp = np.flatnonzero(arr[a + 12:b - 51] == 0x20) + a     # candidate starts
        if len(sp):
            g = arr[sp[:, None] + SHAPE_AT]
            sp = sp[((g >= SHAPE_LO) & (g <= SHAPE_HI)).all(axis=1)]
        k = len(sp)
        w = data.count(b"warmup", a, b) if k < nf else 0
        if k + w < nf:                 # frames without an item: look at each
            self.walk(data, a, b, now)
            return
        if k:
            self.items(data, sp, now)

    def walk(self, data, pos, b, now):
        """Per-frame path over complete unfragmented text frames."""
        starts = []
        while pos < b:
            b1 = data[pos + 1]
            if b1 == 126:
                ps = pos + 4
                end = ps + (data[pos + 2] << 8 | data[pos + 3])
            else:
                ps = pos + 2
                end = ps + b1
            p = data[ps:end]
            q = unwrap_json(p) if p[:1] == b"{" and UNWRAP != "no" else p
            if q is not None and len(q) >= 64 and q[:1].isdigit():
                starts.append(ps + (p.find(q) if q is not p else 0))
            else:
                if starts:
                    self.items(data, starts, now)
                    starts = []
                self.payload(p, now)
            pos = end
        if starts:
            self.items(data, starts, now)

    def items(self, data, starts, now):
        """Check the items at the given offsets of data (one read, in order)."""
        k = len(starts)
        first = self.expected
        if k >= BULK:
            arr = np.frombuffer(data, dtype=np.uint8)
            st = np.asarray(starts, dtype=np.int64)[:, None]
            seqs = (arr[st + D12].astype(np.int64) - 48) @ P12
            ts = (arr[st + 13 + D19].astype(np.int64) - 48) @ P19
            LATS.append(now - ts)
            in_order = first >= 0 and int(seqs[0]) == first and \
                np.array_equal(seqs, np.arange(first, first + k))
            if in_order:
                self.expected = first + k
            else:
                for s in seqs.tolist():
                    self.check(s)
        else:
            lat = LAT.append
            for s in starts:
                seq = int(data[s:s + 12])
                lat(now - int(data[s + 13:s + 32]))
                if seq == self.expected:
                    self.expected = seq + 1
                else:
                    self.check(seq)
        self.n += k
        self.last = now

    def check(self, seq):
        if seq == self.expected:
            self.expected = seq + 1
            return
        if self.seen is None:
            self.seen = set(range(self.expected))
            self.maxseq = self.expected - 1
            self.expected = -1
        if seq < 0 or seq >= COUNT:
            self.bad += 1
        elif seq in self.seen:
            self.dup += 1
        else:
            if seq < self.maxseq:
                self.ooo += 1
            self.seen.add(seq)
            if seq > self.maxseq:
                self.maxseq = seq

    def slow_frame(self, data, pos, now):
        """Parse one frame at pos; return the position after it, or -1 if the
        frame is not complete yet."""
        avail = len(data) - pos
        if avail < 2:
            return -1
        b0, b1 = data[pos], data[pos + 1]
        ln, hl = b1 & 0x7F, 2
        if ln == 126:
            if avail < 4:
                return -1
            ln, hl = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
        elif ln == 127:
            if avail < 10:
                return -1
            ln, hl = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
        if b1 & 0x80:               # servers must not mask
            self.bad += 1
            mk, hl = data[pos + hl:pos + hl + 4], hl + 4
        else:
            mk = None
        if avail < hl + ln:
            return -1
        payload = data[pos + hl:pos + hl + ln]
        if mk:
            payload = bytes(b ^ mk[i % 4] for i, b in enumerate(payload))
        op, fin = b0 & 0x0F, b0 & 0x80
        if op == 0x9:                               # ping
            if not self.close_sent:
                self.transport.write(mask_frame(0xA, payload[:125]))
        elif op == 0x8:                             # close
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.close_sent:
                self.close_sent = True
                self.transport.write(mask_frame(0x8, payload[:2]))
            self.transport.close()
        elif op == 0xA:                             # pong
            pass
        elif op in (0x1, 0x2):
            if fin:
                self.payload(payload, now)
            else:
                self.frag = [payload]
        elif op == 0x0 and self.frag is not None:   # continuation
            self.frag.append(payload)
            if fin:
                p, self.frag = b"".join(self.frag), None
                self.payload(p, now)
        else:
            self.bad += 1
        return pos + hl + ln

    def payload(self, p, now):
        """One data message, outside the fast path."""
        if p[:1] == b"{" and UNWRAP != "no":
            p = unwrap_json(p)
            if p is None:
                self.other += 1
                return
        if p[:1] == b"w":
            self.warm += 1
            return
        try:
            seq = int(p[:12])
            LAT.append(now - int(p[13:32]))
        except ValueError:
            self.bad += 1
            return
        self.n += 1
        self.last = now
        self.check(seq)

    def unique(self):
        return self.expected if self.seen is None else len(self.seen)

    def on_readable(self):
        """Reader callback of a raw-socket client (see open_client)."""
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(RECV_SIZE, ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.transport.close()
            return
        if not data:
            self.transport.close()
            return
        if anc:
            _level, typ, d = anc[0]
            if typ == SO_TIMESTAMPNS and len(d) >= 16:
                sec, nsec = TIMESPEC.unpack_from(d)
                self.data_received(data, sec * 1_000_000_000 + nsec)
                return
        self.data_received(data, None)


class SockTransport:
    """The two transport calls Client makes (pong/close writes, close), on a
    non-blocking socket read by loop.add_reader()."""

    __slots__ = ("sock", "loop", "client")

    def __init__(self, sock, loop, client):
        self.sock, self.loop, self.client = sock, loop, client

    def write(self, data):
        try:
            self.sock.send(data)
        except OSError:
            pass

    def close(self):
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.client.closed = True


async def open_client(loop, host, port, host_hdr, path, kernel_ts):
    """Connect, do the HTTP/1.1 upgrade, and return a Client reading the
    socket with recvmsg(): with kernel_ts, every read carries the time the
    kernel received its data (SO_TIMESTAMPNS, CLOCK_REALTIME like
    time.time_ns()), so latency does not include the load generator's own
    queueing while it works through thousands of ready sockets."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
        key = base64.b64encode(os.urandom(16))
        await loop.sock_sendall(sock, b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                                      b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                                      b"Sec-WebSocket-Version: 13\r\n\r\n" % (path, host_hdr, key))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise ConnectionError("closed during handshake")
            buf += chunk
            if len(buf) > 16384:
                raise ConnectionError("response headers too long")
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines, status, headers = parse_head(head)
        if len(status) < 2 or status[1] != b"101":
            raise ConnectionError("handshake: status %r" % lines[0][:80])
        if headers.get(b"sec-websocket-accept") != base64.b64encode(hashlib.sha1(key + GUID).digest()):
            raise ConnectionError("handshake: bad Sec-WebSocket-Accept")
        if headers.get(b"sec-websocket-extensions"):
            raise ConnectionError("handshake: unrequested extension")
        if kernel_ts:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except BaseException:
        sock.close()
        raise
    c = Client(host_hdr, path, None)
    c.hs = None
    c.sock = sock
    c.transport = SockTransport(sock, loop, c)
    loop.add_reader(sock.fileno(), c.on_readable)
    if rest:
        c.data_received(rest)
    return c


def proc_tree(pid):
    """C{pid} and its descendants (a pushservice --workers parent and its workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def _one_cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    """utime+stime of a process and its descendants (workers) in seconds, or None."""
    if not pid:
        return None
    try:
        return sum(_one_cpu(p) for p in proc_tree(pid))
    except (OSError, IndexError, ValueError):
        return None


def _one_rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def proc_rss_kb(pid):
    """RSS of a process and its descendants (workers), KB."""
    return sum(_one_rss_kb(p) for p in proc_tree(pid))


def self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(sorted_vals, p):
    if len(sorted_vals) == 0:
        return None
    k = max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1)
    return sorted_vals[k]


class LoadGen:
    def __init__(self, a):
        self.a = a
        self.clients = []
        self.connect_errors = 0
        self.last_error = None
        self.handshake_us = array("q")
        self.deadline = time.monotonic() + a.timeout
        self.redis = None
        u = urllib.parse.urlsplit(a.url)
        if u.scheme != "ws":
            raise SystemExit("only ws:// URLs are supported")
        self.host, self.port = u.hostname, u.port or 80
        self.host_hdr = u.netloc.encode()
        self.path = ((u.path or "/") + ("?" + u.query if u.query else "")).encode()
        # deliveries are read with recvmsg() for kernel receive timestamps; the
        # handshake-rate scenario uses the event loop's transports (cheaper)
        self.raw_sockets = a.mode != "connect" and a.timestamps == "kernel"

    def remaining(self):
        return self.deadline - time.monotonic()

    # -- connections ---------------------------------------------------------
    async def _connect_one(self, sem):
        async with sem:
            for attempt in range(self.a.connect_retries + 1):
                if self.remaining() <= 0:
                    return
                t0 = time.perf_counter_ns()
                loop = asyncio.get_running_loop()
                limit = min(30.0, max(1.0, self.remaining()))
                tr = None
                try:
                    if self.raw_sockets:
                        client = await asyncio.wait_for(
                            open_client(loop, self.host, self.port, self.host_hdr, self.path,
                                        self.a.timestamps == "kernel"), limit)
                    else:       # the event loop's own transport: cheaper handshakes
                        ready = loop.create_future()
                        tr, _ = await asyncio.wait_for(loop.create_connection(
                            lambda r=ready: Client(self.host_hdr, self.path, r),
                            self.host, self.port), limit)
                        client = await asyncio.wait_for(ready, limit)
                except Exception as e:  # noqa: BLE001 - any failure is counted
                    if tr is not None:
                        tr.abort()
                    self.connect_errors += 1
                    self.last_error = "%s: %s" % (type(e).__name__, e)
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                self.handshake_us.append((time.perf_counter_ns() - t0) // 1000)
                self.clients.append(client)
                return

    async def connect_all(self, n):
        sem = asyncio.Semaphore(self.a.concurrency)
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(self._connect_one(sem)) for _ in range(n)]
        last_report = t0
        while tasks:
            done, pending = await asyncio.wait(tasks, timeout=1.0)
            tasks = list(pending)
            now = time.perf_counter()
            if now - last_report > 5:
                log("connecting: %d/%d up, %d errors" % (len(self.clients), n, self.connect_errors))
                last_report = now
            if self.remaining() <= 0:
                for t in tasks:
                    t.cancel()
                break
        elapsed = time.perf_counter() - t0
        log("connected %d/%d in %.2fs (%d connect errors%s)" % (
            len(self.clients), n, elapsed, self.connect_errors,
            ", last: " + self.last_error if self.last_error else ""))
        return elapsed

    # -- warm-up: every connection must receive one warm-up item -------------
    def _redis(self):
        if self.redis is None:
            import redis
            self.redis = redis.Redis(host="127.0.0.1", port=self.a.redis_port, socket_timeout=10)
        return self.redis

    async def warmup(self, timeout=30.0):
        """Push warm-up items until each open connection got one. Returns the
        number of connections that never got one."""
        for c in self.clients:
            c.warm = 0
        r = self._redis()
        end = time.monotonic() + min(timeout, max(1.0, self.remaining()))
        push_every = 2.0
        next_push = 0.0
        while True:
            now = time.monotonic()
            if now >= next_push:
                r.lpush(self.a.queue, WARMUP)
                next_push = now + push_every
            waiting = sum(1 for c in self.clients if not c.warm and not c.closed)
            if waiting == 0 or now > end:
                break
            await asyncio.sleep(0.02)
        missing = sum(1 for c in self.clients if not c.warm)
        # let extra warm-up items drain before the measurement starts
        await asyncio.sleep(0.2)
        return missing

    # -- close ---------------------------------------------------------------
    async def close_all(self):
        for c in self.clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        await asyncio.sleep(0.3)

    # -- modes ---------------------------------------------------------------
    async def run_deliver(self):
        a = self.a
        res = {}
        res["connect_s"] = await self.connect_all(a.clients)
        res["connected"] = len(self.clients)
        exe = build_reader() if a.reader == "c" and self.raw_sockets else None
        res["reader"] = "c" if exe else "python"
        if exe:
            m = await self._measure_c(exe, res)
        else:
            m = await self._measure_python(res)
        expected = a.messages * len(self.clients)
        producer = res["producer"]
        first_push = producer.get("first_push_ns")
        last_delivery = m["last_ns"]
        span = (last_delivery - first_push) / 1e9 if first_push and last_delivery else None
        lat = m["lat"]
        deliveries = m["deliveries"]
        res.update({
            "messages": a.messages, "expected_deliveries": expected,
            "deliveries": deliveries, "missing": expected - m["unique"],
            "duplicates": m["duplicates"], "out_of_order": m["out_of_order"],
            "bad_frames": m["bad_frames"], "other_frames": m["other_frames"],
            "closed_by_server": m["closed"], "stalled": m["stalled"],
            "timed_out": m["timed_out"], "span_s": span,
            "deliveries_per_s": deliveries / span if span and span > 0 else None,
            "latency_ms": {k: (float(pct(lat, q)) / 1e6 if len(lat) else None)
                           for k, q in (("p50", 50), ("p90", 90), ("p99", 99),
                                        ("p999", 99.9), ("max", 100))},
            "loadgen_cpu_s": m["cpu_s"],
            "loadgen_cpu_pct": 100.0 * m["cpu_s"] / max(1e-9, m["wall_s"]),
            # server CPU over the delivery span (first push to last arrival),
            # where it did all its work; the measurement window is longer
            "server_cpu_s": m["server_cpu_s"],
            "server_cpu_pct": (100.0 * m["server_cpu_s"] / max(1e-9, span or m["wall_s"])
                               if m["server_cpu_s"] is not None else None),
            "measure_wall_s": m["wall_s"],
        })
        if res["server_cpu_s"] is not None and deliveries:
            res["server_cpu_us_per_op"] = 1e6 * res["server_cpu_s"] / deliveries
        res["ok"] = (res["missing"] == 0 and m["duplicates"] == 0 and m["out_of_order"] == 0
                     and m["bad_frames"] == 0 and res["connected"] == a.clients
                     and m["closed"] == 0)
        return res

    async def _start_producer(self):
        a = self.a
        cmd = [sys.executable, os.path.join(HERE, "producer.py"),
               "--redis-port", str(a.redis_port), "--queue", a.queue,
               "--count", str(a.messages), "--rate", str(a.rate)]
        prod = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
        return prod, asyncio.ensure_future(prod.communicate())

    @staticmethod
    def _producer_result(prod, prod_task):
        if not prod_task.done():
            prod.kill()
            return {"error": "producer did not finish"}
        out, _ = prod_task.result()
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"error": out.decode()[-500:]}

    async def _measure_python(self, res):
        """Read in this process (Client.on_readable): push the warm-up, run
        the producer, wait for every delivery."""
        a = self.a
        res["warmup_missing"] = await self.warmup()
        if res["warmup_missing"]:
            log("%d connections never got the warm-up item" % res["warmup_missing"])
        for c in self.clients:
            c.other = 0
        expected = a.messages * len(self.clients)
        cpu0, wall0 = self_cpu(), time.monotonic()
        scpu0 = proc_cpu(a.server_pid)
        prod, prod_task = await self._start_producer()
        last_total, last_change = -1, time.monotonic()
        stalled = timed_out = False
        while True:
            await asyncio.sleep(0.02)
            total = sum(c.n for c in self.clients)
            now = time.monotonic()
            if total >= expected and prod_task.done():
                break
            if total != last_total:
                last_total, last_change = total, now
            elif prod_task.done() and now - last_change > a.stall:
                stalled = True
                break
            if self.remaining() <= 0:
                timed_out = True
                break
        wall1, cpu1 = time.monotonic(), self_cpu()
        scpu1 = proc_cpu(a.server_pid)
        # a short grace period catches duplicates arriving after the last expected one
        if not stalled and not timed_out:
            await asyncio.sleep(a.grace)
        res["producer"] = self._producer_result(prod, prod_task)
        cs = self.clients
        return {
            "deliveries": sum(c.n for c in cs), "unique": sum(c.unique() for c in cs),
            "duplicates": sum(c.dup for c in cs), "out_of_order": sum(c.ooo for c in cs),
            "bad_frames": sum(c.bad for c in cs), "other_frames": sum(c.other for c in cs),
            "closed": sum(1 for c in cs if c.closed),
            "last_ns": max((c.last for c in cs), default=0),
            "lat": np.sort(np.concatenate([np.frombuffer(LAT, dtype=np.int64)] + LATS))
            if (LAT or LATS) else [],
            "stalled": stalled, "timed_out": timed_out,
            "cpu_s": cpu1 - cpu0, "wall_s": wall1 - wall0,
            "server_cpu_s": scpu1 - scpu0 if scpu0 is not None and scpu1 is not None else None,
        }

    async def _measure_c(self, exe, res):
        """Hand the sockets to bench/reader.c and let it read and check every
        delivery (see its header for why); this process pushes the warm-up
        and runs the producer."""
        import tempfile
        a = self.a
        loop = asyncio.get_running_loop()
        fds = []
        for c in self.clients:
            loop.remove_reader(c.sock.fileno())
            fds.append(c.sock.fileno())
        tmp = tempfile.mkdtemp(prefix="pushbench-reader-")
        fds_file, lat_file = os.path.join(tmp, "fds"), os.path.join(tmp, "lat")
        with open(fds_file, "w") as f:
            f.write("\n".join(map(str, fds)) + "\n")
        rd = await asyncio.create_subprocess_exec(
            exe, str(a.messages), "0" if a.unwrap == "no" else "1", str(a.stall),
            fds_file, lat_file, pass_fds=fds,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        # warm-up: an item every 2 s until every connection got one
        r = self._redis()
        end = time.monotonic() + min(30.0, max(1.0, self.remaining()))
        warm = asyncio.ensure_future(rd.stdout.readline())
        while not warm.done() and time.monotonic() < end:
            r.lpush(a.queue, WARMUP)
            await asyncio.wait([warm], timeout=2.0)
        if not warm.done():
            log("not every connection got the warm-up item")
        await asyncio.sleep(0.2)           # extra warm-up items drain
        cpu0, scpu0 = self_cpu(), proc_cpu(a.server_pid)
        rd.stdin.write(b"go\n")
        prod, prod_task = await self._start_producer()
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(prod_task), max(0.1, self.remaining()))
            rd.stdin.write(b"stall\n")
            await asyncio.wait_for(rd.wait(), max(0.1, self.remaining()))
        except asyncio.TimeoutError:
            timed_out = True
            rd.terminate()
        scpu1 = proc_cpu(a.server_pid)
        out = (await warm) + await rd.stdout.read()   # "warm" (if said), then the result
        if await rd.wait() != 0 or not out.strip():
            raise SystemExit("the C reader failed (exit %s): see its message above" % rd.returncode)
        res["producer"] = self._producer_result(prod, prod_task)
        m = json.loads(out.decode().strip().splitlines()[-1])
        res["warmup_missing"] = m.pop("never_warm")
        lat = np.sort(np.fromfile(lat_file, dtype=np.int64))
        shutil.rmtree(tmp, ignore_errors=True)
        m.update({
            "lat": lat, "last_ns": m["last_ns"], "timed_out": timed_out,
            "cpu_s": m["cpu_s"] + self_cpu() - cpu0,
            "server_cpu_s": scpu1 - scpu0 if scpu0 is not None and scpu1 is not None else None,
        })
        return m

    async def run_idle(self):
        a = self.a
        if not a.server_pid:
            raise SystemExit("idle mode needs --server-pid")
        res = {}
        await asyncio.sleep(0.5)
        base = proc_rss_kb(a.server_pid)
        res["rss_base_kb"] = base
        res["connect_s"] = await self.connect_all(a.clients)
        res["connected"] = len(self.clients)
        # wait for RSS to settle: two consecutive samples within 0.5 %
        prev = proc_rss_kb(a.server_pid)
        for _ in range(20):
            await asyncio.sleep(0.5)
            cur = proc_rss_kb(a.server_pid)
            if abs(cur - prev) <= 0.005 * prev:
                break
            prev = cur
        rss = proc_rss_kb(a.server_pid)
        res["rss_kb"] = rss
        n = max(1, len(self.clients))
        res["kb_per_conn"] = (rss - base) / n
        res["warmup_missing"] = await self.warmup()
        closed = sum(1 for c in self.clients if c.closed)
        res["closed_by_server"] = closed
        res["ok"] = (res["connected"] == a.clients and res["warmup_missing"] == 0
                     and closed == 0)
        return res

    async def run_connect(self):
        a = self.a
        res = {}
        cpu0 = self_cpu()
        scpu0 = proc_cpu(a.server_pid)
        elapsed = await self.connect_all(a.clients)
        cpu1 = self_cpu()
        scpu1 = proc_cpu(a.server_pid)
        n = len(self.clients)
        hs = sorted(self.handshake_us)
        res.update({
            "connect_s": elapsed, "connected": n, "connect_errors": self.connect_errors,
            "last_connect_error": self.last_error,
            "handshakes_per_s": n / elapsed if elapsed > 0 else None,
            "handshake_ms": {k: (pct(hs, q) / 1000.0 if hs else None)
                             for k, q in (("p50", 50), ("p99", 99), ("max", 100))},
            "loadgen_cpu_pct": 100.0 * (cpu1 - cpu0) / max(1e-9, elapsed),
            "server_cpu_pct": (100.0 * (scpu1 - scpu0) / max(1e-9, elapsed)
                               if scpu0 is not None and scpu1 is not None else None),
        })
        if scpu0 is not None and scpu1 is not None and n:
            res["server_cpu_us_per_op"] = 1e6 * (scpu1 - scpu0) / n
        res["warmup_missing"] = await self.warmup()
        res["ok"] = n == a.clients and res["warmup_missing"] == 0
        return res

    async def run(self):
        mode = self.a.mode
        try:
            if mode == "deliver":
                res = await self.run_deliver()
            elif mode == "idle":
                res = await self.run_idle()
            else:
                res = await self.run_connect()
        finally:
            await self.close_all()
        res["connect_errors"] = self.connect_errors
        if self.last_error:
            res["last_connect_error"] = self.last_error
        return res


def main(argv=None):
    global COUNT, UNWRAP
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/")
    p.add_argument("--mode", choices=("deliver", "idle", "connect"), default="deliver")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--rate", type=float, default=0.0, help="msg/s; 0 = all at once")
    p.add_argument("--concurrency", type=int, default=128, help="handshakes in flight")
    p.add_argument("--connect-retries", type=int, default=2)
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--queue", default="messages")
    p.add_argument("--server-pid", type=int, default=0,
                   help="server process, for RSS (idle) and CPU accounting")
    p.add_argument("--unwrap", choices=("auto", "no"), default="auto",
                   help="auto: frames starting with '{' are pushservice JSON frames")
    p.add_argument("--timeout", type=float, default=120.0, help="hard limit for the whole run, s")
    p.add_argument("--stall", type=float, default=10.0,
                   help="give up after this many s without a delivery")
    p.add_argument("--grace", type=float, default=0.3,
                   help="s to keep listening after the last expected delivery")
    p.add_argument("--timestamps", choices=("kernel", "app"), default="kernel",
                   help="receive time of a read: when the kernel got the data (SO_TIMESTAMPNS)"
                        " or when the load generator read it")
    p.add_argument("--reader", choices=("c", "python"), default="c",
                   help="deliver mode: read and check deliveries in bench/reader.c (built with"
                        " cc on first use) or in this process")
    p.add_argument("--no-uvloop", action="store_true")
    a = p.parse_args(argv)
    COUNT = a.messages
    UNWRAP = a.unwrap
    nofile = raise_nofile(a.clients + 1000)
    if nofile < a.clients + 100:
        log("warning: RLIMIT_NOFILE is %d, too low for %d clients" % (nofile, a.clients))
    lg = LoadGen(a)
    if not a.no_uvloop:
        try:
            import uvloop
            res = uvloop.run(lg.run())
        except ImportError:
            res = asyncio.run(lg.run())
    else:
        res = asyncio.run(lg.run())
    res["mode"] = a.mode
    res["clients"] = a.clients
    print(json.dumps(res))
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
