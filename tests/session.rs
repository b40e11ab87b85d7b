//! Sessions reuse what their cache holds: a chat turn runs only its new tokens, and
//! the result is bit-identical to running the whole conversation from scratch.
mod common;

use common::*;
use fastkv::model::Model;
use fastkv::session::Session;
use fastkv::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use ggml_sys::reference::{RefContext, RefContextParams, RefModel};

/// A chat turn rendered with the model's template gets the same greedy reply from
/// fastkv as from llama.cpp, token for token.
#[test]
fn chat_reply_matches_llama_cpp() {
    let Some(path) = model(SMOLLM2) else { return };
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let template = ChatTemplate::from_gguf(model.file(), &tok).expect("SmolLM2 has a template");
    let messages = [ChatMessage::user("What is the capital of France?")];
    let prompt = tok.encode(&template.render(&messages, true).unwrap(), false, true);

    let mut session = Session::new(&model, 1024);
    let ours: Vec<i32> = greedy(&mut session, &tok, &prompt, 32)
        .iter()
        .map(|&t| t as i32)
        .collect();
    let reference = RefModel::load(&path, false).unwrap();
    let mut ctx = RefContext::new(&reference, RefContextParams::default()).unwrap();
    let prompt_i32: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let theirs = ctx.generate_greedy(&prompt_i32, 32).unwrap();
    assert_eq!(ours, theirs, "greedy chat reply differs from llama.cpp's");
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

    // The same tokens run the same way (prompt, then the reply one token at a time,
    // then the new turn) in a fresh session give bit-identical logits.
    let mut fresh = Session::new(&model, 1024);
    fresh.feed(&first).unwrap();
    for &t in &reply {
        fresh.feed(&[t]).unwrap();
    }
    let want = fresh.feed(&second[first.len() + reply.len()..]).unwrap();
    assert_eq!(
        fresh.tokens(),
        &second[..],
        "the reply re-tokenizes as generated"
    );
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
