#!/usr/bin/env python3
"""Long contexts, end to end: prefill speed, decode speed at depth and peak memory of
`fastkv run --context-file` (full cache, and compressed with eviction) against
llama.cpp's, at several context lengths.

For each length, a document of about that many tokens is cut from TEXT. fastkv
prefills it as a context (`--context-file`, chunks of 512, with the full cache or
evicting as it goes), then generates greedily after a short prompt; llama.cpp (built
from the same ggml source, flash attention on, through `examples/llama_cpp_run.rs`)
prefills the same text in batches of 512 and generates greedily. Each run is its
own process, so its peak resident set size is its own. Memory beyond the weights is
the peak RSS minus the model file's size (both runtimes map the file and touch all
of it). Writes a markdown table to stdout, and with --out a JSON file and the plots
(matplotlib, if installed).

    python3 benches/long_context.py [-m MODEL] [-c 4096,8192] [-f TEXT] [-n 64] [-t 2] \\
        [--policy gated] [--keep 0.3] [--out DIR]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Characters of TEXT measured per token (with the model's tokenizer, on a sample)
# before the documents are cut; the table reports the token counts actually used.
CALIBRATION_CHARS = 30000
QUESTION = "\n\nIn one sentence, the text above is about"


class RunFailed(Exception):
    pass


def run_fastkv(fastkv, model, ctx, doc, n_predict, threads, eviction):
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        r = subprocess.run(
            [str(fastkv), "run", "-m", model, "-c", str(ctx), "--context-file", str(doc),
             "-p", QUESTION, "-n", str(n_predict), "--temp", "0", "-t", str(threads),
             "--no-display-prompt", "--stats-json", str(stats), *eviction],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        if r.returncode != 0:
            raise RunFailed(f"fastkv run -c {ctx} {' '.join(eviction)} failed:\n{r.stderr[-2000:]}")
        s = json.loads(stats.read_text())
    c = s["compression"]
    return {
        "n_context": c["n_context"],
        "prefill_tps": c["n_context"] / (c["prefill_ms"] / 1e3),
        "gen_tps": s["gen_tps"],
        "peak_rss_bytes": s["peak_rss_bytes"],
        "kv_bytes": s["kv_bytes"],
        "kv_bytes_full": s["kv_bytes_full"],
    }


def run_llama(llama, model, ctx, doc, n_predict, threads):
    out = subprocess.run(
        [str(llama), model, str(ctx), str(doc), str(n_predict), str(threads)],
        check=True, capture_output=True, text=True,
    )
    s = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "n_context": s["n_prompt"],
        "prefill_tps": s["prompt_tps"],
        "gen_tps": s["gen_tps"],
        "peak_rss_bytes": s["peak_rss_bytes"],
    }


def plot(rows, labels, out_dir, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib); no plots", file=sys.stderr)
        return []
    written = []
    for key, ylabel, fname in [
        ("prefill_tps", "prefill tokens/s", "long_context_prefill.png"),
        ("gen_tps", "decode tokens/s at depth", "long_context_decode.png"),
        ("beyond_weights_mib", "peak RSS beyond the weights (MiB)", "long_context_rss.png"),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label in labels:
            xs = [r["length"] for r in rows]
            ys = [r[label][key] for r in rows]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["length"] for r in rows])
        ax.set_xticklabels([str(r["length"]) for r in rows])
        ax.set_xlabel("context length (-c, tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-c", "--ctx", default="4096,8192", help="context lengths, comma-separated")
    ap.add_argument("-f", "--file", default=str(ROOT / "../shared/data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--policy", default="gated", help="fastkv's eviction policy")
    ap.add_argument("--keep", default="0.3", help="fastkv's keep ratio")
    ap.add_argument("--out", help="directory for long_context.json and the plots")
    a = ap.parse_args()

    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--bin", "fastkv", "--example", "llama_cpp_run"],
        cwd=ROOT, check=True,
    )
    fastkv = ROOT / "target/release/fastkv"
    llama = ROOT / "target/release/examples/llama_cpp_run"
    text = Path(a.file).read_text(errors="replace")
    weights = os.path.getsize(a.model)
    # Characters per token of this text and tokenizer, from a sample run.
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample.txt"
        sample.write_text(text[:CALIBRATION_CHARS])
        n = run_fastkv(fastkv, a.model, 0, sample, 1, a.threads, ["--kv-policy", "full"])["n_context"]
    chars_per_token = len(text[:CALIBRATION_CHARS]) / n
    evicted = f"fastkv {a.policy}@{a.keep}"
    labels = ["fastkv full", evicted, "llama.cpp"]
    rows = []
    for ctx in (int(c) for c in a.ctx.split(",")):
        need = int((ctx - a.n_predict - 64) * chars_per_token * 0.98)
        body = text
        while len(body) < need:
            body += "\n\n" + text
        with tempfile.TemporaryDirectory() as tmp:
            doc = Path(tmp) / "doc.txt"
            row = {"length": ctx}
            # The rest of TEXT may have fewer characters per token than the calibration
            # sample: a document too long for -c is refused before its prefill, with
            # its token count, and is cut to fit.
            while True:
                doc.write_text(body[:need])
                try:
                    row["fastkv full"] = run_fastkv(fastkv, a.model, ctx, doc, a.n_predict,
                                                    a.threads, ["--kv-policy", "full"])
                    break
                except RunFailed as e:
                    m = re.search(r"the context file has (\d+) tokens", str(e))
                    if not m:
                        raise
                    need = int(need * (ctx - a.n_predict - 64) / int(m.group(1)) * 0.99)
            row[evicted] = run_fastkv(fastkv, a.model, ctx, doc, a.n_predict, a.threads,
                                      ["--kv-policy", a.policy, "--kv-keep", a.keep])
            row["llama.cpp"] = run_llama(llama, a.model, ctx, doc, a.n_predict, a.threads)
        for label in labels:
            r = row[label]
            r["beyond_weights_mib"] = (r["peak_rss_bytes"] - weights) / (1 << 20)
        rows.append(row)
        print(f"  -c {ctx}: " + "; ".join(
            f"{l}: prefill {row[l]['prefill_tps']:.1f} t/s, decode {row[l]['gen_tps']:.1f} t/s, "
            f"RSS {row[l]['peak_rss_bytes'] / (1 << 20):.0f} MiB" for l in labels), file=sys.stderr)

    model = Path(a.model).name
    print(f"model: {model} ({weights / (1 << 20):.1f} MiB file), {a.threads} threads, "
          f"{a.n_predict} tokens generated after the context\n")
    print(f"| -c | runtime | context tokens | prefill t/s | decode t/s | peak RSS MiB | beyond weights MiB "
          f"| prefill vs llama.cpp | decode vs llama.cpp | memory beyond weights vs llama.cpp |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        ref = row["llama.cpp"]
        for label in labels:
            r = row[label]
            print(f"| {row['length']} | {label} | {r['n_context']} | {r['prefill_tps']:.1f} | "
                  f"{r['gen_tps']:.1f} | {r['peak_rss_bytes'] / (1 << 20):.0f} | "
                  f"{r['beyond_weights_mib']:.0f} | {r['prefill_tps'] / ref['prefill_tps']:.2f}x | "
                  f"{r['gen_tps'] / ref['gen_tps']:.2f}x | "
                  f"{r['beyond_weights_mib'] / ref['beyond_weights_mib']:.2f}x |")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "long_context.json").write_text(json.dumps(
            {"model": model, "threads": a.threads, "n_predict": a.n_predict, "rows": rows}, indent=2) + "\n")
        written = plot(rows, labels, out, model)
        print(f"wrote long_context.json {' '.join(written)} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
