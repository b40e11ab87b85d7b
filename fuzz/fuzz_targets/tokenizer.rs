//! The tokenizers on arbitrary text: SmolLM2's byte-level BPE and Gemma 3's
//! SentencePiece, with control-token parsing on and off, BOS/EOS on and off, chat
//! content ranges, and decoding (whole and streamed).
//!
//! Input: one flag byte (bit 0: Gemma 3, bit 1: parse_special, bit 2: add_special),
//! then the text (invalid UTF-8 replaced, as the server's JSON layer would refuse it).
#![no_main]
use fastkv::tokenizer::Detokenizer;
use libfuzzer_sys::fuzz_target;

// Shared state is loaded before the first input, so no input pays for it.
fuzz_target!(init: {
    fastkv_fuzz::smollm2();
    fastkv_fuzz::gemma3();
}, |data: &[u8]| {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    let reference = if flags & 1 == 0 {
        fastkv_fuzz::smollm2()
    } else {
        fastkv_fuzz::gemma3()
    };
    let tok = &reference.tokenizer;
    let (parse_special, add_special) = (flags & 2 != 0, flags & 4 != 0);
    let text = String::from_utf8_lossy(text);
    let n_vocab = tok.n_vocab();

    let ids = tok.encode(&text, add_special, parse_special);
    assert!(ids.iter().all(|&id| (id as usize) < n_vocab), "id out of range");
    if !text.is_empty() {
        assert!(!ids.is_empty(), "non-empty text gave no tokens");
    }
    let decoded = tok.decode(&ids, false);
    // Byte-level BPE is lossless: plain text (no control tokens read, none added)
    // decodes back to itself, except for the bytes the vocabulary has no token for,
    // which are dropped as llama.cpp drops them (SmolLM2 lacks six control bytes;
    // tests/tokenizer.rs). Dropping is a per-byte matter, so each character alone
    // says what survives of it.
    if flags & 1 == 0 && !parse_special && !add_special && decoded != text {
        let mut buf = [0; 4];
        let expected: String = text
            .chars()
            .map(|c| tok.decode(&tok.encode(c.encode_utf8(&mut buf), false, false), false))
            .collect();
        assert_eq!(decoded, expected, "BPE round trip");
    }

    // Streaming gives the same bytes as decoding at once.
    let mut stream = Detokenizer::new(tok, true);
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&stream.push(id));
    }
    streamed.push_str(&stream.finish());
    let whole = String::from_utf8_lossy(&tok.decode_bytes(&ids, true)).into_owned();
    assert_eq!(streamed, whole, "streamed and whole decoding differ");

    // The text as a chat message's content inside fixed markup: the content's control
    // text stays text, so no control token appears that the markup did not write.
    let open = "<|im_start|>user\n";
    let rendered = format!("{open}{text}<|im_end|>\n");
    let range = open.len()..open.len() + text.len();
    let chat = tok.encode_chat_content(&rendered, &[range]);
    let markup = tok.encode_chat_content(&format!("{open}<|im_end|>\n"), &[]);
    let controls = |ids: &[u32]| ids.iter().filter(|&&id| tok.is_control(id)).count();
    assert_eq!(controls(&chat), controls(&markup), "content became control tokens");
    let _ = tok.has_control_text(&text);
});
