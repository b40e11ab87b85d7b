//! KV eviction on the real models: keep 1.0 changes nothing, evicting equals masking,
//! compression keeps the asked fraction, Gemma's local layers are never touched, and
//! saved contexts restore bit-exactly.
mod common;

use common::*;
use fastkv::kv::{EvictMode, KvCache, Level, Policy};
use fastkv::model::Model;
use fastkv::session::{EvictionConfig, Session, TeacherPrompt};
use fastkv::tokenizer::{ChatTemplate, Tokenizer};

struct Fixture {
    name: &'static str,
    model: Model,
    tok: Tokenizer,
    /// BOS (the protected prefix), a context and its continuation, from WikiText.
    prefix: Vec<u32>,
    context: Vec<u32>,
    cont: Vec<u32>,
}

fn fixture(name: &'static str, n_context: usize, n_cont: usize) -> Option<Fixture> {
    let path = model(name)?;
    let text = wiki_text()?;
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let ids = tok.encode(&text[..text.len().min(200_000)], false, false);
    assert!(ids.len() > 1000 + n_context + n_cont);
    let context = ids[1000..1000 + n_context].to_vec();
    let cont = ids[1000 + n_context..1000 + n_context + n_cont].to_vec();
    let prefix = tok.bos().into_iter().collect();
    Some(Fixture {
        name,
        model,
        tok,
        prefix,
        context,
        cont,
    })
}

impl Fixture {
    /// A session with `cfg`, or None when it needs gates that are not shipped.
    fn try_session(&self, cfg: EvictionConfig) -> Option<Session<'_>> {
        let mut s = Session::new(&self.model, 8192);
        if cfg.policy == Policy::Gated {
            s.set_gates(shipped_gates(self.name, &self.model)?);
        }
        if cfg.policy == Policy::KvZip {
            let template = ChatTemplate::from_gguf(self.model.file(), &self.tok)
                .unwrap_or_else(ChatTemplate::plain);
            s.set_teacher_prompt(TeacherPrompt::new(&self.tok, &template).unwrap());
        }
        s.set_eviction(cfg).unwrap();
        Some(s)
    }

    fn session(&self, cfg: EvictionConfig) -> Session<'_> {
        self.try_session(cfg).expect("no gates needed")
    }

    /// Compress the context with `cfg`, then the logits of every continuation token
    /// (None: the policy needs gates that are not shipped).
    fn try_run(&self, cfg: EvictionConfig) -> Option<(Vec<f32>, Session<'_>)> {
        let mut s = self.try_session(cfg)?;
        s.feed_context(&self.prefix, &self.context).unwrap();
        let logits = s.feed_all_logits(&self.cont).unwrap();
        Some((logits, s))
    }
}

fn list_lens(cache: &KvCache, il: usize) -> Vec<usize> {
    cache.layers[il].heads.iter().map(|h| h.len()).collect()
}

fn keep_one_is_the_full_cache(name: &'static str) {
    let Some(f) = fixture(name, 300, 24) else {
        return;
    };
    // The foundation path: no eviction settings at all, the same feeding schedule.
    let mut plain = Session::new(&f.model, 8192);
    plain.feed(&f.prefix).unwrap();
    plain.feed(&f.context).unwrap();
    let want = plain.feed_all_logits(&f.cont).unwrap();
    for policy in Policy::ALL {
        let Some((got, s)) = f.try_run(EvictionConfig::new(policy, 1.0)) else {
            continue;
        };
        assert!(
            got == want,
            "{name}: {policy} at keep 1.0 changed the logits"
        );
        if policy == Policy::Gated {
            // The gates score every pair (that is their job), and change nothing else.
            let strip = |c: &KvCache| {
                let mut c = c.clone();
                c.layers
                    .iter_mut()
                    .flat_map(|l| l.heads.iter_mut())
                    .for_each(|h| h.score.clear());
                c
            };
            assert!(strip(s.cache()) == strip(plain.cache()));
            // Every context pair has a gate score (the continuation's last tokens may
            // still wait in the gates' decode buffer).
            let n = (f.prefix.len() + f.context.len()) as u32;
            for h in s.cache().evictable_heads() {
                let scored = h.pos.iter().zip(&h.score).filter(|(&p, _)| p < n);
                assert!(scored.clone().count() == n as usize);
                assert!(scored.into_iter().all(|(_, &x)| x > 0.0 && x < 1.0));
            }
            continue;
        }
        assert!(
            s.cache() == plain.cache(),
            "{name}: {policy} changed the cache"
        );
    }
}

