//! Sessions reuse what their cache holds: a chat turn runs only its new tokens, and
//! the result is bit-identical to running the whole conversation from scratch.
mod common;

use common::*;
use fastkv::kv::Policy;
use fastkv::model::Model;
use fastkv::session::{EvictionConfig, Session};
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

/// Sessions decoding together in one forward pass (a server's slots) get exactly
/// the logits, tokens and cache they would get decoding alone, with and without a
/// decode budget evicting as they go.
#[test]
fn batched_decode_matches_decoding_alone() {
    for name in [SMOLLM2, GEMMA3] {
        let Some(path) = model(name) else { return };
        let model = Model::load(&path).unwrap();
        for budget in [None, Some(132)] {
            let prompts: Vec<Vec<u32>> = (0..3u32)
                .map(|s| {
                    (0..100 + 17 * s)
                        .map(|i| 300 + (i * 37 + s * 101) % 9000)
                        .collect()
                })
                .collect();
            let new_session = |p: &[u32]| {
                let mut s = Session::new(&model, 512);
                if let Some(b) = budget {
                    let mut cfg = EvictionConfig::new(Policy::H2o, 1.0);
                    cfg.budget = Some(b);
                    s.set_eviction(cfg).unwrap();
                }
                let logits = s.feed(p).unwrap();
                (s, logits)
            };
            let (mut alone, mut together): (Vec<_>, Vec<_>) = prompts
                .iter()
                .map(|p| (new_session(p), new_session(p)))
                .unzip();
            // With a budget, run past the second enforcement (every 128 tokens).
            let steps = if budget.is_some() { 160 } else { 40 };
            for step in 0..steps {
                let next: Vec<u32> = alone.iter().map(|(_, l)| argmax(l) as u32).collect();
                for ((s, l), &t) in alone.iter_mut().zip(&next) {
                    *l = s.feed(&[t]).unwrap();
                }
                let mut batch: Vec<(&mut Session, &[u32])> = together
                    .iter_mut()
                    .zip(&next)
                    .map(|((s, _), t)| (s, std::slice::from_ref(t)))
                    .collect();
                let out = Session::feed_batch(&mut batch).unwrap();
                for (i, ((a, la), (b, _))) in alone.iter().zip(&out).zip(&together).enumerate() {
                    assert_eq!(
                        la, &a.1,
                        "{name}, budget {budget:?}, step {step}, sequence {i}"
                    );
                    assert_eq!(a.0.tokens(), b.tokens());
                    assert_eq!(a.0.kv_bytes(), b.kv_bytes());
                }
                for ((_, l), o) in together.iter_mut().zip(out) {
                    *l = o;
                }
            }
            if budget.is_some() {
                for (s, _) in &alone {
                    assert!(s.kv_bytes() < s.cache().full_bytes(), "the budget evicted");
                }
            }
        }
    }
}

/// A server step mixes a prompt chunk for one session with a decode token for
/// another: both end as if fed alone.
#[test]
fn a_prompt_chunk_and_a_decode_token_share_a_batch() {
    let Some(path) = model(SMOLLM2) else { return };
    let model = Model::load(&path).unwrap();
    let first: Vec<u32> = (0..50).map(|i| 400 + i * 7).collect();
    let second: Vec<u32> = (0..90).map(|i| 900 + i * 11).collect();
    let mut a_alone = Session::new(&model, 512);
    let mut a_batch = Session::new(&model, 512);
    let next = argmax(&a_alone.feed(&first).unwrap()) as u32;
    a_batch.feed(&first).unwrap();
    let want_a = a_alone.feed(&[next]).unwrap();
    let mut b_alone = Session::new(&model, 512);
    let want_b = b_alone.feed(&second).unwrap();

    let mut b_batch = Session::new(&model, 512);
    let out = Session::feed_batch(&mut [(&mut a_batch, &[next][..]), (&mut b_batch, &second[..])])
        .unwrap();
    assert_eq!(out[0], want_a);
    assert_eq!(out[1], want_b);
    assert_eq!(b_batch.tokens(), &second[..]);
}
