//! The server's request parsing, from a JSON body to what generation runs with: the
//! body parsed into a chat, text-completion, tokenize or detokenize request, its
//! settings validated into sampler parameters, the messages rendered with SmolLM2's
//! template as untrusted content and tokenized, and one token sampled with the
//! resulting sampler.
//!
//! Input: one byte choosing the route, then the body.
#![no_main]
use fastkv::sampling::Sampler;
use fastkv::server::api::{
    parse_body, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
};
use libfuzzer_sys::fuzz_target;

fn sample_once(params: fastkv::sampling::SamplerParams) {
    let mut sampler = Sampler::new(params);
    let mut logits: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
    for t in [3u32, 7, 3, 250] {
        sampler.accept(t);
    }
    let t = sampler.sample(&mut logits);
    assert!(t < 256, "sampled token out of range");
}

// Shared state is loaded before the first input, so no input pays for it.
fuzz_target!(init: {
    fastkv_fuzz::smollm2();
}, |data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let reference = fastkv_fuzz::smollm2();
    let tok = &reference.tokenizer;
    match route % 4 {
        0 => {
            let Ok(req) = parse_body::<ChatRequest>(body) else {
                return;
            };
            let Ok(params) = req.common.validate(42) else {
                return;
            };
            let Ok(messages) = req.chat_messages() else {
                return;
            };
            let template = reference.template.as_ref().expect("SmolLM2 has a template");
            if let Ok((rendered, ranges)) = template.render_untrusted(tok, &messages, true) {
                let ids = tok.encode_chat_content(&rendered, &ranges);
                assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
            }
            sample_once(params.sampler);
        }
        1 => {
            let Ok(req) = parse_body::<CompletionRequest>(body) else {
                return;
            };
            let Ok(params) = req.common.validate(42) else {
                return;
            };
            if let Ok(prompt) = req.prompt_text() {
                let _ = tok.encode(&prompt, true, false);
            }
            sample_once(params.sampler);
        }
        2 => {
            if let Ok(req) = parse_body::<TokenizeRequest>(body) {
                let _ = tok.encode(&req.content, req.add_special, true);
            }
        }
        _ => {
            if let Ok(req) = parse_body::<DetokenizeRequest>(body) {
                let ids: Vec<u32> = req
                    .tokens
                    .iter()
                    .filter_map(|&t| u32::try_from(t).ok())
                    .filter(|&t| (t as usize) < tok.n_vocab())
                    .collect();
                let _ = tok.decode(&ids, false);
            }
        }
    }
});