#[test]
fn keep_one_is_the_full_cache_smollm2() {
    keep_one_is_the_full_cache(SMOLLM2);
}

#[test]
fn keep_one_is_the_full_cache_gemma3() {
    keep_one_is_the_full_cache(GEMMA3);
}

/// The same pairs evicted (random scores do not depend on the arithmetic) or masked
/// out of a full cache give the same logits. With prefill steps under 64 tokens
/// every query uses the one-query kernel, which visits the kept keys in the same
/// order either way: the logits are bit-identical. With 512-token steps the tiled
/// kernel groups keys into tiles differently, so they agree to float rounding.
fn evicting_equals_masking(name: &'static str) {
    let Some(f) = fixture(name, 1200, 32) else {
        return;
    };
    for chunk in [48, 512] {
        let run = |mode| {
            let mut s = f.session(EvictionConfig {
                mode,
                seed: 11,
                ..EvictionConfig::new(Policy::Random, 0.3)
            });
            s.set_prefill_chunk(chunk);
            s.feed_context(&f.prefix, &f.context).unwrap();
            (s.feed_all_logits(&f.cont).unwrap(), s)
        };
        let (evicted, se) = run(EvictMode::Compact);
        let (masked, sm) = run(EvictMode::Mask);
        // The kept pairs are the same ones; only eviction frees memory.
        for (le, lm) in se.cache().layers.iter().zip(&sm.cache().layers) {
            for (he, hm) in le.heads.iter().zip(&lm.heads) {
                let unmasked: Vec<u32> = (0..hm.len())
                    .filter(|&j| !hm.is_masked(j))
                    .map(|j| hm.pos[j])
                    .collect();
                assert!(he.pos == unmasked, "{name}: different pairs kept");
            }
        }
        let (held, unfreed) = (se.cache().evictable_bytes(), sm.cache().evictable_bytes());
        assert!(held * 2 < unfreed, "{name}: eviction freed too little");
        let (same_top1, kl) = compare_logits(&masked, &evicted, f.model.config.n_vocab);
        eprintln!("{name}, prefill steps of {chunk}: top-1 agreement {same_top1}, KL {kl:e}");
        if chunk < 64 {
            assert!(evicted == masked, "{name}: evicting and masking differ");
        } else {
            // Rounding alone moves the logits this much: the full cache, run in
            // steps of 48 and of 512.
            let full = |chunk| {
                let mut s = Session::new(&f.model, 8192);
                s.set_prefill_chunk(chunk);
                s.feed(&f.prefix).unwrap();
                s.feed(&f.context).unwrap();
                s.feed_all_logits(&f.cont).unwrap()
            };
            let (_, floor) = compare_logits(&full(48), &full(512), f.model.config.n_vocab);
            eprintln!("{name}: rounding noise floor KL {floor:e}");
            assert!(
                kl < 4.0 * floor.max(1e-4),
                "{name}: top-1 {same_top1}, KL {kl}"
            );
        }
    }
    // And eviction changed the result: the test would notice a no-op.
    let mut full = Session::new(&f.model, 8192);
    full.feed(&f.prefix).unwrap();
    full.feed(&f.context).unwrap();
    let full_logits = full.feed_all_logits(&f.cont).unwrap();
    let mut s = f.session(EvictionConfig::new(Policy::Random, 0.3));
    s.feed_context(&f.prefix, &f.context).unwrap();
    assert!(full_logits != s.feed_all_logits(&f.cont).unwrap());
}

#[test]
fn evicting_equals_masking_smollm2() {
    evicting_equals_masking(SMOLLM2);
}

#[test]
fn evicting_equals_masking_gemma3() {
    evicting_equals_masking(GEMMA3);
}

