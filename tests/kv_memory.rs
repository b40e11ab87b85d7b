//! Eviction gives memory back to the operating system: the process's resident size
//! rises to hold the full cache, then falls after compaction. In a test binary of its
//! own, so that no other test allocates while it measures.
mod common;

use common::*;
use fastkv::kv::{release_freed_memory, Policy};
use fastkv::model::Model;
use fastkv::session::{EvictionConfig, Session, TeacherPrompt};
use fastkv::tokenizer::{ChatTemplate, Tokenizer};

/// A field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
fn compaction_returns_memory_to_the_os() {
    if !std::path::Path::new("/proc/self/status").exists() {
        skip("no /proc/self/status on this system");
        return;
    }
    let Some(path) = model(SMOLLM2) else { return };
    let Some(text) = wiki_text() else { return };
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let ids = tok.encode(&text[..60_000], false, false);
    let (prefix, context) = (vec![tok.bos().unwrap()], &ids[..4096]);

    // Touch the weights and start the threads, so the baseline holds them.
    let mut warm = Session::new(&model, 8192);
    warm.feed(&ids[..600]).unwrap();
    drop(warm);
    release_freed_memory();
    let base = status_bytes("VmRSS:");

    // KVzip holds the whole context until its teacher has scored it, then compacts.
    let mut s = Session::new(&model, 8192);
    let template = ChatTemplate::from_gguf(model.file(), &tok).unwrap();
    s.set_teacher_prompt(TeacherPrompt::new(&tok, &template).unwrap());
    s.set_eviction(EvictionConfig::new(Policy::KvZip, 0.3))
        .unwrap();
    s.feed_context(&prefix, context).unwrap();
    let (held, full) = (s.kv_bytes(), s.cache().full_bytes());
    let after = status_bytes("VmRSS:");
    let peak = status_bytes("VmHWM:");
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    eprintln!(
        "KV full {:.1} MiB, held {:.1} MiB; RSS above baseline: peak {:.1} MiB, after {:.1} MiB",
        mib(full),
        mib(held),
        mib(peak.saturating_sub(base)),
        mib(after.saturating_sub(base))
    );
    assert!(held * 3 < full + full / 10, "held {held} of {full}");
    // The full cache was resident...
    assert!(
        peak > base + full * 8 / 10,
        "the full cache never showed in RSS"
    );
    // ...and at least 70% of what was evicted has left the process.
    let evicted = full - held;
    assert!(
        after < base + held + evicted * 3 / 10,
        "RSS after compaction is {:.1} MiB above baseline, holding {:.1} MiB of KV",
        mib(after.saturating_sub(base)),
        mib(held)
    );
}
