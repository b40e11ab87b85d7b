//! The `fastkv` binary as a user runs it.
mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::*;

fn fastkv(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fastkv runs");
    let mut input = child.stdin.take().expect("stdin is piped");
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The command failed cleanly: non-zero exit, an error message, no panic.
fn assert_clean_error(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(err.contains("error:"), "no error message: {err}");
    assert!(err.contains(needle), "message lacks '{needle}': {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
}

/// With a plain system message, SmolLM2 answers in English. (Without one, SmolLM2's
/// template adds its own default system prompt, after which this Q4_1 model starts
/// greedily in French, "L'Étoile, la Marseillaise, ...": llama.cpp does exactly the
/// same, as `session.rs` checks token for token.)
#[test]
fn chat_knows_the_capital_of_france() {
    let Some(path) = model(SMOLLM2) else { return };
    let out = fastkv(
        &[
            "chat",
            "-m",
            path.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "48",
            "--system",
            "You are a helpful assistant.",
        ],
        Some("What is the capital of France?\n"),
    );
    let reply = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(reply.contains("Paris"), "reply: {reply}");
}

#[test]
fn chat_answers_every_turn() {
    let Some(path) = model(SMOLLM2) else { return };
    let out = fastkv(
        &[
            "chat",
            "-m",
            path.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "16",
        ],
        Some("Hello!\nAnd what is 2 + 2?\n"),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let replies = text(&out.stdout);
    let n = replies.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(n >= 2, "expected a reply per turn: {replies}");
}

#[test]
fn run_streams_and_writes_stats_json() {
    let Some(path) = model(SMOLLM2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let out = fastkv(
        &[
            "run",
            "-m",
            path.to_str().unwrap(),
            "-p",
            "The history of the printing press",
            "-n",
            "16",
            "--temp",
            "0",
            "-t",
            "2",
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("The history of the printing press"),
        "{stdout}"
    );
    assert!(
        stdout.len() > "The history of the printing press".len() + 20,
        "{stdout}"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("tokens/s") && err.contains("peak KV cache"),
        "{err}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(
        json["n_prompt"], 6,
        "6 prompt tokens (SmolLM2 adds no BOS): {json}"
    );
    assert_eq!(json["n_gen"], 16);
    for key in ["prompt_tps", "gen_tps"] {
        assert!(json[key].as_f64().unwrap() > 0.0, "{key}: {json}");
    }
    // 30 layers x 3 KV heads x 64 x 2 (K and V) x 2 bytes per token, 21 tokens.
    assert!(
        json["kv_bytes"].as_u64().unwrap() >= 30 * 3 * 64 * 2 * 2 * 21,
        "{json}"
    );
    assert!(json["peak_rss_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn inspect_prints_architecture_and_tensors() {
    for (name, arch, tok) in [(SMOLLM2, "llama", "gpt2"), (GEMMA3, "gemma3", "llama")] {
        let Some(path) = model(name) else { continue };
        let out = fastkv(&["inspect", path.to_str().unwrap()], None);
        let s = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(s.contains(&format!("architecture: {arch}")), "{s}");
        assert!(s.contains(&format!("tokenizer: {tok}")), "{s}");
        assert!(
            s.contains("token_embd.weight") && s.contains("blk.0.attn_q.weight"),
            "{s}"
        );
    }
}

#[test]
fn bad_input_gives_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let out = fastkv(&["run", "-m", missing.to_str().unwrap(), "-p", "hi"], None);
    assert_clean_error(&out, "cannot open");

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model file at all").unwrap();
    let out = fastkv(&["run", "-m", garbage.to_str().unwrap(), "-p", "hi"], None);
    assert_clean_error(&out, "not a GGUF file");
    let out = fastkv(&["inspect", garbage.to_str().unwrap()], None);
    assert_clean_error(&out, "not a GGUF file");

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, b"GGUF\x03\x00\x00\x00\x05").unwrap();
    let out = fastkv(
        &["run", "-m", truncated.to_str().unwrap(), "-p", "hi"],
        None,
    );
    assert_clean_error(&out, "truncated");

    if let Some(path) = model(SMOLLM2) {
        // A real model cut in half: its tensor data ends early.
        let bytes = std::fs::read(&path).unwrap();
        let half = dir.path().join("half.gguf");
        std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
        let out = fastkv(&["run", "-m", half.to_str().unwrap(), "-p", "hi"], None);
        assert_clean_error(&out, "truncated");

        let p = path.to_str().unwrap();
        assert_clean_error(
            &fastkv(&["run", "-m", p, "-p", "hi", "-t", "0"], None),
            "threads",
        );
        assert_clean_error(
            &fastkv(&["run", "-m", p, "-p", "hi", "--temp=-1"], None),
            "--temp",
        );
        assert_clean_error(
            &fastkv(&["run", "-m", p, "-p", "hi", "-n", "-5"], None),
            "-n",
        );
        let long = "word ".repeat(200);
        assert_clean_error(
            &fastkv(&["run", "-m", p, "-p", &long, "-c", "64"], None),
            "raise -c",
        );
        let nofile = dir.path().join("nofile.txt");
        let out = fastkv(
            &["perplexity", "-m", p, "-f", nofile.to_str().unwrap()],
            None,
        );
        assert_clean_error(&out, "cannot read");
        let tiny = dir.path().join("tiny.txt");
        std::fs::write(&tiny, "too short").unwrap();
        let out = fastkv(&["perplexity", "-m", p, "-f", tiny.to_str().unwrap()], None);
        assert_clean_error(&out, "need at least");
    }
}
