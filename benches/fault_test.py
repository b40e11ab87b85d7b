#!/usr/bin/env python3
"""Fault test of `fastkv serve`: well-behaved streaming clients while others misbehave.

While --clients well-behaved clients loop over streaming chat completions (as in
load_test.py), for --duration seconds these run beside them, each in its own thread:

- slow headers: connections that send a request line one byte a second (cut off by the
  server's --timeout);
- slow body: a complete header, then the body one byte a second (408, or a close);
- slow reader: a streaming request read one byte a second, then dropped;
- mid-stream disconnects: streaming requests dropped (RST) after three content chunks;
- mid-compression disconnects: requests whose long system message is a document to
  compress (the server needs an eviction policy on), dropped 0.3 s after sending;
- oversized bodies: a Content-Length of 100 MB announced, and 9 MiB really sent,
  chunked (413 for both);
- malformed bodies: bad JSON, wrong types and shapes, non-UTF-8, wrong Content-Type,
  deep nesting, a truncated body (a 4xx answer, never a 5xx or a dead connection);
- past the context: prompts longer than the server's context (400, saying so);

and /health is polled every 50 ms on a fresh connection. Afterwards as many requests as
the server has slots run at once (a slot held by a dropped client would stall one),
and the server's RSS, after an idle pause, is compared with its baseline (taken after a
warm-up that exercised every slot and one document compression).

    fastkv serve -m models/SmolLM2-135M-Instruct.Q4_1.gguf --port 8080 -c 2048 -np 4 \\
        --kv-policy snapkv --kv-keep 0.5 --timeout 5 &
    python3 benches/fault_test.py --base-url http://127.0.0.1:8080 --server-pid $! \\
        --slots 4 --context 2048 --server-timeout 5 --document-file doc.txt --check

--check: exit 1 unless every well-behaved request completed, every fault got its
expected answer, /health always answered 200 within 100 ms, and the RSS came back to
within 10% + 32 MiB of the baseline. Standard library only.
"""
import argparse
import json
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_test import (  # noqa: E402
    MIB, PROMPTS, Target, finish, percentile, read_rss_kib, stream_request)

HEALTH_EVERY_S = 0.05
HEALTH_LIMIT_MS = 100.0


class Recorder:
    """Fault outcomes, thread-safe: each is (scenario, ok, detail)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes = []

    def add(self, scenario, ok, detail):
        with self.lock:
            self.outcomes.append({"scenario": scenario, "ok": bool(ok), "detail": detail})


def raw_connect(target, timeout):
    s = socket.create_connection((target.host, target.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def abort(sock):
    """Close with a TCP reset, as a crashed client or a dropped network would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def head(target, path, length, content_type="application/json"):
    h = (f"POST {target.prefix}{path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
         f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n")
    if target.api_key:
        h += f"Authorization: Bearer {target.api_key}\r\n"
    return (h + "Connection: close\r\n\r\n").encode()


def status_of(data):
    """The status code in the first line of a response (None if there is none)."""
    parts = data.split(b"\r\n", 1)[0].split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def read_status(sock):
    """The status code of the response on `sock` (None if it closed without one)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return status_of(data)


def read_response(sock):
    """(status, body bytes) of a whole `Connection: close` response."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    if not data:
        return None, b""
    return status_of(data), data.partition(b"\r\n\r\n")[2]


def post_raw(target, path, body, content_type="application/json", timeout=30):
    s = raw_connect(target, timeout)
    try:
        s.sendall(head(target, path, len(body), content_type) + body)
        return read_response(s)
    finally:
        s.close()


def chat_body(content, max_tokens, stream=True, system=None):
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "seed": 7,
            "stream": stream}


# ---- the misbehaving clients -------------------------------------------------------


def trickle(sock, data, t0, give_up_s):
    """Send `data` a byte a second until the server answers or hangs up. Returns the
    seconds from `t0` until then and the first bytes it sent (empty if it hung up), or
    (None, b"") if it did neither within `give_up_s`."""
    try:
        for b in data:
            sock.send(bytes([b]))
            time.sleep(1.0)
            sock.setblocking(False)
            try:
                return time.monotonic() - t0, sock.recv(4096)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if time.monotonic() - t0 > give_up_s:
                break
    except OSError:  # reset or broken pipe: the server hung up
        return time.monotonic() - t0, b""
    return None, b""


