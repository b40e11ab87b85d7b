#!/usr/bin/env python3
"""End-to-end checks of `fastkv serve` through the official `openai` Python package.

Start the server first, e.g.

    fastkv serve -m models/SmolLM2-135M-Instruct.Q4_1.gguf --port 8080 -c 4096 -np 2
    python3 tests/server/openai_client.py --base-url http://127.0.0.1:8080

and, for the document-reuse check (eviction on, metrics on):

    fastkv serve -m MODEL --port 8080 -c 4096 -np 2 --kv-policy snapkv --kv-keep 0.3 --metrics
    python3 tests/server/openai_client.py --base-url http://127.0.0.1:8080 --check-reuse

With `--api-key KEY` (the server started with the same key) it also checks that a
request with a wrong key, and one with no key, get 401. Prints one line per check;
exits 0 when every check passes, 1 otherwise. Needs `pip install openai`; everything
else is the standard library.
"""
import argparse
import http.client
import json
import random
import sys
import time
import urllib.parse

try:
    import openai
except ImportError:  # pragma: no cover
    sys.exit("this script needs the openai package: pip install openai")

CHAT_MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
CHAT_MAX_TOKENS = 16
FINISH_REASONS = {"stop", "length"}


class Server:
    """Raw HTTP access (http.client) to the server, for the non-OpenAI routes and fields."""

    def __init__(self, base_url, api_key, timeout):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise SystemExit(f"--base-url must look like http://127.0.0.1:PORT, got {base_url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.prefix = u.path.rstrip("/")
        if self.prefix.endswith("/v1"):
            self.prefix = self.prefix[:-3]
        self.api_key = api_key
        self.timeout = timeout

    @property
    def openai_base(self):
        return f"http://{self.host}:{self.port}{self.prefix}/v1"

    def request(self, method, path, body=None, auth=True, headers=None):
        """Returns (status, headers dict with lower-case names, body bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            h = dict(headers or {})
            if body is not None and not isinstance(body, (bytes, str)):
                body = json.dumps(body)
                h.setdefault("Content-Type", "application/json")
            if auth and self.api_key:
                h["Authorization"] = f"Bearer {self.api_key}"
            conn.request(method, self.prefix + path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        finally:
            conn.close()

    def json(self, method, path, body=None, auth=True):
        status, _, data = self.request(method, path, body, auth)
        assert status == 200, f"{method} {path} -> HTTP {status}: {data[:300]!r}"
        return json.loads(data)

    def tokenize(self, text, add_special):
        r = self.json("POST", "/tokenize", {"content": text, "add_special": add_special})
        assert isinstance(r.get("tokens"), list), f"/tokenize: no 'tokens' list in {r}"
        return r["tokens"]

    def wait_ready(self, seconds):
        deadline = time.time() + seconds
        last = None
        while time.time() < deadline:
            try:
                status, _, data = self.request("GET", "/health", auth=False)
                if status == 200:
                    return
                last = f"HTTP {status} {data[:120]!r}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.5)
        raise SystemExit(f"server at {self.host}:{self.port} not ready after {seconds} s: {last}")


def raw_json(raw_response):
    """The JSON body of an openai `with_raw_response` call (to read non-standard fields)."""
    return json.loads(raw_response.http_response.text)


def check_usage(u, max_tokens, what):
    assert u is not None, f"{what}: no usage"
    assert u.prompt_tokens > 0, f"{what}: usage.prompt_tokens = {u.prompt_tokens}, expected > 0"
    assert 1 <= u.completion_tokens <= max_tokens, (
        f"{what}: usage.completion_tokens = {u.completion_tokens}, expected 1..{max_tokens}")
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, (
        f"{what}: usage.total_tokens = {u.total_tokens} != prompt_tokens {u.prompt_tokens}"
        f" + completion_tokens {u.completion_tokens}")


def check_finish(finish, completion_tokens, max_tokens, what):
    assert finish in FINISH_REASONS, f"{what}: finish_reason = {finish!r}, expected one of {sorted(FINISH_REASONS)}"
    assert (finish == "length") == (completion_tokens == max_tokens), (
        f"{what}: finish_reason = {finish!r} with completion_tokens = {completion_tokens}"
        f" and max_tokens = {max_tokens} ('length' iff the limit was reached)")


# ---------------------------------------------------------------------------- checks


def check_models(ctx):
    models = ctx.client.models.list().data
    assert len(models) == 1, f"/v1/models lists {len(models)} models, expected exactly 1: {[m.id for m in models]}"
    m = models[0]
    assert m.id, "/v1/models: the model has an empty id"
    assert m.object == "model", f"/v1/models: object = {m.object!r}, expected 'model'"
    ctx.model = m.id
    return f"model id {m.id!r} (owned_by {m.owned_by!r})"


def chat_request(ctx, **extra):
    args = dict(model=ctx.model, messages=CHAT_MESSAGES, max_tokens=CHAT_MAX_TOKENS, temperature=0, seed=1)
    args.update(extra)
    return args


def check_chat(ctx):
    raw = ctx.client.chat.completions.with_raw_response.create(**chat_request(ctx))
    r = raw.parse()
    body = raw_json(raw)
    what = "chat completion"
    assert r.object == "chat.completion", f"{what}: object = {r.object!r}"
    assert r.model == ctx.model, f"{what}: model = {r.model!r}, expected {ctx.model!r} (as in /v1/models)"
    assert len(r.choices) == 1, f"{what}: {len(r.choices)} choices, expected 1"
    msg = r.choices[0].message
    assert msg.role == "assistant", f"{what}: message.role = {msg.role!r}"
    content = msg.content
    assert isinstance(content, str) and content, f"{what}: empty content {content!r}"
    u = r.usage
    check_usage(u, CHAT_MAX_TOKENS, what)
    retok = len(ctx.server.tokenize(content, add_special=False))
    assert abs(u.completion_tokens - retok) <= 2, (
        f"{what}: usage.completion_tokens = {u.completion_tokens} but the content re-tokenizes"
        f" to {retok} tokens (allowed difference 2); content {content!r}")
    check_finish(r.choices[0].finish_reason, u.completion_tokens, CHAT_MAX_TOKENS, what)
    details = body["usage"].get("prompt_tokens_details")
    assert isinstance(details, dict) and isinstance(details.get("cached_tokens"), int), (
        f"{what}: usage.prompt_tokens_details.cached_tokens missing: {body['usage']}")
    cached = details["cached_tokens"]
    assert 0 <= cached <= u.prompt_tokens, f"{what}: cached_tokens = {cached} > prompt_tokens = {u.prompt_tokens}"
    t = body.get("timings")
    assert isinstance(t, dict), f"{what}: no 'timings' object in the response"
    assert t.get("predicted_n") == u.completion_tokens, (
        f"{what}: timings.predicted_n = {t.get('predicted_n')} != usage.completion_tokens = {u.completion_tokens}")
    assert t.get("cache_n") == cached, f"{what}: timings.cache_n = {t.get('cache_n')} != cached_tokens = {cached}"
    assert t.get("prompt_n") == u.prompt_tokens - cached, (
        f"{what}: timings.prompt_n = {t.get('prompt_n')} != prompt_tokens {u.prompt_tokens} - cached_tokens {cached}")
    ctx.chat_content = content
    return (f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens (re-tokenized {retok}),"
            f" finish {r.choices[0].finish_reason}, content {content!r}")


def check_chat_stream(ctx):
    what = "streamed chat completion"
    stream = ctx.client.chat.completions.create(
        **chat_request(ctx), stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks, f"{what}: no chunks"
    pieces, finishes, usage_chunks, roles = [], [], [], []
    for i, c in enumerate(chunks):
        assert c.object == "chat.completion.chunk", f"{what}: chunk {i} object = {c.object!r}"
        if c.usage is not None:
            usage_chunks.append(i)
        for ch in c.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            if ch.delta.content:
                pieces.append(ch.delta.content)
            if ch.finish_reason is not None:
                finishes.append(ch.finish_reason)
    text = "".join(pieces)
    assert roles and set(roles) == {"assistant"}, f"{what}: delta roles {roles}, expected 'assistant' (first chunk)"
    assert pieces, f"{what}: no chunk with a non-empty delta.content"
    assert text, f"{what}: concatenated text is empty"
    assert len(finishes) == 1, f"{what}: {len(finishes)} chunks carry a finish_reason ({finishes}), expected 1"
    assert len(usage_chunks) == 1, f"{what}: {len(usage_chunks)} chunks carry usage, expected exactly 1"
    last = chunks[usage_chunks[0]]
    assert usage_chunks[0] == len(chunks) - 1, f"{what}: the usage chunk is not the last chunk"
    assert last.choices == [], f"{what}: the usage chunk has choices {last.choices}, expected []"
    u = last.usage
    check_usage(u, CHAT_MAX_TOKENS, what)
    assert len(pieces) <= u.completion_tokens, (
        f"{what}: {len(pieces)} content chunks but usage.completion_tokens = {u.completion_tokens}"
        " (at most one chunk per token)")
    check_finish(finishes[0], u.completion_tokens, CHAT_MAX_TOKENS, what)
    same = "same as" if text == getattr(ctx, "chat_content", None) else "DIFFERENT from"
    return (f"{len(chunks)} chunks, {len(pieces)} with content, {u.completion_tokens} completion tokens,"
            f" finish {finishes[0]}; text {same} the non-streamed reply: {text!r}")


def check_sse_raw(ctx):
    what = "raw SSE stream"
    body = chat_request(ctx, stream=True, stream_options={"include_usage": True})
    status, headers, data = ctx.server.request("POST", "/v1/chat/completions", body)
    assert status == 200, f"{what}: HTTP {status}: {data[:300]!r}"
    ctype = headers.get("content-type", "")
    assert ctype.startswith("text/event-stream"), f"{what}: Content-Type {ctype!r}, expected text/event-stream"
    text = data.decode("utf-8")
    assert text.endswith("data: [DONE]\n\n"), (
        f"{what}: body does not end with 'data: [DONE]\\n\\n' (last bytes {text[-60:]!r})")
    blocks = text.split("\n\n")
    assert blocks[-1] == "", f"{what}: trailing bytes after the last event: {blocks[-1]!r}"
    nonempty = blocks[:-1]
    for b in nonempty:
        assert b.startswith("data: ") and "\n" not in b, (
            f"{what}: each event should be one 'data: ...' line followed by a blank line, got {b[:200]!r}")
    assert nonempty[-1] == "data: [DONE]", f"{what}: last data line is {nonempty[-1]!r}, expected 'data: [DONE]'"
    events = []
    for ln in nonempty[:-1]:
        try:
            events.append(json.loads(ln[6:]))
        except json.JSONDecodeError as e:
            raise AssertionError(f"{what}: malformed JSON in {ln[:200]!r}: {e}")
    assert sum(1 for ln in nonempty if ln == "data: [DONE]") == 1, f"{what}: more than one [DONE]"
    assert len(events) >= 3, f"{what}: only {len(events)} JSON chunks"
    assert events[-1].get("choices") == [] and "usage" in events[-1], (
        f"{what}: the last JSON chunk should have choices [] and usage: {events[-1]}")
    fin = events[-2]
    assert fin["choices"] and fin["choices"][0].get("finish_reason") in FINISH_REASONS, (
        f"{what}: the chunk before the usage chunk should carry the finish_reason: {fin}")
    assert isinstance(fin.get("timings"), dict), f"{what}: the finish chunk has no 'timings' object: {fin}"
    first = events[0]["choices"][0]["delta"]
    assert first.get("role") == "assistant", f"{what}: first chunk delta {first}, expected role 'assistant'"
    return f"{len(events)} JSON chunks then 'data: [DONE]' (Content-Type {ctype})"


def check_completion(ctx):
    what = "legacy completion"
    prompt = "The capital of France is"
    r = ctx.client.completions.create(model=ctx.model, prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion", f"{what}: object = {r.object!r}"
    assert len(r.choices) == 1, f"{what}: {len(r.choices)} choices"
    text = r.choices[0].text
    assert isinstance(text, str) and text, f"{what}: empty text {text!r}"
    check_usage(r.usage, 8, what)
    n = len(ctx.server.tokenize(prompt, add_special=True))
    assert r.usage.prompt_tokens == n, (
        f"{what}: usage.prompt_tokens = {r.usage.prompt_tokens} but /tokenize (add_special true) gives {n}")
    check_finish(r.choices[0].finish_reason, r.usage.completion_tokens, 8, what)
    return f"{n} prompt tokens, {r.usage.completion_tokens} completion tokens, text {text!r}"


def check_completion_stream(ctx):
    what = "streamed legacy completion"
    stream = ctx.client.completions.create(
        model=ctx.model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
    texts, finishes = [], []
    for c in stream:
        for ch in c.choices:
            if ch.text:
                texts.append(ch.text)
            if ch.finish_reason is not None:
                finishes.append(ch.finish_reason)
    assert "".join(texts), f"{what}: no text"
    assert len(finishes) == 1 and finishes[0] in FINISH_REASONS, f"{what}: finish reasons {finishes}"
    return f"{len(texts)} text chunks, finish {finishes[0]}, text {''.join(texts)!r}"


def check_determinism(ctx):
    what = "greedy determinism"
    outs = []
    for _ in range(2):
        r = ctx.client.chat.completions.create(**chat_request(ctx))
        outs.append(r.choices[0].message.content)
    assert outs[0] == outs[1], f"{what}: two identical temperature-0 requests differ: {outs[0]!r} vs {outs[1]!r}"
    first = getattr(ctx, "chat_content", None)
    if first is not None:
        assert outs[0] == first, (
            f"{what}: repeated request (prompt now cached) differs from the first one: {outs[0]!r} vs {first!r}")
    return f"identical replies {outs[0]!r}"


def check_errors(ctx):
    what = "error bodies"
    status, _, data = ctx.server.request("POST", "/v1/chat/completions", b"{not json",
                                         headers={"Content-Type": "application/json"})
    assert status == 400, f"{what}: bad JSON -> HTTP {status}, expected 400"
    e = json.loads(data).get("error", {})
    assert e.get("type") == "invalid_request_error" and e.get("code") == 400, f"{what}: bad JSON body {data[:200]!r}"
    status, _, data = ctx.server.request("GET", "/v1/no-such-route")
    assert status == 404, f"{what}: unknown route -> HTTP {status}, expected 404"
    e = json.loads(data).get("error", {})
    assert e.get("type") == "not_found_error" and e.get("code") == 404, f"{what}: 404 body {data[:200]!r}"
    return "bad JSON -> 400 invalid_request_error, unknown route -> 404 not_found_error"


def check_auth(ctx):
    what = "API key"
    bad = openai.OpenAI(base_url=ctx.server.openai_base, api_key=ctx.api_key + "-wrong", max_retries=0,
                        timeout=ctx.timeout)
    try:
        bad.chat.completions.create(**chat_request(ctx))
    except openai.AuthenticationError as e:
        assert e.status_code == 401, f"{what}: AuthenticationError with status {e.status_code}"
    else:
        raise AssertionError(f"{what}: a request with a wrong key succeeded")
    try:
        bad.models.list()
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError(f"{what}: GET /v1/models with a wrong key succeeded")
    status, _, data = ctx.server.request("GET", "/v1/models", auth=False)
    assert status == 401, f"{what}: /v1/models without Authorization -> HTTP {status}, expected 401"
    e = json.loads(data).get("error", {})
    assert e.get("type") == "authentication_error" and e.get("code") == 401, f"{what}: 401 body {data[:200]!r}"
    status, _, _ = ctx.server.request("POST", "/v1/chat/completions", chat_request(ctx), auth=False)
    assert status == 401, f"{what}: chat without Authorization -> HTTP {status}, expected 401"
    status, _, _ = ctx.server.request("GET", "/health", auth=False)
    assert status == 200, f"{what}: /health without the key -> HTTP {status}, expected 200 (never needs the key)"
    status, _, _ = ctx.server.request("GET", "/", auth=False)
    assert status == 200, f"{what}: / without the key -> HTTP {status}, expected 200 (never needs the key)"
    return "wrong key -> AuthenticationError (401); no key -> 401 authentication_error; /health and / open"


# ------------------------------------------------------------------ document reuse

NAMES = ["Ada Moreno", "Bilal Okafor", "Chen Wei", "Dagny Holm", "Emeka Eze", "Farah Nasser",
         "Goran Petrov", "Hana Sato", "Ines Duarte", "Jonas Berg", "Kavya Rao", "Liam Walsh"]
TEAMS = ["Logistics", "Finance", "Research", "Facilities", "Security", "Customer Care",
         "Legal", "Procurement", "Engineering", "People Operations"]
THINGS = ["the east loading dock", "the archive room", "the third-floor kitchen", "the bicycle shed",
          "the print shop", "the server hall", "the visitor lounge", "the rooftop garden"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
TEMPLATES = [
    "The {team} team meets every {day} at {hour} o'clock in {thing}, and {name} keeps the minutes.",
    "Requests for new equipment in {team} must be approved by {name} within {n} working days.",
    "{thing_cap} is cleaned on {day} mornings; staff should clear their belongings by {hour} o'clock.",
    "Employees may carry over at most {n} days of unused leave; {name} in {team} answers questions about it.",
    "Fire drills for {thing} happen twice a year, and the assembly point is the car park by gate {n}.",
    "New starters in {team} shadow {name} for their first {n} days before working alone.",
    "Parcels addressed to {team} are held in {thing} until {hour} o'clock, then returned to reception.",
    "The {team} budget review takes place on the first {day} of each quarter, chaired by {name}.",
]
VAULT_FACT = "The vault code is 4417."
TRAVEL_FACT = "Travel expenses above 500 euros are approved by Ines Duarte, the finance director."
QUESTION_1 = "What is the vault code? Answer with the number only."
QUESTION_2 = "Who approves travel expenses above 500 euros?"


def handbook(n_facts):
    rng = random.Random(4417)
    lines = ["Northwind Lattice Ltd. Staff Handbook", "",
             "This handbook lists the rules and habits of the company. Read it carefully.", ""]
    for i in range(1, n_facts + 1):
        if i % 10 == 1:
            lines += ["", f"Section {i // 10 + 1}.", ""]
        t = rng.choice(TEMPLATES)
        thing = rng.choice(THINGS)
        fact = t.format(team=rng.choice(TEAMS), day=rng.choice(DAYS), hour=rng.randint(7, 18),
                        thing=thing, thing_cap=thing[0].upper() + thing[1:], name=rng.choice(NAMES),
                        n=rng.randint(2, 12))
        if i == n_facts // 2:
            fact = VAULT_FACT
        elif i == n_facts // 3:
            fact = TRAVEL_FACT
        lines.append(f"{i}. {fact}")
    return "\n".join(lines) + "\n"


def build_document(server, target):
    n = 40
    for _ in range(6):
        doc = handbook(n)
        toks = len(server.tokenize(doc, add_special=False))
        if target <= toks <= target * 1.1:
            break
        n = max(10, round(n * target * 1.05 / toks))
    return doc, toks


def parse_metrics(text):
    out = {}
    for ln in text.splitlines():
        if not ln or ln.startswith("#"):
            continue
        parts = ln.split()
        if len(parts) < 2:
            continue
        name = parts[0].split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(parts[1])
        except ValueError:
            pass
    return out


def check_reuse(ctx):
    what = "document reuse"
    doc, doc_tokens = build_document(ctx.server, ctx.doc_tokens)
    system = {"role": "system", "content": doc}
    q1 = {"role": "user", "content": QUESTION_1}
    args = dict(model=ctx.model, temperature=0, seed=1)
    raw1 = ctx.client.chat.completions.with_raw_response.create(messages=[system, q1], max_tokens=24, **args)
    r1, b1 = raw1.parse(), raw_json(raw1)
    answer = r1.choices[0].message.content
    assert answer, f"{what}: empty answer to question 1"
    t1 = b1.get("timings") or {}
    messages2 = [system, q1, {"role": "assistant", "content": answer}, {"role": "user", "content": QUESTION_2}]
    raw2 = ctx.client.chat.completions.with_raw_response.create(messages=messages2, max_tokens=32, **args)
    r2, b2 = raw2.parse(), raw_json(raw2)
    u = r2.usage
    cached = (b2["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    t2 = b2.get("timings")
    assert isinstance(t2, dict), f"{what}: no 'timings' in the second response"
    print(f"    document: {doc_tokens} tokens; request 1: prompt {r1.usage.prompt_tokens}, "
          f"prompt_n {t1.get('prompt_n')}, prompt_ms {t1.get('prompt_ms')}, answer {answer!r}"
          f" (vault code {'found' if '4417' in answer else 'not found'})")
    print(f"    request 2: prompt_tokens {u.prompt_tokens}, cached_tokens {cached}, prompt_n {t2.get('prompt_n')},"
          f" cache_n {t2.get('cache_n')}, prompt_ms {t2.get('prompt_ms')}, kv_bytes {t2.get('kv_bytes')},"
          f" kv_bytes_full {t2.get('kv_bytes_full')}, answer {r2.choices[0].message.content!r}")
    assert isinstance(cached, int), f"{what}: usage.prompt_tokens_details.cached_tokens missing: {b2['usage']}"
    assert cached >= doc_tokens, (
        f"{what}: cached_tokens = {cached} < {doc_tokens} document tokens: the compressed document was not reused")
    assert t2.get("prompt_n") == u.prompt_tokens - cached, (
        f"{what}: timings.prompt_n = {t2.get('prompt_n')} != prompt_tokens {u.prompt_tokens} - cached {cached}")
    assert t2["prompt_n"] < 100, f"{what}: timings.prompt_n = {t2['prompt_n']}, expected < 100 (document reused)"
    kv, full = t2.get("kv_bytes"), t2.get("kv_bytes_full")
    assert isinstance(kv, int) and isinstance(full, int) and 0 < kv < full, (
        f"{what}: timings.kv_bytes = {kv}, kv_bytes_full = {full}: expected 0 < kv_bytes < kv_bytes_full (eviction on)")
    status, _, data = ctx.server.request("GET", "/metrics")
    assert status == 200, f"{what}: GET /metrics -> HTTP {status} (start the server with --metrics): {data[:200]!r}"
    metrics = parse_metrics(data.decode())
    saved = metrics.get("fastkv_kv_bytes_saved")
    assert saved is not None, f"{what}: /metrics has no fastkv_kv_bytes_saved"
    assert saved > 0, f"{what}: fastkv_kv_bytes_saved = {saved}, expected > 0"
    print("    metrics: " + ", ".join(f"{k} {v:g}" for k, v in metrics.items() if k.startswith("fastkv_")))
    return (f"cached {cached} >= {doc_tokens} document tokens, prompt_n {t2['prompt_n']},"
            f" kv_bytes {kv} / full {full} ({kv / full:.0%}), kv_bytes_saved {saved:g}")


# -------------------------------------------------------------------------- main


class Ctx:
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT")
    ap.add_argument("--api-key", help="the key the server was started with (--api-key)")
    ap.add_argument("--check-reuse", action="store_true",
                    help="also check document reuse (server run with --kv-policy snapkv --kv-keep 0.3 --metrics)")
    ap.add_argument("--doc-tokens", type=int, default=1500, help="document size for --check-reuse")
    ap.add_argument("--wait", type=float, default=120, help="seconds to wait for /health to say ok")
    ap.add_argument("--timeout", type=float, default=300, help="per-request timeout, seconds")
    a = ap.parse_args()

    ctx = Ctx()
    ctx.server = Server(a.base_url, a.api_key, a.timeout)
    ctx.api_key = a.api_key
    ctx.timeout = a.timeout
    ctx.doc_tokens = a.doc_tokens
    ctx.server.wait_ready(a.wait)
    ctx.client = openai.OpenAI(base_url=ctx.server.openai_base, api_key=a.api_key or "no-key",
                               max_retries=0, timeout=a.timeout)

    checks = [("models", check_models), ("chat", check_chat), ("chat-stream", check_chat_stream),
              ("sse-raw", check_sse_raw), ("completion", check_completion),
              ("completion-stream", check_completion_stream), ("determinism", check_determinism),
              ("errors", check_errors),
              ("reuse", check_reuse if a.check_reuse else None),
              ("auth", check_auth if a.api_key else None)]
    failed = passed = skipped = 0
    for name, fn in checks:
        if fn is None:
            print(f"SKIP {name}: " + ("needs --check-reuse" if name == "reuse" else "needs --api-key"))
            skipped += 1
            continue
        if name != "models" and not getattr(ctx, "model", None):
            print(f"SKIP {name}: no model id")
            skipped += 1
            continue
        t0 = time.time()
        try:
            detail = fn(ctx)
            print(f"PASS {name} ({time.time() - t0:.1f} s): {detail}")
            passed += 1
        except AssertionError as e:
            print(f"FAIL {name}: {e}")
            failed += 1
        except Exception as e:  # openai.APIError, connection errors, ...
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            failed += 1
        sys.stdout.flush()
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
