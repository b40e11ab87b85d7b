#!/usr/bin/env python3
"""Bounded load test of `fastkv serve`: concurrent streaming chat completions over loopback.

N client threads each loop, until the duration is over, issuing streaming chat
completions (short varied prompts, temperature 0.7) with http.client; a request in
progress at the deadline is allowed to finish. Per request it records the HTTP status,
the time to the first content delta, the content chunks received, whether the stream
ended with `data: [DONE]`, and the total time. 503 (queue full) is counted as
"rejected" and the client backs off 0.2 s; any other status, a connection error, a
stream without [DONE] or with malformed JSON, counts as failed. With --server-pid the
server's VmRSS is sampled every 0.5 s. Prints a markdown table; --json writes every
figure. Standard library only.

    fastkv serve -m models/SmolLM2-135M-Instruct.Q4_1.gguf --port 8080 -c 4096 -np 4 &
    python3 benches/load_test.py --base-url http://127.0.0.1:8080 --clients 8 --duration 60 \\
        --server-pid $! --json /tmp/load.json --check

--check: exit 1 if any request failed, if none succeeded, or if the server's RSS in the
last third of the run exceeds the maximum of the first third by more than 10% + 32 MiB.
"""
import argparse
import http.client
import ipaddress
import json
import random
import socket
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Tell me a fun fact about octopuses.",
    "What is the capital of Japan?",
    "Write a haiku about autumn.",
    "Give me three tips for sleeping better.",
    "Explain what a rainbow is in one sentence.",
    "Name a famous painter and one of their works.",
    "What should I cook for dinner tonight?",
    "Describe the smell of rain.",
    "How many legs does a spider have?",
    "Suggest a name for a small grey cat.",
    "Why is the sky blue?",
    "Write a short greeting for a birthday card.",
    "What is 12 times 7?",
    "List two uses of a paperclip.",
    "Summarize the story of Cinderella in two sentences.",
    "What is photosynthesis?",
    "Recommend a board game for four players.",
    "Translate 'good morning' into French.",
    "What makes a good cup of tea?",
    "Describe a sunset over the ocean.",
    "Give me a word that rhymes with 'light'.",
    "What do bees make?",
    "Write one line of a sea shanty.",
    "How do I say thank you politely in an email?",
]
RSS_INTERVAL_S = 0.5
BACKOFF_S = 0.2
MIB = 1024 * 1024


