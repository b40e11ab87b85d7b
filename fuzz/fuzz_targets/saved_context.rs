//! Saved-context loading (`--load-context`, the server's document reuse). The
//! checksum and the model's fingerprint are filled in here, so that the fuzzer
//! explores the body rather than the checksum. A context that loads must save again,
//! and that file must load to a context that saves to the same bytes.
//!
//! Input: the file's body after the fingerprint (cache shape, tokens, bookkeeping,
//! the per-head lists).
#![no_main]
use fastkv::kv::SavedContext;
use fastkv_fuzz::{context_file, saved_context_shape, CONTEXT_FINGERPRINT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let shape = saved_context_shape();
    let path = fastkv_fuzz::scratch_file("context.fkv", &context_file(data));
    let Ok(ctx) = SavedContext::load(&path, CONTEXT_FINGERPRINT, &shape) else {
        return;
    };
    let save = |ctx: &SavedContext, name: &str| {
        let path = fastkv_fuzz::scratch_file(name, &[]);
        SavedContext::save(
            &path,
            CONTEXT_FINGERPRINT,
            &ctx.tokens,
            &ctx.cache,
            ctx.judged_below,
        )
        .expect("save a loaded context");
        (std::fs::read(&path).expect("read it"), path)
    };
    let (first, path) = save(&ctx, "context-1.fkv");
    let back = SavedContext::load(&path, CONTEXT_FINGERPRINT, &shape).expect("load it back");
    let (second, _) = save(&back, "context-2.fkv");
    assert!(
        first == second,
        "a saved context loads back to the same bytes"
    );
});
