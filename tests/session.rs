//! Sessions reuse what their cache holds: a chat turn runs only its new tokens, and
//! the result is bit-identical to running the whole conversation from scratch.
mod common;

use common::*;
use fastkv::model::Model;
use fastkv::session::Session;
use fastkv::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use ggml_sys::reference::{RefContext, RefContextParams, RefModel};

/// A chat turn rendered with the model's template gets the same greedy reply from
/// fastkv as from llama.cpp, token for token, at least as far as llama.cpp's own two
/// attention paths agree (its single-token path accumulates values in f16, fastkv in
/// f32, so long greedy runs may part at a near-tie; see tests/forward.rs).
#[test]
fn chat_reply_matches_llama_cpp() {
    let Some(path) = model(SMOLLM2) else { return };
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let template = ChatTemplate::from_gguf(model.file(), &tok).expect("SmolLM2 has a template");
    let messages = [ChatMessage::user("What is the capital of France?")];
    let prompt = tok.encode(&template.render(&messages, true).unwrap(), false, true);

    let mut session = Session::new(&model, 1024);
    let mut logits = session.feed(&prompt).unwrap();
    let mut ours = Vec::new();
    while ours.len() < 32 {
        let next = argmax(&logits) as u32;
        if tok.is_eog(next) {
            break;
        }
        ours.push(next as i32);
        logits = session.feed(&[next]).unwrap();
    }
    let reference = RefModel::load(&path, false).unwrap();
    let prompt_i32: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let greedy = |flash_attn| {
        let params = RefContextParams {
            flash_attn,
            ..Default::default()
        };
        let mut ctx = RefContext::new(&reference, params).unwrap();
        ctx.generate_greedy(&prompt_i32, 32).unwrap()
    };
    let (theirs, other) = (greedy(true), greedy(false));
    let prefix = |a: &[i32], b: &[i32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let (ours_n, other_n) = (prefix(&ours, &theirs), prefix(&other, &theirs));
    eprintln!("fastkv follows llama.cpp for {ours_n} tokens, llama.cpp's other path for {other_n}");
    assert!(
        ours_n >= other_n.min(theirs.len()) && ours_n >= 8,
        "{ours:?}\n{theirs:?}"
    );
}

#[test]
fn second_chat_turn_reuses_the_cache() {
    let Some(path) = model(SMOLLM2) else { return };
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let template = ChatTemplate::from_gguf(model.file(), &tok).expect("SmolLM2 has a template");
    let mut messages = vec![ChatMessage::user("What is the capital of France?")];
    let first = tok.encode(&template.render(&messages, true).unwrap(), false, true);

    let mut session = Session::new(&model, 1024);
    let (mut logits, fed) = session.feed_reusing_prefix(&first).unwrap();
    assert_eq!(fed, first.len());
    let mut reply = Vec::new();
    for _ in 0..12 {
        let next = argmax(&logits) as u32;
        if tok.is_eog(next) {
            break;
        }
        reply.push(next);
        logits = session.feed(&[next]).unwrap();
    }
    messages.push(ChatMessage::assistant(tok.decode(&reply, false)));
    messages.push(ChatMessage::user("And of Italy?"));
    let second = tok.encode(&template.render(&messages, true).unwrap(), false, true);
    let (logits, fed) = session.feed_reusing_prefix(&second).unwrap();
    assert!(
        fed < second.len() / 2,
        "ran {fed} of {} tokens again",
        second.len()
    );
    assert_eq!(session.tokens(), &second[..]);

    let mut fresh = Session::new(&model, 1024);
    let want = fresh.feed(&second).unwrap();
    assert_eq!(logits, want, "reusing the cache changed the result");
}

#[test]
fn truncating_the_cache_forgets_the_tail() {
    let Some(path) = model(GEMMA3) else { return };
    let model = Model::load(&path).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| 1000 + i * 13).collect();
    let mut a = Session::new(&model, 256);
    a.feed(&tokens).unwrap();
    // Replace the last 10 tokens: the result must equal a run of the new text alone.
    let mut other = tokens[..30].to_vec();
    other.extend((0..10).map(|i| 5000 + i));
    let (got, fed) = a.feed_reusing_prefix(&other).unwrap();
    assert_eq!(fed, 10);
    let mut b = Session::new(&model, 256);
    assert_eq!(got, b.feed(&other).unwrap());
}
