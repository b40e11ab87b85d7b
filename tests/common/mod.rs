//! Helpers shared by the integration tests: where the models and data are, and how
//! to compare two next-token distributions.
#![allow(dead_code)]
use std::path::PathBuf;

/// The switch that makes a missing prerequisite fail a test instead of skipping it
/// (`.ci/run` sets it: CI must not pass having checked nothing).
pub const REQUIRE_FIXTURES: &str = "FASTKV_REQUIRE_FIXTURES";

/// Whether a value of [`REQUIRE_FIXTURES`] asks for missing prerequisites to fail
/// (set, and neither empty nor "0").
pub fn fixtures_required(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// A test cannot run because `why` is missing: say so and let it pass, or fail it
/// where [`REQUIRE_FIXTURES`] is set. Every test that returns early for a missing
/// model, data file or tool goes through here.
pub fn skip(why: &str) {
    let value = std::env::var(REQUIRE_FIXTURES).ok();
    if fixtures_required(value.as_deref()) {
        panic!("{why} ({REQUIRE_FIXTURES} is set, so a missing prerequisite is a failure)");
    }
    eprintln!("SKIP: {why}");
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// Path of a reference model, or None (see [`skip`]).
pub fn model(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    if p.is_file() {
        Some(p)
    } else {
        skip(&format!(
            "{} not found; run `python3 models/fetch.py` first",
            p.display()
        ));
        None
    }
}

/// The gates shipped in models/ for reference model `name` (`<stem>.gates.gguf`),
/// or None (see [`skip`]).
pub fn shipped_gates(
    name: &str,
    model: &fastkv::model::Model,
) -> Option<std::sync::Arc<fastkv::gate::Gates>> {
    let stem = name.trim_end_matches(".gguf");
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(format!("{stem}.gates.gguf"));
    if !p.is_file() {
        skip(&format!("{} not found", p.display()));
        return None;
    }
    let g = fastkv::gate::Gates::load(&p, model)
        .unwrap_or_else(|e| panic!("the shipped gates {} do not load: {e}", p.display()));
    Some(std::sync::Arc::new(g))
}

/// A file under ../shared/data, or None (see [`skip`]).
pub fn shared_data(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel);
    if p.is_file() {
        Some(p)
    } else {
        skip(&format!(
            "{} not found (../shared is absent on this machine)",
            p.display()
        ));
        None
    }
}

/// The WikiText-2 test split, if ../shared is present.
pub fn wiki_text() -> Option<String> {
    let p = shared_data("wikitext-2-raw/wiki.test.raw")?;
    Some(std::fs::read_to_string(p).expect("wiki.test.raw is readable UTF-8"))
}

pub use fastkv::eval::fidelity::log_softmax;

/// KL(p || q) in nats between the softmax distributions of two logit rows.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

pub fn argmax(x: &[f32]) -> usize {
    fastkv::kernels::argmax(x)
}

/// Greedy generation with fastkv: feed `prompt`, then up to `n` tokens one at a time,
/// stopping at end of generation.
pub fn greedy(
    session: &mut fastkv::session::Session,
    tokenizer: &fastkv::tokenizer::Tokenizer,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    let mut logits = session.feed(prompt).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let next = argmax(&logits) as u32;
        if tokenizer.is_eog(next) {
            break;
        }
        out.push(next);
        logits = session.feed(&[next]).unwrap();
    }
    out
}

/// Compare two runs' logits (rows of n_vocab): (fraction of equal top-1, mean KL).
pub fn compare_logits(reference: &[f32], ours: &[f32], n_vocab: usize) -> (f64, f64) {
    assert_eq!(reference.len(), ours.len(), "logit arrays differ in size");
    let rows = reference.len() / n_vocab;
    let mut same = 0;
    let mut kl = 0.0;
    for (r, o) in reference
        .chunks_exact(n_vocab)
        .zip(ours.chunks_exact(n_vocab))
    {
        same += (argmax(r) == argmax(o)) as usize;
        kl += kl_divergence(r, o);
    }
    (same as f64 / rows as f64, kl / rows as f64)
}

pub mod synth;
