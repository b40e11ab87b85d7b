#!/usr/bin/env python3
"""Render chat templates as Hugging Face's `apply_chat_template` does: the reference
that `tests/chat_templates.rs` holds fastkv's renderer to.

Reads a JSON list of jobs on stdin, each
    {"template": "...", "messages": [...], "tools": [...] or null,
     "add_generation_prompt": bool, "bos_token": "...", "eos_token": "..."}
and writes a JSON list of answers, each {"text": "..."} or {"error": "..."}.

The environment is transformers' (`_compile_jinja_template`): Jinja2's immutable
sandbox with trim_blocks, lstrip_blocks and loop controls; `raise_exception`,
`strftime_now` and a `tojson` that is `json.dumps` with ensure_ascii off; `documents`
passed as None, and `tools` as None unless given. Needs the `jinja2` package.
"""
import json
import sys
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


def environment():
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main():
    env = environment()
    answers = []
    for job in json.load(sys.stdin):
        try:
            text = env.from_string(job["template"]).render(
                messages=job["messages"],
                tools=job.get("tools"),
                documents=None,
                add_generation_prompt=job["add_generation_prompt"],
                bos_token=job["bos_token"],
                eos_token=job["eos_token"],
            )
            answers.append({"text": text})
        except Exception as e:  # the template's own errors, as the caller sees them
            answers.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
