//! Long contexts on tiny generated models (no fixtures needed, and fast): chunked
//! prefill with eviction attends only to the pairs kept so far, memory stays flat
//! under a decode budget, and the evaluation harness gives the same numbers under
//! the runtime's chunked schedule as under one-shot compression when the context is
//! one prefill chunk.
mod common;

use common::synth::{tiny_model, TinySpec, Vocab};
use fastkv::eval::budget::BudgetVariant;
use fastkv::eval::harness::Variant;
use fastkv::eval::{Harness, Schedule};
use fastkv::kv::{EvictMode, Policy};
use fastkv::model::Model;
use fastkv::session::{EvictionConfig, Session};
use fastkv::tokenizer::{ChatTemplate, Tokenizer};

/// A tiny random llama with a context of 4096 and a byte-level vocabulary.
fn tiny() -> (tempfile::TempDir, Model) {
    let spec = TinySpec {
        n_ctx: 4096,
        ..TinySpec::new("llama")
    };
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(&spec, &Vocab::bytes(200)).write_to(dir.path(), "tiny.gguf");
    let model = Model::load(&path).unwrap();
    (dir, model)
}

/// Token ids that are not the end-of-text token (256 in the byte vocabulary).
fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % 256)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A 3000-token context in chunks of 48 under H2O at keep 0.25: the cache never
/// holds much more than the kept pairs, the window and one chunk (so every chunk's
/// attention runs over the compressed cache), what the chunks computed is exactly
/// what they compute when evicted pairs are only hidden from attention (masked),
/// and it is not what the full cache computes. (Chunks of fewer than 64 tokens use
/// the one-query kernel, for which hiding and removing a pair are bit-identical.)
#[test]
fn chunked_prefill_with_eviction_attends_only_to_kept_pairs() {
    let (_dir, model) = tiny();
    let (prefix, context, cont) = (vec![256u32], ids(3000, 1), ids(16, 9));
    let cfg = |mode| EvictionConfig {
        mode,
        ..EvictionConfig::new(Policy::H2o, 0.25)
    };
    let run = |cfg: EvictionConfig| {
        let mut s = Session::new(&model, 4096);
        s.set_prefill_chunk(48);
        s.set_eviction(cfg).unwrap();
        let (_, report) = s.feed_context(&prefix, &context).unwrap();
        let logits = s.feed_all_logits(&cont).unwrap();
        (s, report, logits)
    };
    let (compact, report, evicted) = run(cfg(EvictMode::Compact));
    let (_, _, masked) = run(cfg(EvictMode::Mask));
    let (full, _, full_logits) = run(EvictionConfig::default());

    // Memory: at most the window (2% = 60), the kept quarter, one chunk and the
    // lists' spare room, far below the full cache's.
    let entry = compact.cache().shape.entry_bytes();
    let lists = compact.cache().evictable_heads().count();
    let bound = lists * (60 + 3001 / 4 + 48 + 3001 / 8) * entry;
    assert!(
        compact.peak_kv_bytes() <= bound,
        "peak {} > {bound}",
        compact.peak_kv_bytes()
    );
    assert!(compact.peak_kv_bytes() * 2 < full.peak_kv_bytes());
    assert!(report.kv_bytes * 3 < report.kv_bytes_full, "{report:?}");
    // Evicted pairs were never attended to: hiding them gives the same results.
    assert!(evicted == masked, "compacted and masked differ");
    assert!(
        max_abs_diff(&evicted, &full_logits) > 1e-2,
        "eviction changed nothing"
    );
}

/// 1500 tokens generated under decode budgets: every budgeted session's KV memory
/// stops growing (the second half of the run holds no more than the first half
/// after the warm-up), while the full cache's grows with every token; the full
/// cache compared with itself has zero divergence.
#[test]
fn memory_stays_flat_under_a_decode_budget() {
    let (_dir, model) = tiny();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let h = Harness::new(&model, &tok, &ChatTemplate::plain(), None).unwrap();
    let variants = [
        BudgetVariant {
            policy: Policy::H2o,
            budget: 200,
        },
        BudgetVariant {
            policy: Policy::Streaming,
            budget: 300,
        },
    ];
    let prompt = ids(300, 3);
    let traces = h.budget_fidelity(&prompt, 1500, &variants).unwrap();
    assert_eq!(traces.len(), 3);
    let full = &traces[0];
    assert!(full.variant.is_none());
    assert!(full.tokens.iter().all(|t| t.kld == 0.0 && t.same_top1));
    assert!(full.kv_bytes[1499] > full.kv_bytes[300] * 2);
    let lists = model.config.n_layer * model.config.n_head_kv;
    let entry = model.kv_shape().entry_bytes();
    for (t, v) in traces[1..].iter().zip(&variants) {
        assert_eq!(t.variant, Some(*v));
        let first = t.kv_bytes[300..900].iter().max().unwrap();
        let second = t.kv_bytes[900..].iter().max().unwrap();
        assert!(second <= first, "{v}: {second} > {first}");
        // At most the budget, the 128 tokens between enforcements and spare room.
        assert!(
            *second <= lists * (v.budget + 128) * entry * 2,
            "{v}: {second}"
        );
        assert!(t.tokens.iter().any(|f| f.kld > 0.0), "{v} changed nothing");
    }
}

/// The harness under the runtime's chunked schedule (a prefill per variant, evicting
/// after each chunk) gives the same answers and continuation numbers as one-shot
/// compression (one prefill scored for every policy) when the context is one chunk.
/// (H2O is left out: scored together with SnapKV, one-shot feeds SnapKV's last 32
/// queries in a call of their own, which rounds differently.)
#[test]
fn chunked_and_oneshot_evals_agree_on_one_chunk() {
    let (_dir, model) = tiny();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let mut h = Harness::new(&model, &tok, &ChatTemplate::plain(), None).unwrap();
    let variants: Vec<Variant> = [
        Policy::Streaming,
        Policy::SnapKv,
        Policy::KvZip,
        Policy::Random,
    ]
    .into_iter()
    .flat_map(|policy| [0.5, 0.2].map(|keep| Variant::new(policy, keep)))
    .collect();
    let count = |s: &str| tok.encode(s, false, false).len();
    let mut g = fastkv::eval::tasks::Generator::new(&count, None, 3);
    let sample = g
        .sample(fastkv::eval::tasks::TaskKind::SingleNoise, 400, 0, 1, 2)
        .unwrap();
    let doc = ids(460, 5);
    let mut results = Vec::new();
    for schedule in [Schedule::OneShot, Schedule::Chunked] {
        h.schedule = schedule;
        let answers: Vec<_> = h
            .answer(&sample, &variants)
            .unwrap()
            .into_iter()
            .map(|a| (a.variant, a.query, a.text, a.evidence_kept))
            .collect();
        let conts: Vec<_> = h
            .fidelity(&doc, 440, &variants)
            .unwrap()
            .into_iter()
            .map(|c| (c.variant, c.tokens))
            .collect();
        results.push((answers, conts));
    }
    assert_eq!(results[0].0.len(), (variants.len() + 1) * 2);
    assert_eq!(results[0], results[1]);
    // Eviction did something.
    let conts = &results[0].1;
    assert!(conts[1..]
        .iter()
        .any(|(_, t)| t.iter().any(|f| f.kld > 0.0)));
}