def percentile(values, q):
    """Linear-interpolation percentile (numpy's default); None for no values."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Target:
    def __init__(self, base_url, api_key, timeout):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise SystemExit(f"--base-url must look like http://127.0.0.1:PORT, got {base_url!r}")
        self.host, self.port = u.hostname, u.port or 80
        try:
            addrs = {ai[4][0] for ai in socket.getaddrinfo(self.host, self.port, proto=socket.IPPROTO_TCP)}
        except socket.gaierror as e:
            raise SystemExit(f"cannot resolve {self.host}: {e}")
        if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
            raise SystemExit(f"refusing to load-test {self.host} ({sorted(addrs)}): loopback addresses only")
        self.prefix = u.path.rstrip("/")
        if self.prefix.endswith("/v1"):
            self.prefix = self.prefix[:-3]
        self.api_key = api_key
        self.timeout = timeout

    def connect(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def headers(self):
        h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def get(self, path):
        conn = self.connect()
        try:
            conn.request("GET", self.prefix + path, headers=self.headers())
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def wait_ready(self, seconds):
        deadline = time.monotonic() + seconds
        last = None
        while time.monotonic() < deadline:
            try:
                status, body = self.get("/health")
                if status == 200:
                    return
                last = f"HTTP {status} {body[:100]!r}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.5)
        raise SystemExit(f"server not ready after {seconds} s: {last}")


def stream_request(target, body):
    """One streaming chat completion. Returns a dict of what was observed."""
    r = {"status": None, "ttft_s": None, "tokens": 0, "done": False, "total_s": None,
         "decode_tps": None, "usage_completion_tokens": None, "finish_reason": None, "error": None}
    t0 = time.monotonic()
    t_last = None
    conn = target.connect()
    try:
        conn.request("POST", target.prefix + "/v1/chat/completions", body=json.dumps(body),
                     headers=target.headers())
        resp = conn.getresponse()
        r["status"] = resp.status
        if resp.status != 200:
            resp.read()
            if resp.status != 503:
                r["error"] = f"HTTP {resp.status}"
            return r
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.rstrip(b"\r\n")
            if not line or line.startswith(b":"):
                continue  # event separator or SSE comment
            if r["done"]:
                r["error"] = "data after [DONE]"
                break
            if not line.startswith(b"data:"):
                continue  # other SSE fields (event:, id:) are allowed and ignored
            payload = line[5:].strip()
            if payload == b"[DONE]":
                r["done"] = True
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                r["error"] = "malformed JSON"
                break
            if not isinstance(obj, dict) or "error" in obj:
                r["error"] = "error event in stream"
                break
            for ch in obj.get("choices") or []:
                content = (ch.get("delta") or {}).get("content")
                if content:
                    now = time.monotonic()
                    if r["ttft_s"] is None:
                        r["ttft_s"] = now - t0
                    t_last = now
                    r["tokens"] += 1
                if ch.get("finish_reason"):
                    r["finish_reason"] = ch["finish_reason"]
            usage = obj.get("usage")
            if isinstance(usage, dict):
                r["usage_completion_tokens"] = usage.get("completion_tokens")
        if r["error"] is None and not r["done"]:
            r["error"] = "stream ended without [DONE]"
        if r["error"] is None and r["finish_reason"] is None:
            r["error"] = "no finish_reason"
    except (OSError, http.client.HTTPException) as e:
        r["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
        r["total_s"] = time.monotonic() - t0
    if r["tokens"] >= 2 and t_last > t0 + r["ttft_s"]:
        r["decode_tps"] = (r["tokens"] - 1) / (t_last - (t0 + r["ttft_s"]))
    return r


def client_loop(idx, target, args, deadline, results, lock):
    rng = random.Random(1000 + idx)
    n = 0
    while time.monotonic() < deadline:
        body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": args.max_tokens, "temperature": 0.7, "seed": rng.randrange(1 << 31),
                "stream": True, "stream_options": {"include_usage": True}}
        r = stream_request(target, body)
        r["client"], r["n"] = idx, n
        n += 1
        with lock:
            results.append(r)
        if r["status"] == 503 or r["error"]:
            time.sleep(BACKOFF_S)  # queue full (or server trouble): back off, then continue


def read_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"no VmRSS in /proc/{pid}/status")


def rss_sampler(pid, t_start, stop, samples, state):
    while not stop.is_set():
        try:
            samples.append((time.monotonic() - t_start, read_rss_kib(pid) * 1024))
        except OSError:
            state["server_gone"] = True
            return
        stop.wait(RSS_INTERVAL_S)


def fmt(v, unit="", digits=1):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}{unit}"


def finish(fig, problems, json_path, check):
    """Record `problems` in `fig`, write it to `json_path` (if given), print the
    problems, and return the exit status (1 under `check` if there are any)."""
    fig["check_problems"] = problems
    if json_path:
        with open(json_path, "w") as f:
            json.dump(fig, f, indent=2)
    if problems:
        print("\n" + "; ".join(problems), file=sys.stderr)
    return 1 if check and problems else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT (loopback only)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60, help="seconds during which new requests start")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-pid", type=int, help="sample this process's VmRSS every 0.5 s")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--api-key")
    ap.add_argument("--timeout", type=float, default=120, help="socket timeout per request, seconds")
    ap.add_argument("--wait", type=float, default=60, help="seconds to wait for /health first")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on any failed request, no successful request, or unbounded RSS growth")
    a = ap.parse_args()
    if a.clients < 1 or a.duration <= 0 or a.max_tokens < 1:
        raise SystemExit("--clients, --duration and --max-tokens must be positive")

    target = Target(a.base_url, a.api_key, a.timeout)
    rss0 = None
    if a.server_pid:
        try:
            rss0 = read_rss_kib(a.server_pid) * 1024
        except OSError as e:
            raise SystemExit(f"cannot read VmRSS of pid {a.server_pid}: {e}")
    target.wait_ready(a.wait)

    results, lock = [], threading.Lock()
    samples, rss_state, stop = [], {"server_gone": False}, threading.Event()
    t_start = time.monotonic()
    deadline = t_start + a.duration
    sampler = None
    if a.server_pid:
        sampler = threading.Thread(target=rss_sampler, daemon=True,
                                   args=(a.server_pid, t_start, stop, samples, rss_state))
        sampler.start()
    threads = [threading.Thread(target=client_loop, daemon=True, args=(i, target, a, deadline, results, lock))
               for i in range(a.clients)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        print("interrupted: reporting what was recorded so far", file=sys.stderr)
    elapsed = time.monotonic() - t_start
    stop.set()
    if sampler:
        sampler.join(timeout=2)
        if not rss_state["server_gone"]:
            try:  # one last sample, so that a short run still has one in its last third
                samples.append((time.monotonic() - t_start, read_rss_kib(a.server_pid) * 1024))
            except OSError:
                rss_state["server_gone"] = True

    with lock:
        results = list(results)
    ok = [r for r in results if r["status"] == 200 and not r["error"]]
    rejected = [r for r in results if r["status"] == 503]
    failed = [r for r in results if r["error"] and r["status"] != 503]
    reasons = {}
    for r in failed:
        reasons[r["error"]] = reasons.get(r["error"], 0) + 1
    ttfts = [r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None]
    decode = [r["decode_tps"] for r in ok if r["decode_tps"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    usage_tokens = sum(r["usage_completion_tokens"] or 0 for r in ok)
    fig = {
        "config": {"base_url": a.base_url, "clients": a.clients, "duration_s": a.duration,
                   "max_tokens": a.max_tokens, "temperature": 0.7, "server_pid": a.server_pid},
        "elapsed_s": elapsed,
        "requests_total": len(results),
        "requests_ok": len(ok),
        "requests_rejected_503": len(rejected),
        "requests_failed": len(failed),
        "failure_reasons": reasons,
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p99": percentile(ttfts, 99),
        "ttft_ms_max": max(ttfts) if ttfts else None,
        "tokens_received": tokens,
        "usage_completion_tokens": usage_tokens,
        "aggregate_tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "decode_tokens_per_s_p50": percentile(decode, 50),
        "request_s_p50": percentile([r["total_s"] for r in ok], 50),
        "request_s_p99": percentile([r["total_s"] for r in ok], 99),
    }
    rss_ok = True
    if a.server_pid:
        third = elapsed / 3
        first = [b for t, b in samples if t < third]
        last = [b for t, b in samples if t >= 2 * third]
        vals = [b for _, b in samples]
        fig["rss"] = {
            "before_bytes": rss0,
            "min_bytes": min(vals) if vals else None,
            "max_bytes": max(vals) if vals else None,
            "first_third_max_bytes": max(first) if first else None,
            "last_third_max_bytes": max(last) if last else None,
            "samples": len(samples),
            "server_exited": rss_state["server_gone"],
            "series": [[round(t, 2), b] for t, b in samples],
        }
        limit = None
        if first and last:
            limit = max(first) * 1.10 + 32 * MIB
            rss_ok = max(last) <= limit
        else:
            rss_ok = False  # no samples in a third: the server exited or the run was too short
        fig["rss"]["growth_limit_bytes"] = limit
        fig["rss"]["bounded"] = rss_ok

    rows = [
        ("elapsed", fmt(elapsed, " s")),
        ("clients / max_tokens", f"{a.clients} / {a.max_tokens}"),
        ("requests ok", str(len(ok))),
        ("requests rejected (503, queue full)", str(len(rejected))),
        ("requests failed", str(len(failed)) + (f" ({reasons})" if reasons else "")),
        ("TTFT p50", fmt(fig["ttft_ms_p50"], " ms")),
        ("TTFT p99", fmt(fig["ttft_ms_p99"], " ms")),
        ("generated tokens (content chunks)", f"{tokens:,} (usage: {usage_tokens:,})"),
        ("aggregate generated tokens/s", fmt(fig["aggregate_tokens_per_s"])),
        ("per-request decode tokens/s, p50", fmt(fig["decode_tokens_per_s_p50"])),
        ("request time p50 / p99", f"{fmt(fig['request_s_p50'], ' s', 2)} / {fmt(fig['request_s_p99'], ' s', 2)}"),
    ]
    if a.server_pid:
        r = fig["rss"]
        m = lambda b: fmt(b / MIB if b is not None else None, " MiB")  # noqa: E731
        rows += [
            ("server RSS before", m(r["before_bytes"])),
            ("server RSS min / max", f"{m(r['min_bytes'])} / {m(r['max_bytes'])}"),
            ("server RSS max, first third / last third",
             f"{m(r['first_third_max_bytes'])} / {m(r['last_third_max_bytes'])}"),
            ("server RSS bounded (last <= first x 1.1 + 32 MiB)",
             ("yes" if rss_ok else "NO") + (" (server exited)" if r["server_exited"] else "")),
        ]
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")

    problems = []
    if failed:
        problems.append(f"{len(failed)} request(s) failed: {reasons}")
    if not ok:
        problems.append("no request succeeded")
    if a.server_pid and not rss_ok:
        problems.append("server RSS grew without bound (or the server exited)")
    fig["requests"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results]
    return finish(fig, problems, a.json, a.check)


if __name__ == "__main__":
    sys.exit(main())
