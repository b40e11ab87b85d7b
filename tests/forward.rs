//! The forward pass agrees with llama.cpp (built from the same ggml) on real models.
//!
//! llama.cpp has two CPU attention paths: flash attention (its default, used as the
//! reference here) and the plain one. On these small quantized models the two
//! disagree with each other by a measurable amount (mean KL about 3.6e-3 nats on
//! SmolLM2 and 6e-3 on Gemma 3 over 512 wikitext tokens; greedy generation from
//! "The history of the printing press" parts after 2 tokens on SmolLM2, 47 on Gemma),
//! because these models amplify rounding differences. So every test measures that
//! implementation noise of the reference itself and asks fastkv to be at least as
//! close to llama.cpp's default as llama.cpp's other path is, and within the fixed
//! bars (KL <= 1e-3, top-1 >= 99%) wherever the reference's own noise allows them.
mod common;

use common::*;
use fastkv::model::{Logits, Model};
use fastkv::session::Session;
use fastkv::tokenizer::Tokenizer;
use ggml_sys::reference::{RefContext, RefContextParams, RefModel};

fn llama_cpp_logits(reference: &RefModel, tokens: &[i32], flash_attn: bool) -> Vec<f32> {
    let params = RefContextParams {
        n_ctx: 1024,
        flash_attn,
        ..Default::default()
    };
    let mut ctx = RefContext::new(reference, params).unwrap();
    ctx.eval(tokens, true).unwrap()
}

/// On the first 512 tokens of wiki.test.raw: the first position is bit-identical
/// (embedding, norms, quantized products and FFN follow llama.cpp exactly), and
/// top-1 agreement and mean KL are within the bars above.
fn agrees_with_llama_cpp(name: &str) {
    let (Some(path), Some(text)) = (model(name), wiki_text()) else {
        return;
    };
    let reference = RefModel::load(&path, false).unwrap();
    let mut tokens = reference.tokenize(&text[..20_000], true, false);
    tokens.truncate(512);
    assert_eq!(tokens.len(), 512);
    let want = llama_cpp_logits(&reference, &tokens, true);
    let other = llama_cpp_logits(&reference, &tokens, false);

    let model = Model::load(&path).unwrap();
    let n_vocab = model.config.n_vocab;
    let mut cache = model.new_cache();
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let got = model.forward(&ids, &mut cache, Logits::All, 1024).unwrap();

    assert_eq!(
        got[..n_vocab],
        want[..n_vocab],
        "first position must be bit-identical"
    );
    let (top1, kl) = compare_logits(&want, &got, n_vocab);
    let (ref_top1, ref_kl) = compare_logits(&want, &other, n_vocab);
    eprintln!(
        "{name}: fastkv vs llama.cpp: top-1 {top1:.4}, mean KL {kl:.2e}; \
         llama.cpp's two attention paths: top-1 {ref_top1:.4}, mean KL {ref_kl:.2e}"
    );
    assert!(
        top1 >= 0.99f64.min(ref_top1),
        "top-1 agreement {top1} too low"
    );
    assert!(kl <= 1e-3f64.max(ref_kl), "mean KL {kl} too high");
}

#[test]
fn smollm2_logits_match_llama_cpp() {
    agrees_with_llama_cpp(SMOLLM2);
}

#[test]
fn gemma3_logits_match_llama_cpp() {
    agrees_with_llama_cpp(GEMMA3);
}

fn llama_cpp_greedy(reference: &RefModel, prompt: &[i32], flash_attn: bool) -> Vec<u32> {
    let params = RefContextParams {
        flash_attn,
        ..Default::default()
    };
    let mut ctx = RefContext::new(reference, params).unwrap();
    let out = ctx.generate_greedy(prompt, 64).unwrap();
    out.iter().map(|&t| t as u32).collect()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Greedy generation: 64 tokens from "The history of the printing press" follow
/// llama.cpp's greedy output token for token, at least as far as llama.cpp's two
/// attention paths agree with each other.
fn greedy_matches_llama_cpp(name: &str) {
    let Some(path) = model(name) else { return };
    let text = "The history of the printing press";
    let reference = RefModel::load(&path, false).unwrap();
    let prompt = reference.tokenize(text, true, true);
    let want = llama_cpp_greedy(&reference, &prompt, true);
    let other = llama_cpp_greedy(&reference, &prompt, false);

    let model = Model::load(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(model.file()).unwrap();
    let ids = tokenizer.encode(text, true, true);
    let prompt_u32: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
    assert_eq!(ids, prompt_u32, "prompt tokens differ");
    let mut session = Session::new(&model, 2048);
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
    let ours = common_prefix(&got, &want);
    let theirs = common_prefix(&other, &want);
    eprintln!(
        "{name}: fastkv follows llama.cpp for {ours} of {} tokens (llama.cpp's two attention paths: {theirs})\n\
         fastkv:    {}\nllama.cpp: {}",
        want.len(),
        tokenizer.decode(&got, false),
        tokenizer.decode(&want, false)
    );
    assert!(
        ours >= theirs.min(want.len()),
        "fastkv parts from llama.cpp after {ours} tokens"
    );
    assert!(
        ours >= 16,
        "fastkv parts from llama.cpp after only {ours} tokens"
    );
}

#[test]
fn smollm2_greedy_generation_matches_llama_cpp() {
    greedy_matches_llama_cpp(SMOLLM2);
}

#[test]
fn gemma3_greedy_generation_matches_llama_cpp() {
    greedy_matches_llama_cpp(GEMMA3);
}
