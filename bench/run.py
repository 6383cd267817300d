"""Run a benchmark scenario against pushservice and the peers, in alternating
rounds, and print medians and ratios.

    python bench/run.py fanout-1k                    # 3 rounds, all servers
    python bench/run.py fanout-1k --rounds 1
    python bench/run.py --quick                      # smoke: fanout-1k, small
    python bench/run.py all --quick                  # every scenario, small
    python bench/run.py latency-1k --servers pushservice,picows
    python bench/run.py all --servers pushservice,baseline --baseline-twistd ../old/.venv/bin/twistd
    python bench/run.py fanout-1k latency-1k --servers pushservice,pushservice-w2 --server-cpus 0,1

It starts a private redis-server (free port, temp dir, no persistence) pinned
to the load CPU, then for each round and each server (order reversed every
other round) flushes Redis, starts the server pinned to the server CPU, waits
for GET /healthz = 200, runs bench/loadgen.py pinned to the load CPU, stops
the server (SIGTERM, then SIGKILL after 10 s) and collects the result. Server
logs go to the run directory (printed at the end).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from loadgen import raise_nofile  # the same limit-raising as the load generator

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (loadgen mode, params, metric, unit, higher is better, target)
SCENARIOS = {
    "fanout-1k": dict(mode="deliver", clients=1000, messages=2000, rate=0,
                      metric="deliveries_per_s", unit="deliveries/s", higher=True,
                      target=2_000_000,
                      quick=dict(clients=50, messages=200)),
    "fanout-10k": dict(mode="deliver", clients=10000, messages=200, rate=0,
                       metric="deliveries_per_s", unit="deliveries/s", higher=True,
                       target=2_000_000,
                       quick=dict(clients=200, messages=50)),
    "latency-1k": dict(mode="deliver", clients=1000, messages=2000, rate=200,
                       metric="p99_ms", unit="ms p99", higher=False, target=50,
                       quick=dict(clients=50, messages=100, rate=50)),
    "latency-1k-light": dict(mode="deliver", clients=1000, messages=500, rate=50,
                             metric="p99_ms", unit="ms p99", higher=False, target=15,
                             quick=dict(clients=50, messages=50, rate=25)),
    "latency-10k": dict(mode="deliver", clients=10000, messages=2000, rate=200,
                        metric="p99_ms", unit="ms p99", higher=False, target=100,
                        quick=dict(clients=200, messages=100, rate=50)),
    "latency-10k-light": dict(mode="deliver", clients=10000, messages=500, rate=50,
                              metric="p99_ms", unit="ms p99", higher=False, target=50,
                              quick=dict(clients=200, messages=50, rate=25)),
    "pipeline-10": dict(mode="deliver", clients=10, messages=400, rate=20,
                        metric="p50_ms", unit="ms p50", higher=False, target=2,
                        quick=dict(messages=40)),
    "idle-10k": dict(mode="idle", clients=10000,
                     metric="kb_per_conn", unit="KB/conn", higher=False, target=8,
                     quick=dict(clients=500)),
    "connect-rate": dict(mode="connect", clients=5000, concurrency=128,
                         metric="handshakes_per_s", unit="handshakes/s", higher=True,
                         target=3000,
                         quick=dict(clients=300, concurrency=32)),
}
SERVERS = ("pushservice", "websockets", "picows")
#: pushservice-w2, pushservice-w4, ...: pushservice with --workers=N (same --twistd), e.g. beside "pushservice".
WORKERS_PREFIX = "pushservice-w"


def workers_of(name):
    """N for a server named pushservice-wN, else None."""
    if name.startswith(WORKERS_PREFIX) and name[len(WORKERS_PREFIX):].isdigit():
        return int(name[len(WORKERS_PREFIX):])
    return None
#: Another pushservice (--baseline-twistd), for before/after numbers in one run.
BASELINE = "baseline"


def log(*a):
    print("[run]", *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu):
    """preexec_fn: pin the child to one CPU, or a set of CPUs (like taskset -c CPU)."""
    def fn():
        if cpu is not None:
            os.sched_setaffinity(0, cpu if isinstance(cpu, set) else {cpu})
        os.setpgrp()
    return fn


def wait_health(port, proc, timeout):
    url = "http://127.0.0.1:%d/healthz" % port
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s before it was ready" % proc.returncode)
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
                last = r.status
        except urllib.error.HTTPError as e:
            last = e.code
        except (OSError, ValueError) as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError("server not ready after %ss (last /healthz: %s)" % (timeout, last))


def stop(proc, timeout=10):
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log("pid %d ignored SIGTERM for %ss: SIGKILL" % (proc.pid, timeout))
        proc.kill()
        return proc.wait(5)


def server_cmd(name, port, rport, queue, a):
    py = sys.executable
    workers = workers_of(name)
    if name in ("pushservice", BASELINE) or workers:
        twistd = a.baseline_twistd if name == BASELINE else a.twistd
        cmd = [twistd, "-n", "--pidfile=", "pushservice",
               "--listen", "tcp:%d:interface=127.0.0.1%s" % (
                   port, "".join(":" + o for o in a.listen_opt)),
               "--redis", "redis://127.0.0.1:%d/0" % rport,
               "--queue", queue, "--max-connections", "20000"]
        return cmd + a.pushservice_arg + (["--workers=%d" % workers] if workers else [])
    script = os.path.join(HERE, "peers", "%s_peer.py" % name)
    cmd = [py, script, "--port", str(port), "--redis-port", str(rport), "--queue", queue]
    if a.peer_uvloop:
        cmd.append("--uvloop")
    return cmd


def metric_of(sc, res):
    m = sc["metric"]
    if m in ("p99_ms", "p50_ms"):
        return (res.get("latency_ms") or {}).get(m[:3])
    return res.get(m)


def run_one(name, scen, sc, rnd, rport, rcli, a, rundir):
    port = free_port()
    queue = "bench"
    rcli.flushall()
    logpath = os.path.join(rundir, "%s-%s-r%d.log" % (scen, name, rnd))
    logf = open(logpath, "wb")
    cmd = server_cmd(name, port, rport, queue, a)
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                            preexec_fn=pinned(a.server_cpu), cwd=rundir)
    res = {"server": name, "round": rnd, "log": logpath}
    try:
        wait_health(port, proc, a.ready_timeout)
        time.sleep(0.2)
        lg = [sys.executable, os.path.join(HERE, "loadgen.py"),
              "--url", "ws://127.0.0.1:%d/" % port, "--mode", sc["mode"],
              "--clients", str(sc["clients"]), "--redis-port", str(rport),
              "--queue", queue, "--server-pid", str(proc.pid),
              "--timeout", str(a.timeout)]
        if "messages" in sc:
            lg += ["--messages", str(sc["messages"]), "--rate", str(sc["rate"])]
        lg += ["--concurrency", str(sc.get("concurrency", a.concurrency))] + a.loadgen_arg
        t0 = time.monotonic()
        p = subprocess.run(lg, capture_output=True,
                           preexec_fn=pinned(a.load_cpu), timeout=a.timeout + 60)
        res["wall_s"] = time.monotonic() - t0
        err = p.stderr.decode(errors="replace").strip()
        if err:
            for line in err.splitlines()[-5:]:
                log("  loadgen:", line)
        try:
            res.update(json.loads(p.stdout.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            res["error"] = "loadgen gave no result (rc %s): %s" % (p.returncode, err[-300:])
    except subprocess.TimeoutExpired:
        res["error"] = "loadgen timed out"
    except RuntimeError as e:
        res["error"] = str(e)
    finally:
        if proc.poll() is not None and "error" not in res:
            res["error"] = "server died (rc %s)" % proc.returncode
        res["server_rc"] = stop(proc)
        logf.close()
    with open(logpath, "rb") as f:
        text = f.read().decode(errors="replace")
    res["log_tracebacks"] = text.count("Traceback")
    res["log_errors"] = sum(1 for ln in text.splitlines()
                            if "Unhandled" in ln or "ERROR" in ln or "Traceback" in ln)
    res["value"] = metric_of(sc, res)
    return res


def verdict(res):
    if res.get("error"):
        return "ERROR: " + " ".join(res["error"].split())[:70]
    bits = []
    for k, short in (("missing", "miss"), ("duplicates", "dup"), ("out_of_order", "ooo"),
                     ("bad_frames", "bad"), ("closed_by_server", "closed"),
                     ("warmup_missing", "nowarm"), ("connect_errors", "connerr")):
        if res.get(k):
            bits.append("%s=%s" % (short, res[k]))
    if res.get("stalled"):
        bits.append("stalled")
    if res.get("timed_out"):
        bits.append("timeout")
    if res.get("connected") is not None and res.get("connected") != res.get("clients"):
        bits.append("conn=%s/%s" % (res.get("connected"), res.get("clients")))
    if res.get("log_tracebacks"):
        bits.append("tracebacks=%d" % res["log_tracebacks"])
    return "ok" if res.get("ok") and not bits else ("FAIL " + " ".join(bits) if bits else "FAIL")


def fmt(v, unit):
    if v is None:
        return "-"
    if "deliveries" in unit or "handshakes" in unit:
        return f"{v:,.0f}"
    return "%.2f" % v


def report(scen, sc, results, servers):
    unit = sc["unit"]
    print()
    print("== %s: %s  (%s; target %s %s %s)" % (
        scen, ", ".join("%s=%s" % (k, sc[k]) for k in ("clients", "messages", "rate", "concurrency")
                        if k in sc),
        "higher is better" if sc["higher"] else "lower is better",
        ">=" if sc["higher"] else "<=", fmt(sc["target"], unit), unit))
    hdr = "%-15s %14s %25s %9s %9s %9s %9s  %s" % ("server", "median", "min - max", "lg cpu%",
                                                     "srv cpu%", "srv us/op", "p99 ms", "verdict (per round)")
    print(hdr)
    print("-" * len(hdr))
    med = {}
    for s in servers:
        rs = [r for r in results if r["server"] == s]
        vals = [r["value"] for r in rs if r.get("value") is not None]
        m = statistics.median(vals) if vals else None
        med[s] = m
        rng = "%s - %s" % (fmt(min(vals), unit), fmt(max(vals), unit)) if vals else "-"
        lg = [r.get("loadgen_cpu_pct") for r in rs if r.get("loadgen_cpu_pct") is not None]
        sv = [r.get("server_cpu_pct") for r in rs if r.get("server_cpu_pct") is not None]
        p99 = [(r.get("latency_ms") or {}).get("p99") for r in rs]
        p99 = [x for x in p99 if x is not None]
        op = [r.get("server_cpu_us_per_op") for r in rs if r.get("server_cpu_us_per_op") is not None]
        print("%-15s %14s %25s %9s %9s %9s %9s  %s" % (
            s, fmt(m, unit), rng,
            "%.0f" % statistics.median(lg) if lg else "-",
            "%.0f" % statistics.median(sv) if sv else "-",
            "%.1f" % statistics.median(op) if op else "-",
            "%.1f" % statistics.median(p99) if p99 else "-",
            "; ".join(verdict(r) for r in rs)))
    if med.get(BASELINE) and med.get("pushservice") is not None:
        print("ratio pushservice/baseline = %.2f  (%s)" % (
            med["pushservice"] / med[BASELINE], ">1 is better" if sc["higher"] else "<1 is better"))
    for s in servers:
        if workers_of(s) and med.get(s) is not None and med.get("pushservice"):
            print("ratio %s/pushservice = %.2f  (%s)" % (
                s, med[s] / med["pushservice"], ">1 is better" if sc["higher"] else "<1 is better"))
    peers = [s for s in servers if s not in ("pushservice", BASELINE) and not workers_of(s) and med.get(s)]
    if "pushservice" in servers and med.get("pushservice") is not None and peers:
        best = (max if sc["higher"] else min)(peers, key=lambda s: med[s])
        ratio = med["pushservice"] / med[best] if med[best] else float("nan")
        print("ratio pushservice/%s (best peer) = %.2f  (%s)" % (
            best, ratio, ">1 is better" if sc["higher"] else "<1 is better"))
    if med.get("pushservice") is not None:
        ok = med["pushservice"] >= sc["target"] if sc["higher"] else med["pushservice"] <= sc["target"]
        print("pushservice vs target: %s %s (%s)" % (
            fmt(med["pushservice"], unit), unit, "MET" if ok else "NOT MET"))
    lgb = [r for r in results if (r.get("loadgen_cpu_pct") or 0) > 85]
    if lgb:
        print("note: load generator above 85%% CPU in %d run(s) (%s): those numbers are"
              " a lower bound for the server" % (len(lgb), ", ".join(sorted({r["server"] for r in lgb}))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="scenarios: " + ", ".join(SCENARIOS) + ", all")
    p.add_argument("scenario", nargs="*", help="scenario names, or 'all' (default with --quick: fanout-1k)")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--quick", action="store_true", help="small smoke version of each scenario")
    p.add_argument("--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd"),
                   help="twistd that has the pushservice plugin (default: next to this python)")
    p.add_argument("--baseline-twistd", help="twistd of another pushservice: the server 'baseline' in --servers")
    p.add_argument("--pushservice-arg", action="append", default=[],
                   help="extra option for pushservice (repeatable), e.g. --pushservice-arg=--history=0")
    p.add_argument("--listen-opt", action="append", default=[],
                   help="extra option for pushservice's tcp: endpoint (repeatable), e.g. backlog=1024")
    p.add_argument("--loadgen-arg", action="append", default=[],
                   help="extra option for loadgen.py (repeatable), e.g. --loadgen-arg=--timestamps=app")
    p.add_argument("--peer-uvloop", action="store_true", help="run the peers on uvloop")
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--server-cpus", help="CPUs the server may use, e.g. 0,1 (overrides --server-cpu; for --workers)")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU for load generator, producer, redis")
    p.add_argument("--concurrency", type=int, default=128, help="handshakes in flight")
    p.add_argument("--timeout", type=float, default=120.0, help="per run (loadgen hard limit), s")
    p.add_argument("--ready-timeout", type=float, default=30.0, help="wait for /healthz, s")
    p.add_argument("--json", help="also write all raw results to this file")
    a = p.parse_args(argv)

    scen = a.scenario or (["fanout-1k"] if a.quick else None)
    if not scen:
        p.error("name a scenario (%s, all)" % ", ".join(SCENARIOS))
    if scen == ["all"]:
        scen = list(SCENARIOS)
    for s in scen:
        if s not in SCENARIOS:
            p.error("unknown scenario %r" % s)
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS + (BASELINE,) and not workers_of(s):
            p.error("unknown server %r (known: %s)" % (s, ", ".join(SERVERS + (BASELINE, WORKERS_PREFIX + "N"))))
    if BASELINE in servers and not (a.baseline_twistd and os.access(a.baseline_twistd, os.X_OK)):
        p.error("the server %r needs --baseline-twistd PATH" % BASELINE)
    if any(s == "pushservice" or workers_of(s) for s in servers) and not os.access(a.twistd, os.X_OK):
        p.error("no twistd at %s (use --twistd, or --servers websockets,picows)" % a.twistd)
    rounds = a.rounds or (1 if a.quick else 3)
    ncpu = os.cpu_count() or 1
    if ncpu < 2:
        log("only one CPU: not pinning")
        a.server_cpu = a.load_cpu = None
    elif a.server_cpus:
        a.server_cpu = {int(c) for c in a.server_cpus.split(",")}
    nofile = raise_nofile()
    os.sched_setaffinity(0, {a.load_cpu} if a.load_cpu is not None else set(range(ncpu)))

    rundir = tempfile.mkdtemp(prefix="pushbench-")
    rport = free_port()
    redis_proc = subprocess.Popen(
        [a.redis_server, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", rundir, "--daemonize", "no", "--loglevel", "warning"],
        stdout=open(os.path.join(rundir, "redis.log"), "wb"), stderr=subprocess.STDOUT,
        preexec_fn=pinned(a.load_cpu))
    import redis
    rcli = redis.Redis(host="127.0.0.1", port=rport, socket_timeout=10)
    for _ in range(100):
        try:
            rcli.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    log("redis on %d, RLIMIT_NOFILE %d, run dir %s" % (rport, nofile, rundir))
    everything = {}
    try:
        for name in scen:
            sc = dict(SCENARIOS[name])
            if a.quick:
                sc.update(sc["quick"])
            results = []
            for rnd in range(rounds):
                order = servers if rnd % 2 == 0 else servers[::-1]
                for s in order:
                    log("%s round %d/%d: %s" % (name, rnd + 1, rounds, s))
                    r = run_one(s, name, sc, rnd, rport, rcli, a, rundir)
                    log("  -> %s %s  %s" % (fmt(r.get("value"), sc["unit"]), sc["unit"], verdict(r)))
                    results.append(r)
            everything[name] = results
            report(name, sc, results, servers)
    finally:
        stop(redis_proc, 5)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(everything, f, indent=1)
        print("\nlogs and raw results: %s" % rundir)
        with open(os.path.join(rundir, "results.json"), "w") as f:
            json.dump(everything, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
