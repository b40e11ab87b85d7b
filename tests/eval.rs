//! The quality harness on the real SmolLM2: at keep 1.0 every policy (the gated one
//! too, with the shipped gates) scores exactly the full cache's numbers, one-shot compression equals the runtime's schedule
//! when the context is one prefill chunk, and `fastkv eval` writes its reports.
mod common;

use std::process::Command;

use common::*;
use fastkv::eval::harness::Variant;
use fastkv::eval::tasks::{Generator, TaskKind};
use fastkv::eval::{Harness, Schedule};
use fastkv::kv::Policy;
use fastkv::model::Model;
use fastkv::session::{EvictionConfig, Session, TeacherPrompt};
use fastkv::tokenizer::{ChatTemplate, Tokenizer};

const POLICIES: [Policy; 5] = [
    Policy::Streaming,
    Policy::H2o,
    Policy::SnapKv,
    Policy::KvZip,
    Policy::Random,
];

fn load() -> Option<(Model, Tokenizer, ChatTemplate)> {
    let model = Model::load(&model(SMOLLM2)?).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let template = ChatTemplate::from_gguf(model.file(), &tok).unwrap();
    Some((model, tok, template))
}

/// A single-needle sample of about `n` tokens (noise haystack: no ../shared needed).
fn sample(tok: &Tokenizer, n: usize) -> fastkv::eval::tasks::Sample {
    let count = |s: &str| tok.encode(s, false, false).len();
    let mut g = Generator::new(&count, None, 11);
    g.sample(TaskKind::SingleNoise, n, 0, 1, 1).unwrap()
}

#[test]
fn at_keep_one_every_policy_scores_exactly_the_full_cache() {
    let Some((model, tok, template)) = load() else {
        return;
    };
    let mut h = Harness::new(
        &model,
        &tok,
        &template,
        Some("You are a helpful assistant."),
    )
    .unwrap();
    let mut variants: Vec<Variant> = POLICIES
        .iter()
        .map(|&policy| Variant::new(policy, 1.0))
        .collect();
    h.gates = shipped_gates(SMOLLM2, &model);
    if h.gates.is_some() {
        variants.push(Variant::new(Policy::Gated, 1.0));
    }
    // A variant that does evict, so that the comparison can fail.
    let evicting = Variant::new(Policy::Streaming, 0.3);
    variants.push(evicting);
    let s = sample(&tok, 320);
    let doc = tok.encode(&s.context, false, false);
    for schedule in [Schedule::OneShot, Schedule::Chunked] {
        h.schedule = schedule;
        let conts = h.fidelity(&doc[..300], 260, &variants).unwrap();
        assert_eq!(conts.len(), variants.len() + 1);
        assert_eq!(conts[0].variant, Variant::FULL);
        assert!(conts[0].tokens.iter().all(|t| t.kld == 0.0 && t.same_top1));
        for c in &conts[1..] {
            let max_kld = c.tokens.iter().map(|t| t.kld).fold(0.0, f64::max);
            if c.variant == evicting {
                assert!(max_kld > 0.0, "{schedule}: evicting 70% changed nothing");
                assert!(c.compression.kv_bytes < c.compression.kv_bytes_full);
            } else {
                assert_eq!(c.tokens, conts[0].tokens, "{schedule}: {}", c.variant);
                assert_eq!(c.compression.kv_bytes, conts[0].compression.kv_bytes);
            }
        }
        let answers = h.answer(&s, &variants).unwrap();
        let full = &answers[0];
        assert_eq!(full.variant, Variant::FULL);
        assert_eq!(
            full.score, 1.0,
            "SmolLM2 finds a needle in 320 tokens: {full:?}"
        );
        for a in answers.iter().filter(|a| a.variant.keep == 1.0) {
            assert_eq!(
                (&a.text, a.score),
                (&full.text, full.score),
                "{}",
                a.variant
            );
        }
    }
}

/// With the whole context in one prefill chunk, the runtime's chunked schedule sees
/// exactly what one-shot compression sees: the same pairs are kept, and the
/// continuation's logits are bit-identical.
#[test]
fn oneshot_equals_the_runtime_schedule_for_one_chunk() {
    let Some((model, tok, template)) = load() else {
        return;
    };
    let s = sample(&tok, 300);
    let ids = tok.encode(&s.context, false, false);
    let (prefix, context, cont) = (tok.encode("", true, false), &ids[..280], &ids[280..296]);
    let teacher = TeacherPrompt::new(&tok, &template).unwrap();
    let gates = shipped_gates(SMOLLM2, &model);
    let session = || {
        let mut s = Session::new(&model, 2048);
        s.set_teacher_prompt(teacher.clone());
        if let Some(g) = &gates {
            s.set_gates(g.clone());
        }
        s
    };
    let gated = gates.as_ref().map(|_| Policy::Gated);
    for policy in POLICIES.into_iter().chain(gated) {
        let cfg = EvictionConfig::new(policy, 0.3);
        let mut chunked = session();
        chunked.set_eviction(cfg.clone()).unwrap();
        chunked.feed_context(&prefix, context).unwrap();
        let mut oneshot = session();
        let (_, scores) = oneshot
            .feed_context_scored(&prefix, context, &[policy])
            .unwrap();
        let report = oneshot.compress_scored(&scores, cfg).unwrap();
        assert!(
            report.kv_bytes < report.kv_bytes_full / 2,
            "{policy}: {report:?}"
        );
        let kept = |s: &Session| -> Vec<Vec<u32>> {
            s.cache().evictable_heads().map(|h| h.pos.clone()).collect()
        };
        assert_eq!(kept(&chunked), kept(&oneshot), "{policy}");
        let a = chunked.feed_all_logits(cont).unwrap();
        let b = oneshot.feed_all_logits(cont).unwrap();
        assert!(a == b, "{policy}: the continuations differ");
    }
}

