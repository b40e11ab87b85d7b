//! Perplexity on wiki.test.raw (-c 512, 20 chunks) within 0.5% of llama.cpp's value
//! computed the same way (llama-perplexity's method, `fastkv::eval::perplexity`).
mod common;

use common::*;
use fastkv::eval::perplexity;
use fastkv::model::Model;
use fastkv::session::Session;
use fastkv::tokenizer::Tokenizer;
use ggml_sys::reference::{RefContext, RefContextParams, RefModel};

const N_CTX: usize = 512;
const CHUNKS: usize = 20;

fn perplexity_matches_llama_cpp(name: &str) {
    let (Some(path), Some(text)) = (model(name), wiki_text()) else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(model.file()).unwrap();
    // Enough text for 20 chunks (about 3 characters a token on wikitext).
    let text = &text[..text.char_indices().nth(N_CTX * CHUNKS * 6).unwrap().0];
    let tokens = tokenizer.encode(text, tokenizer.add_bos(), false);
    let bos = tokenizer.bos().filter(|_| tokenizer.add_bos());
    let n_vocab = model.config.n_vocab;

    let mut session = Session::new(&model, N_CTX);
    let ours = perplexity(&tokens, N_CTX, Some(CHUNKS), bos, n_vocab, |_, chunk| {
        session.clear();
        session.feed_all_logits(chunk)
    })
    .unwrap();

    let reference = RefModel::load(&path, false).unwrap();
    let params = RefContextParams {
        n_ctx: N_CTX as u32,
        ..Default::default()
    };
    let mut ctx = RefContext::new(&reference, params).unwrap();
    let theirs = perplexity(&tokens, N_CTX, Some(CHUNKS), bos, n_vocab, |_, chunk| {
        ctx.clear();
        let ids: Vec<i32> = chunk.iter().map(|&t| t as i32).collect();
        Ok(ctx.eval(&ids, true).unwrap())
    })
    .unwrap();

    assert_eq!(ours.n_chunks, CHUNKS);
    let rel = (ours.ppl - theirs.ppl).abs() / theirs.ppl;
    eprintln!(
        "{name}: PPL fastkv {:.4} +/- {:.4}, llama.cpp {:.4} +/- {:.4} (difference {:.3}%)",
        ours.ppl,
        ours.ppl_err,
        theirs.ppl,
        theirs.ppl_err,
        rel * 100.0
    );
    assert!(rel <= 0.005, "perplexities differ by {:.3}%", rel * 100.0);
}

#[test]
fn smollm2_perplexity_matches_llama_cpp() {
    perplexity_matches_llama_cpp(SMOLLM2);
}

#[test]
fn gemma3_perplexity_matches_llama_cpp() {
    perplexity_matches_llama_cpp(GEMMA3);
}
