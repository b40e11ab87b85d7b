//! The forward pass agrees with llama.cpp (built from the same ggml) on real models.
mod common;

use common::*;
use fastkv::model::{Logits, Model};
use ggml_sys::reference::{RefContext, RefContextParams, RefModel};

/// On the first 512 tokens of wiki.test.raw, top-1 agrees at >= 99% of positions and
/// the mean KL divergence is <= 1e-3 nats.
fn agrees_with_llama_cpp(name: &str) {
    let (Some(path), Some(text)) = (model(name), wiki_text()) else { return };
    let reference = RefModel::load(&path, false).unwrap();
    let mut tokens = reference.tokenize(&text[..20_000], true, false);
    tokens.truncate(512);
    let mut ctx = RefContext::new(&reference, RefContextParams { n_ctx: 1024, ..Default::default() }).unwrap();
    let want = ctx.eval(&tokens, true).unwrap();

    let model = Model::load(&path).unwrap();
    let mut cache = model.new_cache();
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let got = model.forward(&ids, &mut cache, Logits::All, 1024).unwrap();
    let (top1, kl) = compare_logits(&want, &got, model.config.n_vocab);
    eprintln!("{name}: top-1 agreement {:.4}, mean KL {kl:.2e}", top1);
    assert!(top1 >= 0.99, "top-1 agreement {top1} < 0.99");
    assert!(kl <= 1e-3, "mean KL {kl} > 1e-3");
}

#[test]
fn smollm2_logits_match_llama_cpp() {
    agrees_with_llama_cpp(SMOLLM2);
}

#[test]
fn gemma3_logits_match_llama_cpp() {
    agrees_with_llama_cpp(GEMMA3);
}