/// The eval decodes every variant's answer to a question in one batch; that gives
/// exactly the answers of decoding each variant alone, for a sample with several
/// questions.
#[test]
fn batched_answers_equal_answers_decoded_alone() {
    let Some((model, tok, template)) = load() else {
        return;
    };
    let mut h = Harness::new(
        &model,
        &tok,
        &template,
        Some("You are a helpful assistant."),
    )
    .unwrap();
    h.gates = shipped_gates(SMOLLM2, &model);
    let mut variants = vec![
        Variant::new(Policy::Streaming, 0.3),
        Variant::new(Policy::SnapKv, 0.5),
        Variant::new(Policy::KvZip, 0.3),
    ];
    if h.gates.is_some() {
        variants.push(Variant::new(Policy::Gated, 0.2));
    }
    let count = |s: &str| tok.encode(s, false, false).len();
    let mut g = Generator::new(&count, None, 5);
    let sample = g.sample(TaskKind::SingleNoise, 600, 0, 1, 2).unwrap();
    assert_eq!(sample.queries.len(), 2);
    let batched = h.answer(&sample, &variants).unwrap();
    h.batch_decode = false;
    let alone = h.answer(&sample, &variants).unwrap();
    assert_eq!(batched.len(), (variants.len() + 1) * 2);
    // Everything but the timings.
    let strip = |a: &[fastkv::eval::harness::Answer]| -> Vec<_> {
        a.iter()
            .map(|a| {
                (
                    a.variant,
                    a.query,
                    a.score,
                    a.text.clone(),
                    a.evidence_kept,
                    a.compression.kv_bytes,
                )
            })
            .collect()
    };
    assert_eq!(strip(&batched), strip(&alone));
    // The full cache answers both questions of the sample.
    let full: Vec<_> = batched
        .iter()
        .filter(|a| a.variant == Variant::FULL)
        .collect();
    assert_eq!(full.iter().map(|a| a.query).collect::<Vec<_>>(), [0, 1]);
    assert!(full.iter().any(|a| a.score == 1.0), "{full:?}");
}

fn fastkv(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .args(args)
        .output()
        .expect("fastkv runs")
}

/// The reduced sweep CI runs: every output is written and holds what it should.
#[test]
fn reduced_sweep_writes_tables_and_plots() {
    let (Some(m), Some(wiki)) = (model(SMOLLM2), shared_data("wikitext-2-raw/wiki.test.raw"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = fastkv(&[
        "eval",
        "sweep",
        "-m",
        m.to_str().unwrap(),
        "-f",
        wiki.to_str().unwrap(),
        "--lengths",
        "400",
        "--tasks",
        "single-noise,single-text,kv",
        "--samples",
        "2",
        "--ctx",
        "256",
        "--cont",
        "16",
        "--docs",
        "2",
        "--policies",
        "streaming,snapkv,kvzip",
        "--keeps",
        "0.5,0.2",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("task,length,policy,keep,n,accuracy,accuracy_ci95,evidence_kept"));
    // The continuation: the full cache and 3 policies x 2 keeps.
    let kld: Vec<&&str> = lines.iter().filter(|l| l.starts_with("kld,256,")).collect();
    assert_eq!(kld.len(), 7, "{csv}");
    // Every task has all 7 rows (one prefill per sample serves every variant;
    // uninformative tasks are marked in the report, not skipped).
    for task in ["single-noise", "single-text", "kv"] {
        let n = lines
            .iter()
            .filter(|l| l.starts_with(&format!("{task},400,")))
            .count();
        assert_eq!(n, 7, "{task}: {n} rows\n{csv}");
    }
    let full_noise = lines
        .iter()
        .find(|l| l.starts_with("single-noise,400,full,1,2,"))
        .unwrap_or_else(|| panic!("no full-cache row for single-noise:\n{csv}"));
    assert!(full_noise.contains(",1.000000,"), "{full_noise}");
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    assert!(md.contains("### Full cache accuracy"), "{md}");
    assert!(md.contains("| kvzip |"), "{md}");
    assert!(md.contains("Mean KLD"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(json.as_array().unwrap().len(), lines.len() - 1);
    for plot in ["accuracy.png", "kld.png", "top1.png"] {
        let bytes = std::fs::read(dir.path().join(plot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{plot} is not a PNG");
        assert!(bytes.len() > 10_000, "{plot} is nearly empty");
    }
}

#[test]
fn bad_eval_flags_are_clear_errors() {
    let Some(m) = model(SMOLLM2) else { return };
    let m = m.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["eval", "niah", "-m", m, "--tasks", "needle"],
            "unknown task 'needle'",
        ),
        (
            &["eval", "niah", "-m", m, "--keeps", "1.5"],
            "keep ratios must lie in (0, 1]",
        ),
        (
            &["eval", "niah", "-m", m, "--schedule", "later"],
            "invalid value 'later' for '--schedule",
        ),
        (
            &[
                "eval",
                "niah",
                "-m",
                m,
                "--lengths",
                "100000",
                "--policies",
                "snapkv",
            ],
            "length 100000 must lie in",
        ),
        (
            &["eval", "kld", "-m", m, "-f", "/nonexistent/file.txt"],
            "cannot read /nonexistent/file.txt",
        ),
    ];
    for (args, needle) in cases {
        let out = fastkv(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
