#!/usr/bin/env python3
"""Load benchmark of serve-guard on loopback; one JSON object per line.

The demo chat model (demo-out/sft) is served twice, without guards and behind the demo guard
(demo-out/guard as input and output guard, recipes/guard/policy.toml); both come from
`make demo`. 64 client threads send non-streaming chat requests (the prompts of
testdata/demo_chat_prompts.jsonl in turn, max_tokens 32, temperature 0.7) for 60 seconds each,
bounded also by --max-requests. Reported: requests/s, p50/p99 latency, 5xx count, 429 count,
requests the guards blocked, and the guards' share of latency: the wall time of the guard steps
(lathe_guard_step_seconds, input and output) over the time of the chat requests
(lathe_request_duration_seconds), both from the server's /metrics.

  python3 bench/bench_serve_guard.py [--seconds 60] [--clients 64] [--max-requests 100000]
"""
import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "serve-guard")
DEMO = os.path.join(ROOT, "demo-out")
OUT = os.path.join(ROOT, "bench-out", "serve-guard")


def start(guards, threads):
    os.makedirs(OUT, exist_ok=True)
    db = os.path.join(OUT, f"review-{'guards' if guards else 'none'}.sqlite")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    cmd = [BIN, "serve", "--model", os.path.join(DEMO, "sft"), "--db", db, "--listen", "127.0.0.1:0", "-q",
           "--max-tokens", "64", "--queue-len", "1024", "--max-batch", "32", "--request-timeout", "300"]
    if threads:
        cmd += ["--threads", str(threads)]
    if guards:
        guard = os.path.join(DEMO, "guard")
        cmd += ["--input-guard", guard, "--output-guard", guard, "--policy", os.path.join(ROOT, "recipes", "guard", "policy.toml")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    while line and "listening on" not in line:
        line = proc.stderr.readline()
    if "listening on" not in line:
        sys.exit(f"serve-guard did not start: {line}")
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
    host, port = line.split("http://")[1].strip().split(":")
    return proc, host, int(port)


def metrics(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def metric_sum(text, name, label_filter=""):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label_filter in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def run(guards, seconds, clients, max_requests, threads):
    proc, host, port = start(guards, threads)
    prompts = [json.loads(l) for l in open(os.path.join(ROOT, "testdata", "demo_chat_prompts.jsonl")) if l.strip()]
    bodies = []
    for p in prompts:
        messages = p.get("messages") or [{"role": "user", "content": p["prompt"]}]
        bodies.append(json.dumps({"messages": messages, "max_tokens": 32, "temperature": 0.7}))
    lock = threading.Lock()
    latencies, statuses, blocked = [], {}, [0]
    issued = [0]
    deadline = time.monotonic() + seconds

    def client(i):
        conn = http.client.HTTPConnection(host, port, timeout=300)
        n = i
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= max_requests:
                    return
                issued[0] += 1
            body = bodies[n % len(bodies)]
            n += clients
            t0 = time.monotonic()
            try:
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                status = response.status
            except Exception:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=300)
                status = 599
                data = b""
            elapsed = time.monotonic() - t0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(elapsed)
                    if b'"content_filter"' in data:
                        blocked[0] += 1

    started = time.monotonic()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.monotonic() - started
    text = metrics(host, port)
    proc.kill()
    proc.wait()
    latencies.sort()
    pct = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None
    request_seconds = metric_sum(text, "lathe_request_duration_seconds_sum", 'path="/v1/chat/completions"')
    guard_seconds = metric_sum(text, "lathe_guard_step_seconds_sum", 'direction="input"') + metric_sum(text, "lathe_guard_step_seconds_sum", 'direction="output"')
    return {
        "bench": "serve-guard",
        "guards": guards,
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "guard_share": round(guard_seconds / request_seconds, 4) if guards and request_seconds else 0.0,
        "blocked": blocked[0],
        "errors_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "errors_429": statuses.get(429, 0),
        "generated_tokens": int(metric_sum(text, "lathe_generated_tokens_total")),
        "batches": int(metric_sum(text, "lathe_engine_batches_total")),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=0, help="server threads (default: all cores)")
    args = parser.parse_args()
    for needed in (BIN, os.path.join(DEMO, "sft", "model.safetensors"), os.path.join(DEMO, "guard", "model.safetensors")):
        if not os.path.exists(needed):
            sys.exit(f"bench_serve_guard: {needed} is missing; run `make build` and `make demo` first")
    for guards in (False, True):
        print(json.dumps(run(guards, args.seconds, args.clients, args.max_requests, args.threads)), flush=True)


if __name__ == "__main__":
    main()