/// A 4096-token context at keep 0.3: evictable layers hold 0.3 of the full cache
/// (plus the protected prefix), within 2%, with non-uniform heads under the global
/// threshold.
#[test]
fn compression_keeps_the_asked_fraction() {
    let Some(f) = fixture(SMOLLM2, 4096, 8) else {
        return;
    };
    for (policy, level) in [(Policy::H2o, Level::Global), (Policy::SnapKv, Level::Head)] {
        let cfg = EvictionConfig {
            level,
            ..EvictionConfig::new(policy, 0.3)
        };
        let mut s = f.session(cfg);
        let (_, report) = s.feed_context(&f.prefix, &f.context).unwrap();
        let cache = s.cache();
        let lists = cache.layers.len() * cache.shape.n_head_kv;
        let want = (0.3 * f.context.len() as f64 + f.prefix.len() as f64)
            * (lists * cache.shape.entry_bytes()) as f64;
        let got = cache.evictable_bytes() as f64;
        assert!(
            (got / want - 1.0).abs() < 0.02,
            "{policy}: {got} bytes held, {want} expected"
        );
        assert_eq!(report.kv_bytes, cache.bytes());
        assert_eq!(
            report.kv_bytes_full,
            (f.prefix.len() + f.context.len()) * lists * cache.shape.entry_bytes()
        );
        let lens: Vec<usize> = (0..cache.layers.len())
            .flat_map(|il| list_lens(cache, il))
            .collect();
        let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
        match level {
            Level::Global => assert!(hi > &(lo * 2), "{policy}: lists {lo}..{hi} look uniform"),
            _ => assert!(hi - lo <= 8, "{policy}: per-head lists {lo}..{hi} differ"),
        }
        // Every list keeps the prefix and the recent window.
        let n = f.prefix.len() + f.context.len();
        for h in cache.layers.iter().flat_map(|l| &l.heads) {
            assert_eq!(h.pos[0], 0);
            assert!(h
                .pos
                .ends_with(&((n - report.window) as u32..n as u32).collect::<Vec<_>>()));
        }
    }
}

/// Gemma 3: KVzip shrinks only the 3 global layers; the local (sliding-window)
/// layers are exactly those of a full-cache run, and the global ones a subset of them
/// (the teacher's repeat pass leaves no trace).
#[test]
fn gemma3_kvzip_shrinks_only_global_layers() {
    let Some(f) = fixture(GEMMA3, 2500, 8) else {
        return;
    };
    let mut s = f.session(EvictionConfig::new(Policy::KvZip, 0.3));
    let (_, report) = s.feed_context(&f.prefix, &f.context).unwrap();
    assert!(report.teacher_ms > 0.0);
    let mut full = Session::new(&f.model, 8192);
    full.feed(&f.prefix).unwrap();
    full.feed(&f.context).unwrap();
    let (ours, theirs) = (s.cache(), full.cache());
    let mut n_global = 0;
    for (il, (lo, lf)) in ours.layers.iter().zip(&theirs.layers).enumerate() {
        if !lo.is_evictable() {
            assert!(lo.heads == lf.heads, "local layer {il} changed");
            continue;
        }
        n_global += 1;
        for (ho, hf) in lo.heads.iter().zip(&lf.heads) {
            assert!(ho.len() < hf.len(), "global layer {il} was not compressed");
            for (j, &p) in ho.pos.iter().enumerate() {
                let i = p as usize; // full lists hold every position
                assert_eq!(hf.pos[i], p);
                assert_eq!(ho.k[j * 256..(j + 1) * 256], hf.k[i * 256..(i + 1) * 256]);
            }
            assert!(ho.score.iter().all(|s| (0.0..=1.0).contains(s)));
        }
    }
    assert_eq!(n_global, 3);
    let evictable_full = theirs.evictable_entries();
    let kept = ours.evictable_entries() as f64 / evictable_full as f64;
    assert!((kept - 0.3).abs() < 0.01, "kept {kept}");
}

/// A compressed context saved and loaded gives bit-identical logits.
#[test]
fn saved_context_restores_bit_exactly() {
    let Some(f) = fixture(SMOLLM2, 700, 16) else {
        return;
    };
    let mut s = f.session(EvictionConfig::new(Policy::SnapKv, 0.3));
    s.feed_context(&f.prefix, &f.context).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctx.fkv");
    s.save_context(&path).unwrap();
    let want = s.feed_all_logits(&f.cont).unwrap();

    let mut restored = Session::new(&f.model, 8192);
    restored.load_context(&path).unwrap();
    assert_eq!(restored.tokens().len(), f.prefix.len() + f.context.len());
    let got = restored.feed_all_logits(&f.cont).unwrap();
    assert!(got == want, "restored context gives different logits");

    // A session too small for it is refused.
    let mut small = Session::new(&f.model, 256);
    assert!(small.load_context(&path).is_err());
}