def slow_headers(target, rec, server_timeout, idx):
    """Send a request line one byte a second; the server must hang up by its timeout."""
    line = f"POST {target.prefix}/v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + "a" * 200
    t0 = time.monotonic()
    s = raw_connect(target, server_timeout * 4 + 10)
    try:
        closed_after, first = trickle(s, line.encode(), t0, server_timeout * 4 + 10)
    finally:
        s.close()
    ok = closed_after is not None and closed_after <= server_timeout + 3 and status_of(first) in (None, 408)
    rec.add("slow headers (1 byte/s)", ok,
            f"#{idx}: cut off after {closed_after:.1f} s" if closed_after else f"#{idx}: never cut off")


def slow_body(target, rec, server_timeout):
    """A whole header, then the body one byte a second: 408 (or a close) by the timeout."""
    body = json.dumps(chat_body("Hello there, how are you today?", 8, stream=False)).encode()
    t0 = time.monotonic()
    s = raw_connect(target, server_timeout * 4 + 10)
    try:
        s.sendall(head(target, "/v1/chat/completions", len(body)))
        after, first = trickle(s, body, t0, server_timeout * 4 + 10)
    except OSError:
        after, first = time.monotonic() - t0, b""
    finally:
        s.close()
    status = status_of(first)
    ok = after is not None and after <= server_timeout + 3 and status in (None, 408)
    rec.add("slow body (1 byte/s)", ok,
            f"answered {status} after {after:.1f} s" if after else "never answered")


def slow_reader(target, rec, seconds):
    """A streaming request read one byte a second, then dropped."""
    body = json.dumps(chat_body("Write a long story about a lighthouse keeper.", 200)).encode()
    s = raw_connect(target, 30)
    got = 0
    try:
        s.sendall(head(target, "/v1/chat/completions", len(body)) + body)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            if not s.recv(1):
                break
            got += 1
            time.sleep(1.0)
    except OSError as e:
        rec.add("slow reader (1 byte/s), dropped", False, f"{type(e).__name__}: {e}")
        return
    finally:
        abort(s)
    rec.add("slow reader (1 byte/s), dropped", got > 0, f"read {got} bytes, then dropped")


def stream_then_drop(target, body, after_chunks):
    """Start a streaming request, read `after_chunks` data events, drop it. Returns the
    status and the number of events read."""
    s = raw_connect(target, 60)
    try:
        s.sendall(head(target, "/v1/chat/completions", len(body)) + body)
        f = s.makefile("rb")
        status_line = f.readline().split()
        status = int(status_line[1]) if len(status_line) >= 2 else None
        events = 0
        while status == 200 and events < after_chunks:
            line = f.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                events += 1
        f.close()
        return status, events
    finally:
        abort(s)


def mid_stream_drops(target, rec, deadline, n_max):
    n = 0
    while time.monotonic() < deadline and n < n_max:
        body = json.dumps(chat_body(PROMPTS[n % len(PROMPTS)], 64)).encode()
        try:
            status, events = stream_then_drop(target, body, 3)
            ok = status == 200 and events == 3
            rec.add("disconnect mid-stream", ok, f"HTTP {status}, dropped after {events} events")
        except OSError as e:
            rec.add("disconnect mid-stream", False, f"{type(e).__name__}: {e}")
        n += 1
        time.sleep(0.5)


def mid_compression_drops(target, rec, document, deadline, n_max):
    n = 0
    while time.monotonic() < deadline and n < n_max:
        # A different document each time, so each must be compressed anew.
        system = f"Document {n} of the fault test.\n\n{document}"
        body = json.dumps(chat_body("What is the document about?", 32, system=system)).encode()
        try:
            s = raw_connect(target, 60)
            s.sendall(head(target, "/v1/chat/completions", len(body)) + body)
            time.sleep(0.3)
            abort(s)
            rec.add("disconnect mid-document-compression", True, f"document {n} dropped after 0.3 s")
        except OSError as e:
            rec.add("disconnect mid-document-compression", False, f"{type(e).__name__}: {e}")
        n += 1
        time.sleep(2.0)


