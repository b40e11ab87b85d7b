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
    // A command that fails before reading its input has closed the pipe.
    match input.write_all(stdin.unwrap_or("").as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("writing stdin: {e}"),
        _ => {}
    }
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
        err.contains("tokens/s") && err.contains("KV cache: "),
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
    // Nothing evicted: the cache holds what a full one would.
    assert_eq!(json["kv_bytes"], json["kv_bytes_full"]);
}

#[test]
fn inspect_prints_architecture_and_tensors() {
    for (name, arch, tok) in [(SMOLLM2, "llama", "gpt2"), (GEMMA3, "gemma3", "llama")] {
        let Some(path) = model(name) else { continue };
        let out = fastkv(&["inspect", path.to_str().unwrap()], None);
        let s = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        // -m, as every other command takes the model, says the same.
        let with_m = fastkv(&["inspect", "-m", path.to_str().unwrap()], None);
        assert_eq!(text(&with_m.stdout), s);
        assert!(s.contains(&format!("architecture: {arch}")), "{s}");
        assert!(s.contains(&format!("tokenizer: {tok}")), "{s}");
        assert!(
            s.contains("token_embd.weight") && s.contains("blk.0.attn_q.weight"),
            "{s}"
        );
    }
}

/// `fastkv completions SHELL` prints a script that knows the subcommands, their flags
/// and the values of enumerated flags; bash's parses.
#[test]
fn shell_completions_know_commands_flags_and_values() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = fastkv(&["completions", shell], None);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["serve", "train-gates", "kv-policy", "snapkv", "ctx-size"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
        // The template sandbox's child command is not a user's.
        assert!(!script.contains("render-template"), "{shell}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("fastkv.bash");
    std::fs::write(&bash, fastkv(&["completions", "bash"], None).stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&bash).output().unwrap();
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert_clean_error(&fastkv(&["completions", "tcsh"], None), "possible values");
}

/// `-c` is taken by the commands that hold one context; eval and train-gates set
/// their lengths with their own flags and refuse it instead of ignoring it.
#[test]
fn ctx_size_is_refused_where_it_would_be_ignored() {
    for (args, flag) in [
        (&["eval", "niah", "-c", "2048"][..], "-c"),
        (
            &["eval", "kld", "-f", "x.txt", "--ctx-size", "2048"][..],
            "--ctx-size",
        ),
        (
            &[
                "train-gates",
                "--corpus",
                "x",
                "--out",
                "g.gguf",
                "-c",
                "512",
            ][..],
            "-c",
        ),
        (&["bench", "-c", "512"][..], "-c"),
    ] {
        assert_clean_error(
            &fastkv(args, None),
            &format!("unexpected argument '{flag}'"),
        );
    }
    // Where it is taken, the help says so.
    let help = text(&fastkv(&["perplexity", "--help"], None).stdout);
    assert!(help.contains("--ctx-size"), "{help}");
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

/// `fastkv bench -o json`, parsed; None (test skipped) without the default model.
fn bench_json(extra: &[&str]) -> Option<serde_json::Value> {
    let path = model(SMOLLM2)?;
    let mut args = vec!["bench", "-m", path.to_str().unwrap(), "-o", "json"];
    args.extend_from_slice(extra);
    let out = fastkv(&args, None);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).expect("bench -o json prints JSON"))
}