/// Under a decode budget the evictable lists come back to B pairs on average every
/// 128 tokens, never losing the first 4 tokens nor the last 128.
#[test]
fn decode_budget_holds() {
    let Some(f) = fixture(SMOLLM2, 200, 0) else {
        return;
    };
    let budget = 150;
    let cfg = EvictionConfig {
        budget: Some(budget),
        ..EvictionConfig::new(Policy::H2o, 1.0)
    };
    let mut s = f.session(cfg);
    s.feed(&f.prefix).unwrap();
    let mut logits = s.feed(&f.context).unwrap();
    let lists = s.cache().layers.len() * s.cache().shape.n_head_kv;
    for step in 0..300 {
        let next = argmax(&logits) as u32;
        logits = s.feed(&[next]).unwrap();
        let n = s.cache().n_seen();
        // At most the budget right after an enforcement, and fewer than 128 more
        // tokens per list in between.
        let held = s.cache().evictable_entries();
        assert!(
            held < (budget + 128) * lists,
            "{held} pairs held at {n} (step {step})"
        );
        for h in s.cache().layers.iter().flat_map(|l| &l.heads) {
            assert_eq!(&h.pos[..4], &[0, 1, 2, 3]);
            let recent = n.saturating_sub(128) as u32;
            assert_eq!(
                h.pos.iter().filter(|&&p| p >= recent).count(),
                n - recent as usize
            );
        }
    }
    assert!(s.cache().evictable_entries() < s.tokens().len() * lists / 2);
}

/// StreamingLLM keeps the first tokens and one recent window, whatever the chunking.
#[test]
fn streaming_keeps_sinks_and_one_recent_window() {
    let Some(f) = fixture(SMOLLM2, 600, 0) else {
        return;
    };
    let mut s = f.session(EvictionConfig::new(Policy::Streaming, 0.3));
    s.set_prefill_chunk(100);
    s.feed_context(&f.prefix, &f.context).unwrap();
    let n = f.prefix.len() + f.context.len();
    // Positions 0..4 are sinks (the BOS prefix and the first context tokens).
    let judged = n - 4;
    let recent = (0.3 * judged as f64).floor() as usize;
    let want: Vec<u32> = (0..4).chain((n - recent) as u32..n as u32).collect();
    for h in s.cache().layers.iter().flat_map(|l| &l.heads) {
        assert!(h.pos == want, "kept {:?}", &h.pos[..8.min(h.len())]);
    }
}

/// With prefill steps shorter than the window, each context token is judged once
/// (when it leaves the window), the window stays whole, and the keep ratio holds at
/// every level, with and without a window.
#[test]
fn chunked_prefill_judges_each_token_once() {
    let Some(f) = fixture(SMOLLM2, 600, 0) else {
        return;
    };
    let n = f.prefix.len() + f.context.len();
    let judged = (n - 4) as f64;
    for (level, window) in [
        (Level::Global, Some(150)),
        (Level::Layer, Some(150)),
        (Level::Head, Some(0)),
    ] {
        let cfg = EvictionConfig {
            level,
            window,
            seed: 3,
            ..EvictionConfig::new(Policy::Random, 0.3)
        };
        let mut s = f.session(cfg);
        s.set_prefill_chunk(48);
        let (_, report) = s.feed_context(&f.prefix, &f.context).unwrap();
        assert_eq!(report.window, window.unwrap());
        let cache = s.cache();
        let lists = cache.layers.len() * cache.shape.n_head_kv;
        let kept = (cache.evictable_entries() - 4 * lists) as f64 / lists as f64;
        // One rounding per step and group at most.
        let steps = (f.context.len() / 48 + 1) as f64;
        assert!(
            (kept - 0.3 * judged).abs() <= steps,
            "{level}: kept {kept} of {judged} per list"
        );
        for (il, l) in cache.layers.iter().enumerate() {
            let per_layer: usize = l.heads.iter().map(|h| h.len()).sum();
            if level != Level::Global {
                let want = (4.0 + 0.3 * judged) * l.heads.len() as f64;
                assert!(
                    (per_layer as f64 - want).abs() <= steps * l.heads.len() as f64,
                    "layer {il}"
                );
            }
            for h in &l.heads {
                let w = window.unwrap();
                assert!(h
                    .pos
                    .ends_with(&((n - w) as u32..n as u32).collect::<Vec<_>>()));
                assert_eq!(&h.pos[..4], &[0, 1, 2, 3]);
            }
        }
    }
}
