#!/usr/bin/env python3
"""Peak resident memory of `fastkv run` against llama.cpp's, at the same context sizes.

For each context size, both runtimes load the same model file, prefill the same text
(filling most of the context) and decode greedily; each reports its peak resident
set size (VmHWM). llama.cpp runs through `examples/llama_cpp_run.rs` (llama.cpp built
from the same ggml source, flash attention on). Prints a markdown table.

    python3 benches/peak_rss.py [-m MODEL] [-c 2048,4096] [-f TEXT] [-n 64] [-t 2]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Characters per token of English prose and markdown, on the low side, so that the
# prompt fits: the table reports the token counts actually used.
CHARS_PER_TOKEN = 3.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-c", "--ctx", default="2048,4096", help="context sizes, comma-separated")
    ap.add_argument("-f", "--file", help="text to fill the context with [default: this repository's docs]")
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()

    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--bin", "fastkv", "--example", "llama_cpp_run"],
        cwd=ROOT,
        check=True,
    )
    fastkv = ROOT / "target/release/fastkv"
    llama = ROOT / "target/release/examples/llama_cpp_run"
    if a.file:
        text = Path(a.file).read_text(errors="replace")
    else:
        docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        text = "\n\n".join(p.read_text() for p in docs)

    rows = []
    for ctx in (int(c) for c in a.ctx.split(",")):
        budget = ctx - a.n_predict - 64
        need = int(budget * CHARS_PER_TOKEN)
        while len(text) < need:
            text += "\n\n" + text
        with tempfile.TemporaryDirectory() as tmp:
            prompt = Path(tmp) / "prompt.txt"
            prompt.write_text(text[:need])
            stats = Path(tmp) / "stats.json"
            common = ["-m", a.model, "-c", str(ctx), "-f", str(prompt), "-n", str(a.n_predict)]
            subprocess.run(
                [str(fastkv), "run", *common, "--temp", "0", "-t", str(a.threads),
                 "--no-display-prompt", "--stats-json", str(stats)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            ours = json.loads(stats.read_text())
            out = subprocess.run(
                [str(llama), a.model, str(ctx), str(prompt), str(a.n_predict), str(a.threads)],
                check=True,
                capture_output=True,
                text=True,
            )
            theirs = json.loads(out.stdout.strip().splitlines()[-1])
        mib = lambda b: b / (1 << 20)
        rows.append((ctx, ours["n_prompt"], theirs["n_prompt"], mib(ours["peak_rss_bytes"]),
                     mib(theirs["peak_rss_bytes"])))
        print(f"  -c {ctx}: fastkv {mib(ours['peak_rss_bytes']):.1f} MiB, "
              f"llama.cpp {mib(theirs['peak_rss_bytes']):.1f} MiB", file=sys.stderr)

    print(f"model: {Path(a.model).name}, {a.threads} threads, {a.n_predict} tokens generated\n")
    print("| context (-c) | prompt tokens (fastkv / llama.cpp) | fastkv peak RSS | llama.cpp peak RSS | fastkv / llama.cpp |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for ctx, n_ours, n_theirs, ours, theirs in rows:
        print(f"| {ctx} | {n_ours} / {n_theirs} | {ours:.1f} MiB | {theirs:.1f} MiB | {ours / theirs:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