def oversized(target, rec):
    # Announce 100 MB and start sending: refused at once, not read to the end.
    t0 = time.monotonic()
    s = raw_connect(target, 30)
    status = None
    try:
        s.sendall(head(target, "/v1/chat/completions", 100_000_000) + b"{" + b" " * 65536)
        status = read_status(s)
    except OSError as e:
        rec.add("oversized body (100 MB announced)", False, f"{type(e).__name__}: {e}")
        return
    finally:
        abort(s)
    took = time.monotonic() - t0
    rec.add("oversized body (100 MB announced)", status == 413 and took < 5,
            f"HTTP {status} after {took:.2f} s")
    # 9 MiB really sent, chunked: no length to trust, the limit counts what arrives.
    t0 = time.monotonic()
    s = raw_connect(target, 30)
    status = None
    try:
        h = head(target, "/v1/chat/completions", 0).replace(
            b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
        s.sendall(h)
        chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
        for _ in range(9 * 16):
            s.sendall(chunk)
        s.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server answered and hung up before the client had sent it all
    try:
        status = read_status(s)
    except OSError as e:
        status = type(e).__name__
    finally:
        abort(s)
    took = time.monotonic() - t0
    rec.add("oversized body (9 MiB sent, chunked)", status == 413, f"HTTP {status} after {took:.2f} s")


MALFORMED = [
    ("not JSON", b"{this is not json", "application/json", (400, 422)),
    ("empty body", b"", "application/json", (400, 422)),
    ("a JSON array", b"[1, 2, 3]", "application/json", (400, 422)),
    ("messages is a string", b'{"messages": "hi"}', "application/json", (400, 422)),
    ("no messages", b'{"max_tokens": 4}', "application/json", (400, 422)),
    ("empty messages", b'{"messages": []}', "application/json", (400, 422)),
    ("unknown role", b'{"messages": [{"role": "wizard", "content": "hi"}]}', "application/json", (400, 422)),
    ("max_tokens negative", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
     "application/json", (400, 422)),
    ("max_tokens huge", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e300}',
     "application/json", (400, 422)),
    ("temperature a string", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
     "application/json", (400, 422)),
    ("top_p out of range", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 7}',
     "application/json", (400, 422)),
    ("non-UTF-8 bytes", b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}',
     "application/json", (400, 422)),
    ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000, "application/json", (400, 422)),
    ("text/plain content type", b'{"messages": [{"role": "user", "content": "hi"}]}',
     "text/plain", (415,)),
    ("form content type", b"messages=hi", "application/x-www-form-urlencoded", (415,)),
]


def malformed(target, rec):
    for name, body, ctype, expected in MALFORMED:
        try:
            status, text = post_raw(target, "/v1/chat/completions", body, ctype)
            ok = status in expected
            try:
                ok = ok and "error" in json.loads(text)
            except ValueError:
                ok = False
            rec.add("malformed body", ok, f"{name}: HTTP {status}")
        except OSError as e:
            rec.add("malformed body", False, f"{name}: {type(e).__name__}: {e}")
    # Fewer bytes than the Content-Length, then the client closes its side.
    try:
        s = raw_connect(target, 30)
        s.sendall(head(target, "/v1/chat/completions", 100) + b'{"messages": [')
        s.shutdown(socket.SHUT_WR)
        status, _ = read_response(s)
        s.close()
        rec.add("malformed body", status is None or 400 <= status < 500,
                f"truncated body: HTTP {status}")
    except OSError as e:
        rec.add("malformed body", True, f"truncated body: connection closed ({type(e).__name__})")


