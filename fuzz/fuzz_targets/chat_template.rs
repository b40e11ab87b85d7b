//! Chat templates as they come from a model file's `tokenizer.chat_template`:
//! compiled and rendered (trusted and untrusted) with fuel and an output cap, so a
//! hostile template can neither loop nor grow without bound.
//!
//! Input: the template source, a NUL byte, then message content (the three messages
//! take it in turns, split at further NULs).
#![no_main]
use fastkv::tokenizer::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

// Shared state is loaded before the first input, so no input pays for it.
fuzz_target!(init: {
    fastkv_fuzz::smollm2();
}, |data: &[u8]| {
    let (source, content) = fastkv_fuzz::split_nul(data);
    let (Ok(source), Ok(content)) = (std::str::from_utf8(source), std::str::from_utf8(content))
    else {
        return;
    };
    let Ok(template) = ChatTemplate::new(source, "<|im_start|>", "<|im_end|>") else {
        return;
    };
    let mut parts = content.split('\0');
    let mut next = || parts.next().unwrap_or("").to_string();
    let messages = [
        ChatMessage::system(next()),
        ChatMessage::user(next()),
        ChatMessage::assistant(next()),
        ChatMessage::user(next()),
    ];
    for open in [false, true] {
        if let Ok(out) = template.render(&messages, open) {
            // The cap: 1 MiB plus 4 bytes per content byte (src/tokenizer/chat.rs).
            let content_bytes: usize = messages.iter().map(|m| m.content.len()).sum();
            assert!(out.len() <= (1 << 20) + 4 * content_bytes, "output cap");
        }
    }
    let tok = &fastkv_fuzz::smollm2().tokenizer;
    if let Ok((rendered, ranges)) = template.render_untrusted(tok, &messages, true) {
        let mut end = 0;
        for r in &ranges {
            assert!(r.start >= end && r.end <= rendered.len(), "ranges sorted, inside");
            assert!(rendered.is_char_boundary(r.start) && rendered.is_char_boundary(r.end));
            end = r.end;
        }
        let ids = tok.encode_chat_content(&rendered, &ranges);
        assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
    }
});