fn test_names(report: &serde_json::Value) -> Vec<String> {
    report["tests"]
        .as_array()
        .expect("a tests array")
        .iter()
        .map(|t| t["test"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bench_json_reports_every_test_with_speeds() {
    let Some(r) = bench_json(&["-p", "16", "-n", "4", "-r", "2", "-t", "2"]) else {
        return;
    };
    assert_eq!(test_names(&r), ["pp16", "tg4"]);
    assert_eq!(r["n_threads"], 2);
    assert_eq!(r["backend"], "CPU");
    assert!(r["model_n_params"].as_u64().unwrap() > 100_000_000);
    assert!(r["memory_bandwidth_gbs"].as_f64().unwrap() > 0.0);
    for t in r["tests"].as_array().unwrap() {
        assert!(t["avg_ts"].as_f64().unwrap() > 0.0, "{t}");
        assert_eq!(t["samples_ts"].as_array().unwrap().len(), 2);
    }
    let tg = &r["tests"][1];
    assert!(tg["bytes_per_token"].as_f64().unwrap() > r["model_size"].as_f64().unwrap() * 0.5);
    assert!(tg["achieved_gbs"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_depth_names_tests_as_llama_bench() {
    let Some(r) = bench_json(&["-p", "16", "-n", "2", "-d", "0,32", "-r", "1"]) else {
        return;
    };
    assert_eq!(test_names(&r), ["pp16", "tg2", "pp16 @ d32", "tg2 @ d32"]);
}

#[test]
fn bench_compares_with_llama_cpp() {
    let Some(r) = bench_json(&["--compare", "llama.cpp", "-p", "16", "-n", "4", "-r", "1"]) else {
        return;
    };
    assert_eq!(r["compare"], "llama.cpp");
    assert_eq!(test_names(&r), ["pp16", "tg4"]);
    for t in r["tests"].as_array().unwrap() {
        let ours = t["fastkv_tps"].as_f64().unwrap();
        let theirs = t["other_tps"].as_f64().unwrap();
        assert!(ours > 0.0 && theirs > 0.0, "{t}");
        assert!((t["ratio"].as_f64().unwrap() - ours / theirs).abs() < 1e-9);
    }
}

#[test]
fn bench_compares_a_policy_with_the_full_cache() {
    // Gates at keep 1.0 score every token and evict nothing: the bench then measures
    // what scoring costs, against fastkv's full cache in the same run.
    let Some(r) = bench_json(&[
        "--compare",
        "full",
        "--kv-policy",
        "gated",
        "--kv-keep",
        "1.0",
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "1",
    ]) else {
        return;
    };
    assert_eq!(r["compare"], "full");
    assert_eq!(r["kv_policy"], "gated");
    assert!(r.get("llama_cpp_flash_attn").is_none(), "{r}");
    for t in r["tests"].as_array().unwrap() {
        let ours = t["fastkv_tps"].as_f64().unwrap();
        let theirs = t["other_tps"].as_f64().unwrap();
        assert!(ours > 0.0 && theirs > 0.0, "{t}");
        assert!((t["ratio"].as_f64().unwrap() - ours / theirs).abs() < 1e-9);
        if t["n_gen"].as_u64().unwrap() > 0 {
            // Nothing is evicted, so both sides hold and read the same KV bytes.
            assert_eq!(t["bytes_per_token"], t["other_bytes_per_token"], "{t}");
        }
    }
}

#[test]
fn bench_prints_markdown_and_csv() {
    let Some(path) = model(SMOLLM2) else { return };
    let p = path.to_str().unwrap();
    let out = fastkv(&["bench", "-m", p, "-p", "8", "-n", "2", "-r", "1"], None);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let md = text(&out.stdout);
    let lines: Vec<&str> = md.lines().collect();
    for col in [
        "model", "size", "params", "backend", "threads", "test", "t/s",
    ] {
        assert!(lines[0].contains(col), "header lacks {col}: {md}");
    }
    assert!(lines[1].starts_with("| ---"), "{md}");
    assert!(
        lines[2].contains("llama 135M Q4_1") && lines[2].contains("pp8"),
        "{md}"
    );
    assert!(lines[3].contains("tg2") && lines[3].contains(" ± "), "{md}");
    assert!(md.contains("memory bandwidth"), "{md}");

    let out = fastkv(
        &[
            "bench", "-m", p, "-p", "8", "-n", "2", "-r", "1", "-o", "csv",
        ],
        None,
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let csv = text(&out.stdout);
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows.iter().all(|r| r.len() == rows[0].len()), "{csv}");
    let col = rows[0].iter().position(|&c| c == "avg_ts").unwrap();
    assert!(rows[1][col].parse::<f64>().unwrap() > 0.0, "{csv}");
    assert_eq!(
        rows[2][rows[0].iter().position(|&c| c == "test").unwrap()],
        "\"tg2\""
    );
}

#[test]
fn bench_rejects_bad_values() {
    let Some(path) = model(SMOLLM2) else { return };
    let p = path.to_str().unwrap();
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "-m", p];
        args.extend_from_slice(extra);
        fastkv(&args, None)
    };
    assert_clean_error(&bench(&["-p", "0", "-n", "0"]), "nothing to measure");
    assert_clean_error(&bench(&["-o", "xml"]), "xml");
    assert_clean_error(&bench(&["--compare", "vllm"]), "vllm");
    assert_clean_error(&bench(&["-t", "0"]), "--threads");
    assert_clean_error(&bench(&["-r", "0"]), "--repetitions");
    assert_clean_error(&bench(&["-p", "abc"]), "abc");
    assert_clean_error(&bench(&["-p", "16", "-d", "100000"]), "context");
}

/// A document of about 1500 tokens with one fact in it, made up so that no data
/// files are needed.
fn document(dir: &std::path::Path) -> std::path::PathBuf {
    let mut doc = String::new();
    for i in 0..60 {
        doc.push_str(&format!(
            "Day {i}. The lighthouse keeper walked along the shore, counted the boats in the \
             harbour and wrote the weather into the log book. "
        ));
        if i == 30 {
            doc.push_str("The keeper's cat is called Marmalade. ");
        }
    }
    let path = dir.join("doc.txt");
    std::fs::write(&path, doc).unwrap();
    path
}

/// `run --context-file` compresses the document before the question, reports the
/// KV memory before and after, and `--stats-json` carries both figures.
#[test]
fn run_compresses_a_context_file() {
    let Some(path) = model(SMOLLM2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let doc = document(dir.path());
    let stats = dir.path().join("stats.json");
    let out = fastkv(
        &[
            "run",
            "-m",
            path.to_str().unwrap(),
            "--context-file",
            doc.to_str().unwrap(),
            "-p",
            "\n\nQuestion: what is the keeper's cat called?\nAnswer:",
            "-n",
            "8",
            "--temp",
            "0",
            "--kv-policy",
            "snapkv",
            "--kv-keep",
            "0.3",
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        None,
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    assert!(
        err.contains("context:") && err.contains("MiB full ->"),
        "{err}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let (held, full) = (
        json["kv_bytes"].as_u64().unwrap(),
        json["kv_bytes_full"].as_u64().unwrap(),
    );
    assert!(held * 2 < full, "held {held} of {full}");
    assert!(json["compression"]["n_context"].as_u64().unwrap() > 1000);
}

/// A long prompt (`-f`) under a keep ratio is compressed as it arrives, as a context
/// file is, and generation continues after it.
#[test]
fn run_compresses_a_long_prompt() {
    let Some(path) = model(SMOLLM2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let doc = document(dir.path());
    let stats = dir.path().join("stats.json");
    let out = fastkv(
        &[
            "run",
            "-m",
            path.to_str().unwrap(),
            "-f",
            doc.to_str().unwrap(),
            "-n",
            "8",
            "--temp",
            "0",
            "--kv-policy",
            "h2o",
            "--kv-keep",
            "0.3",
            "--no-display-prompt",
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        None,
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    assert!(
        err.contains("context:") && err.contains("h2o, keep 0.3"),
        "{err}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let (held, full) = (
        json["kv_bytes"].as_u64().unwrap(),
        json["kv_bytes_full"].as_u64().unwrap(),
    );
    assert!(held * 2 < full, "held {held} of {full}");
    assert!(json["compression"]["n_context"].as_u64().unwrap() > 1000);
    assert_eq!(json["n_gen"], 8);
    assert!(!text(&out.stdout).trim().is_empty());
}

/// A compressed context saved once answers later runs; files for another model, or
/// damaged ones, are refused with a message.
#[test]
fn saved_contexts_are_reused_and_checked() {
    let Some(path) = model(SMOLLM2) else { return };
    let p = path.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let doc = document(dir.path());
    let ctx = dir.path().join("doc.fkv");
    let c = ctx.to_str().unwrap();
    let out = fastkv(
        &[
            "run",
            "-m",
            p,
            "--context-file",
            doc.to_str().unwrap(),
            "--kv-keep",
            "0.3",
            "--save-context",
            c,
            "-n",
            "1",
            "--temp",
            "0",
        ],
        None,
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let ask = |ctx: &str| {
        fastkv(
            &[
                "run",
                "-m",
                p,
                "--load-context",
                ctx,
                "-p",
                "\n\nQuestion: who walked along the shore?\nAnswer:",
                "-n",
                "6",
                "--temp",
                "0",
            ],
            None,
        )
    };
    let out = ask(c);
    let err = text(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    assert!(err.contains("loaded context"), "{err}");
    // The question alone was run: its tokens, not the document's.
    let prompt_tokens: usize = err
        .split("prompt: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(prompt_tokens < 30, "{prompt_tokens} prompt tokens run");

    let mut bytes = std::fs::read(&ctx).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let bad = dir.path().join("bad.fkv");
    std::fs::write(&bad, &bytes).unwrap();
    assert_clean_error(&ask(bad.to_str().unwrap()), "corrupt");

    if let Some(gemma) = model(GEMMA3) {
        let out = fastkv(
            &[
                "run",
                "-m",
                gemma.to_str().unwrap(),
                "--load-context",
                c,
                "-p",
                "hi",
                "-n",
                "1",
            ],
            None,
        );
        assert_clean_error(&out, "different model");
    }
}

#[test]
fn bad_kv_flags_are_refused() {
    let Some(path) = model(SMOLLM2) else { return };
    let p = path.to_str().unwrap();
    for (flags, needle) in [
        (&["--kv-keep", "0"][..], "--kv-keep"),
        (&["--kv-keep", "1.5"][..], "--kv-keep"),
        // clap refuses them, listing the choices.
        (
            &["--kv-policy", "lru"][..],
            "possible values: full, streaming",
        ),
        (
            &["--kv-level", "row"][..],
            "possible values: auto, global, layer, head",
        ),
        (
            &["--kv-policy", "kvzip", "--kv-budget", "256"][..],
            "decode budget",
        ),
        (&["--kv-budget", "0"][..], "at least 1"),
        (&["--prefill-chunk", "0"][..], "--prefill-chunk"),
        (
            &["--kv-policy", "full", "--kv-keep", "0.5"][..],
            "need an eviction policy",
        ),
    ] {
        let mut args = vec!["run", "-m", p, "-p", "hi", "-n", "1"];
        args.extend_from_slice(flags);
        assert_clean_error(&fastkv(&args, None), needle);
    }
}

/// `/load FILE` in chat compresses a document; the next question is asked about it.
#[test]
fn chat_loads_and_compresses_a_document() {
    let Some(path) = model(SMOLLM2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let doc = document(dir.path());
    let input = format!(
        "/load {}\nWhat is the keeper's cat called?\n/load {}\n",
        doc.display(),
        dir.path().join("missing.txt").display()
    );
    let out = fastkv(
        &[
            "chat",
            "-m",
            path.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "24",
            "--kv-keep",
            "0.5",
            "--system",
            "You are a helpful assistant.",
        ],
        Some(&input),
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    assert!(
        err.contains("context:") && err.contains("MiB full ->"),
        "{err}"
    );
    assert!(!text(&out.stdout).trim().is_empty());
    // A missing file is reported and the chat goes on.
    assert!(err.contains("cannot read"), "{err}");
}

/// `fastkv chat` renders the model's template in the sandbox: a template that asks
/// for terabytes ends the chat with a clear error, not an abort.
#[test]
fn chat_stops_a_hostile_model_template_with_a_clear_error() {
    use common::synth::{tiny_model, TinySpec, Value, Vocab};
    let dir = tempfile::tempdir().unwrap();
    let mut w = tiny_model(&TinySpec::new("llama"), &Vocab::bytes(0));
    w.set(
        "tokenizer.chat_template",
        Value::str(
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}\
             {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ messages[0].content }}",
        ),
    );
    let path = w.write_to(dir.path(), "tiny.gguf");
    let out = fastkv(
        &["chat", "-m", path.to_str().unwrap(), "-n", "4"],
        Some("hello\n"),
    );
    assert_clean_error(&out, "needed more than 1024 MiB of memory");
}

/// `--chat-template NAME` picks one of the model's templates
/// (`tokenizer.chat_template.NAME`), `--chat-template-file` replaces them, `inspect`
/// lists the names, and an unknown name or a broken file is a clear error. Each
/// template here marks itself by the error it raises.
#[test]
fn chat_template_flags_pick_a_named_template_or_a_file() {
    use common::synth::{tiny_model, TinySpec, Value, Vocab};
    let dir = tempfile::tempdir().unwrap();
    let mut w = tiny_model(&TinySpec::new("llama"), &Vocab::bytes(0));
    w.set(
        "tokenizer.chat_template",
        Value::str("{{ raise_exception('the default template') }}"),
    );
    w.set(
        "tokenizer.chat_template.tool_use",
        Value::str("{{ raise_exception('the ' ~ 'tool_use'|upper ~ ' template') }}"),
    );
    let model = w.write_to(dir.path(), "tiny.gguf");
    let m = model.to_str().unwrap();
    let chat = |extra: &[&str]| {
        let mut args = vec!["chat", "-m", m, "-n", "2"];
        args.extend_from_slice(extra);
        fastkv(&args, Some("hello\n"))
    };

    let listed = fastkv(&["inspect", "-m", m], None);
    assert!(
        text(&listed.stdout).contains("chat templates: default, tool_use"),
        "{}",
        text(&listed.stdout)
    );
    assert_clean_error(&chat(&[]), "the default template");
    assert_clean_error(
        &chat(&["--chat-template", "default"]),
        "the default template",
    );
    assert_clean_error(
        &chat(&["--chat-template", "tool_use"]),
        "the TOOL_USE template",
    );
    assert_clean_error(
        &chat(&["--chat-template", "rag"]),
        "no chat template named `rag`; the model has: default, tool_use",
    );

    let file = dir.path().join("mine.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}{{ m.role }}: {{ m.content.strip() }}\n{% endfor %}",
    )
    .unwrap();
    let out = chat(&["--chat-template-file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(&file, "{% for m in messages %}").unwrap();
    let broken = chat(&["--chat-template-file", file.to_str().unwrap()]);
    assert_clean_error(&broken, "is not valid");
    let both = chat(&["--chat-template", "default", "--chat-template-file", "x"]);
    assert_clean_error(&both, "cannot be used with");
}

/// `perplexity` prints its running estimate after each chunk, as llama-perplexity
/// does (`[1]18.2,[2]17.9,...`), before the run ends; the last one is the final
/// estimate.
#[test]
fn perplexity_prints_its_running_estimate_as_it_goes() {
    use std::io::Read;
    let Some(path) = model(SMOLLM2) else { return };
    let Some(wiki) = shared_data("wikitext-2-raw/wiki.test.raw") else {
        return;
    };
    let args = [
        "perplexity",
        "-m",
        path.to_str().unwrap(),
        "-f",
        wiki.to_str().unwrap(),
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .args(args)
        .args(["-c", "512", "--chunks", "4", "-t", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    // Up to the comma after the first value.
    while !seen.ends_with(b",") {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "output ended early");
        seen.push(byte[0]);
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first estimate came only when the run had ended"
    );
    stdout.read_to_end(&mut seen).unwrap();
    assert!(child.wait().unwrap().success());
    let out = String::from_utf8(seen).unwrap();
    let mut lines = out.lines();
    let running: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(running.len(), 4, "{out}");
    for (i, r) in running.iter().enumerate() {
        let value = r.strip_prefix(&format!("[{}]", i + 1)).expect("[i]value");
        assert!(value.parse::<f64>().unwrap() > 1.0, "{out}");
    }
    let last = running[3].trim_start_matches("[4]");
    let fin = lines.next().unwrap();
    assert!(
        fin.starts_with(&format!("Final estimate: PPL = {last} +/- ")),
        "{out}"
    );
}

/// `--version` names the git commit built from (the checkout's HEAD: build.rs runs
/// again when it moves), the cargo features and the SIMD extensions compiled for;
/// `-V` is the version alone.
#[test]
fn version_names_the_commit_features_and_instruction_set() {
    let long = text(&fastkv(&["--version"], None).stdout);
    let short = text(&fastkv(&["-V"], None).stdout);
    let version = concat!("fastkv ", env!("CARGO_PKG_VERSION"));
    assert_eq!(short.trim(), version);
    assert!(long.starts_with(&format!("{version}\n")), "{long}");
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| text(&o.stdout).trim().to_string());
    let commit = match &head {
        Some(commit) => format!("commit {commit};"),
        // A source tree without git (a crate package, an exported archive).
        None => "commit unknown (not built from a git checkout);".to_string(),
    };
    assert!(long.contains(&commit), "{long}");
    assert!(long.contains("features: "), "{long}");
    // What the build enabled (.cargo/config.toml) is what --version reports.
    if cfg!(target_arch = "x86_64") {
        assert!(long.contains("compiled for: x86_64 "), "{long}");
        assert_eq!(
            long.contains("avx2"),
            cfg!(target_feature = "avx2"),
            "{long}"
        );
    }
}

/// `fastkv chat` on a terminal, as a person uses it (tests/chat_terminal.py drives it
/// on a pseudo-terminal): an answer, Ctrl-C stopping a long one while the chat goes
/// on, the up arrow recalling the last message, a message continued over two lines
/// with `\`, Ctrl-D leaving; then a second session that recalls the first one's
/// history and leaves on Ctrl-C.
#[test]
fn chat_on_a_terminal_edits_lines_keeps_history_and_stops_on_ctrl_c() {
    let Some(path) = model(SMOLLM2) else { return };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chat_terminal.py");
    let out = Command::new("python3")
        .args([script, env!("CARGO_BIN_EXE_fastkv"), path.to_str().unwrap()])
        .output()
        .expect("python3 runs");
    let transcript = text(&out.stdout);
    eprintln!("{transcript}{}", text(&out.stderr));
    assert!(out.status.success(), "{transcript}");
    assert!(transcript.trim_end().ends_with("OK"), "{transcript}");
}
