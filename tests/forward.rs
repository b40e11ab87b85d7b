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

/// Greedy generation: 64 tokens from "The history of the printing press" equal
/// llama.cpp's greedy output token for token.
fn greedy_matches_llama_cpp(name: &str) {
    let Some(path) = model(name) else { return };
    let reference = RefModel::load(&path, false).unwrap();
    let prompt = reference.tokenize("The history of the printing press", true, true);
    let mut ctx = RefContext::new(&reference, RefContextParams::default()).unwrap();
    let want: Vec<u32> = ctx.generate_greedy(&prompt, 64).unwrap().iter().map(|&t| t as u32).collect();

    let model = Model::load(&path).unwrap();
    let tokenizer = fastkv::tokenizer::Tokenizer::from_gguf(model.file()).unwrap();
    let ids = tokenizer.encode("The history of the printing press", true, true);
    assert_eq!(ids, prompt.iter().map(|&t| t as u32).collect::<Vec<_>>(), "prompt tokens differ");
    let mut session = fastkv::session::Session::new(&model, 2048);
    let mut logits = session.feed(&ids).unwrap();
    let mut got = Vec::new();
    while got.len() < 64 {
        let next = argmax(&logits) as u32;
        if tokenizer.is_eog(next) {
            break;
        }
        got.push(next);
        logits = session.feed(&[next]).unwrap();
    }
    eprintln!("{name}: {}", tokenizer.decode(&got, false));
    let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
    assert_eq!(got, want, "greedy outputs diverge after {same} tokens:\nours: {}\nllama.cpp: {}",
        tokenizer.decode(&got, false), tokenizer.decode(&want, false));
}

#[test]
fn smollm2_greedy_generation_matches_llama_cpp() {
    greedy_matches_llama_cpp(SMOLLM2);
}

#[test]
fn gemma3_greedy_generation_matches_llama_cpp() {
    greedy_matches_llama_cpp(GEMMA3);
}