def past_context(target, rec, n_ctx, document):
    # Well past the context however the text tokenizes (>= 1 token per 8 characters).
    words = (document + " ") * (1 + n_ctx * 8 // max(1, len(document)))
    for path, body in [
        ("/v1/chat/completions", chat_body(words, 8, stream=True)),
        ("/v1/completions", {"prompt": words, "max_tokens": 8}),
    ]:
        try:
            status, text = post_raw(target, path, json.dumps(body).encode())
            msg = json.loads(text).get("error", {}).get("message", "") if text else ""
            rec.add("prompt past the context", status == 400 and "context" in msg,
                    f"{path}: HTTP {status}: {msg[:100]}")
        except (OSError, ValueError) as e:
            rec.add("prompt past the context", False, f"{path}: {type(e).__name__}: {e}")


# ---- the well-behaved ones ---------------------------------------------------------


def well_behaved(idx, target, deadline, max_tokens, results, lock):
    n = 0
    while time.monotonic() < deadline:
        body = chat_body(PROMPTS[(idx * 7 + n) % len(PROMPTS)], max_tokens)
        body["seed"] = 1000 * idx + n
        r = stream_request(target, body)
        n += 1
        with lock:
            results.append(r)


def health_poller(target, stop, samples):
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            status, _ = target.get("/health")
        except OSError as e:
            status = f"{type(e).__name__}"
        samples.append(((time.monotonic() - t0) * 1e3, status))
        stop.wait(HEALTH_EVERY_S)


def settled_rss(pid, seconds=3.0):
    """The server's RSS after `seconds` of quiet: the median of three samples."""
    time.sleep(seconds)
    vals = []
    for _ in range(3):
        vals.append(read_rss_kib(pid) * 1024)
        time.sleep(0.3)
    return sorted(vals)[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT (loopback only)")
    ap.add_argument("--server-pid", type=int, required=True, help="the server's pid (for its RSS)")
    ap.add_argument("--slots", type=int, required=True, help="the server's -np")
    ap.add_argument("--context", type=int, required=True, help="the server's -c")
    ap.add_argument("--server-timeout", type=float, required=True, help="the server's --timeout")
    ap.add_argument("--document-file", required=True,
                    help="text for the documents to compress (~1-2k tokens are used)")
    ap.add_argument("--clients", type=int, default=2, help="well-behaved streaming clients")
    ap.add_argument("--duration", type=float, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--api-key")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if a.slots < 1 or a.context < 64 or a.clients < 1 or a.duration <= 0:
        raise SystemExit("--slots, --context, --clients and --duration must be positive")
    with open(a.document_file, encoding="utf-8", errors="replace") as f:
        # About a third of the context: long enough to be a document, short enough to fit.
        document = f.read(max(1, a.context // 3) * 4).strip()

    target = Target(a.base_url, a.api_key, 120)
    target.wait_ready(60)

    # Warm-up: every slot used once, and one document compressed, so that the baseline
    # holds what a served model holds.
    lock, warm = threading.Lock(), []
    ts = [threading.Thread(target=lambda i=i: warm.append(stream_request(
        target, chat_body(PROMPTS[i % len(PROMPTS)], a.max_tokens)))) for i in range(a.slots)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    doc_warm = stream_request(target, chat_body("Summarize it.", 8, system="Warm-up document.\n\n" + document))
    warm_ok = all(r["status"] == 200 and not r["error"] for r in warm + [doc_warm])
    rss_baseline = settled_rss(a.server_pid)

    rec = Recorder()
    results = []
    health, stop = [], threading.Event()
    t_start = time.monotonic()
    deadline = t_start + a.duration
    poller = threading.Thread(target=health_poller, args=(target, stop, health), daemon=True)
    poller.start()
    clients = [threading.Thread(target=well_behaved, daemon=True,
                                args=(i, target, deadline, a.max_tokens, results, lock))
               for i in range(a.clients)]
    faults = [threading.Thread(target=slow_headers, args=(target, rec, a.server_timeout, i), daemon=True)
              for i in range(3)]
    faults += [
        threading.Thread(target=slow_body, args=(target, rec, a.server_timeout), daemon=True),
        threading.Thread(target=slow_reader, args=(target, rec, min(20, a.duration / 2)), daemon=True),
        threading.Thread(target=mid_stream_drops, args=(target, rec, deadline, 10), daemon=True),
        threading.Thread(target=mid_compression_drops, args=(target, rec, document, deadline, 4),
                         daemon=True),
        threading.Thread(target=lambda: (oversized(target, rec), malformed(target, rec),
                                         past_context(target, rec, a.context, document)), daemon=True),
    ]
    for t in clients + faults:
        t.start()
    for t in clients + faults:
        t.join()
    elapsed = time.monotonic() - t_start

    # Every slot free again: as many requests as slots, at once, all complete.
    after = []
    ts = [threading.Thread(target=lambda i=i: after.append(stream_request(
        target, chat_body(PROMPTS[(i + 3) % len(PROMPTS)], a.max_tokens)))) for i in range(a.slots)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    poller.join(timeout=5)
    rss_after = settled_rss(a.server_pid)

    ok = [r for r in results if r["status"] == 200 and not r["error"]]
    bad = [r for r in results if not (r["status"] == 200 and not r["error"])]
    after_ok = all(r["status"] == 200 and not r["error"] for r in after)
    lat = [ms for ms, _ in health]
    health_bad = [(ms, st) for ms, st in health if st != 200 or ms > HEALTH_LIMIT_MS]
    rss_limit = rss_baseline * 1.10 + 32 * MIB
    by_scenario = {}
    for o in rec.outcomes:
        s = by_scenario.setdefault(o["scenario"], {"ok": 0, "failed": 0, "details": []})
        s["ok" if o["ok"] else "failed"] += 1
        s["details"].append(o["detail"])
    fig = {
        "config": vars(a),
        "elapsed_s": elapsed,
        "warm_up_ok": warm_ok,
        "well_behaved": {"requests": len(results), "ok": len(ok), "failed": len(bad),
                         "failures": [r["error"] or f"HTTP {r['status']}" for r in bad],
                         "ttft_ms_p50": percentile([r["ttft_s"] * 1e3 for r in ok if r["ttft_s"]], 50),
                         "request_s_p50": percentile([r["total_s"] for r in ok], 50)},
        "slots_free_after": after_ok,
        "health": {"polls": len(health), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                   "max_ms": max(lat) if lat else None, "over_limit_or_failed": len(health_bad)},
        "faults": by_scenario,
        "rss": {"baseline_bytes": rss_baseline, "after_bytes": rss_after, "limit_bytes": rss_limit,
                "back_to_baseline": rss_after <= rss_limit},
    }

    print("| scenario | ok | failed | example |\n|---|---|---|---|")
    for name, s in by_scenario.items():
        print(f"| {name} | {s['ok']} | {s['failed']} | {s['details'][0]} |")
    h = fig["health"]
    print(f"\nwell-behaved streaming requests: {len(ok)} ok, {len(bad)} failed"
          f" (request p50 {fig['well_behaved']['request_s_p50'] or 0:.2f} s)")
    print(f"/health: {h['polls']} polls, p50 {h['p50_ms'] or 0:.1f} ms, p99 {h['p99_ms'] or 0:.1f} ms,"
          f" max {h['max_ms'] or 0:.1f} ms; {h['over_limit_or_failed']} over {HEALTH_LIMIT_MS:.0f} ms or failed")
    print(f"all {a.slots} slots free afterwards: {'yes' if after_ok else 'NO'}")
    print(f"RSS: baseline {rss_baseline / MIB:.1f} MiB, after {rss_after / MIB:.1f} MiB"
          f" (limit {rss_limit / MIB:.1f} MiB)")

    problems = []
    if not warm_ok:
        problems.append("the warm-up failed")
    if bad or not ok:
        problems.append(f"well-behaved requests: {len(ok)} ok, {len(bad)} failed")
    failed = {k: v["failed"] for k, v in by_scenario.items() if v["failed"]}
    if failed:
        problems.append(f"faults not handled as expected: {failed}")
    if health_bad or not health:
        problems.append(f"/health over {HEALTH_LIMIT_MS:.0f} ms or failed {len(health_bad)} times")
    if not after_ok:
        problems.append("a slot was still held after the faults")
    if rss_after > rss_limit:
        problems.append("RSS did not come back to its baseline")
    return finish(fig, problems, a.json, a.check)


if __name__ == "__main__":
    sys.exit(main())
