//! The GGUF reader and everything a model file feeds: the metadata and tensor table,
//! the model's configuration and weights, its tokenizer and chat template, and one
//! forward pass (a file that loads must also run).
#![no_main]
use fastkv::gguf::GgufFile;
use fastkv::model::{Logits, Model};
use fastkv::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = fastkv_fuzz::scratch_file("model.gguf", data);
    let Ok(file) = GgufFile::open(&path) else {
        return;
    };
    for key in file.keys() {
        let _ = file.value(key);
        let _ = file.get_str(key);
        let _ = file.get_u64(key);
        let _ = file.get_f32(key);
        let _ = file.get_f32_array(key);
        let _ = file.get_i64_array(key);
    }
    for t in file.tensors() {
        let view = file
            .tensor(&t.name)
            .expect("a listed tensor is found by name");
        assert_eq!(view.data.len(), t.n_bytes);
    }
    let Ok(model) = Model::from_gguf(file) else {
        return;
    };
    if let Ok(tok) = Tokenizer::from_gguf(model.file()) {
        let ids = tok.encode("Hello, world! <|im_start|> 12345", true, true);
        assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
        let _ = tok.decode(&ids, true);
        if let Some(t) = ChatTemplate::from_gguf(model.file(), &tok) {
            let _ = t.render(&[ChatMessage::user("hi")], true);
        }
    }
    let mut cache = model.new_cache();
    let n_ctx = model.config.n_ctx_train.min(64);
    if let Ok(logits) = model.forward(&[0, 1], &mut cache, Logits::All, n_ctx) {
        assert_eq!(logits.len(), 2 * model.config.n_vocab);
    }
});
