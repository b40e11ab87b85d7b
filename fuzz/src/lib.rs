//! What the fuzz targets share: the reference models' tokenizers and templates
//! (loaded once per process), a tiny random model for the gate-file target, and a
//! scratch file for parsers that read from a path.
//!
//! Every target asserts properties as well as "no crash": ids in range, round trips,
//! a loaded context that saves and loads back equal. libFuzzer's own limits turn a
//! slow input (`-timeout`) or a large allocation (`-rss_limit_mb`,
//! `-malloc_limit_mb`) into a failure; docs/reliability.md has the commands.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fastkv::gguf::GgufFile;
use fastkv::model::Model;
use fastkv::tokenizer::{ChatTemplate, Tokenizer};

/// The tiny GGUF writer of the integration tests, reused for seeds and the tiny model.
#[path = "../../tests/common/synth.rs"]
pub mod synth;

/// The reference models' file names (as tests/common names them).
pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// The repository's `models/` directory.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// A reference model's file; a fuzz target without its model cannot run.
pub fn reference_model(name: &str) -> PathBuf {
    let path = models_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `python3 models/fetch.py` first",
        path.display()
    );
    path
}

/// A reference model's tokenizer and chat template (None: the model has none).
pub struct Reference {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

fn load_reference(name: &str) -> Reference {
    let f = GgufFile::open(reference_model(name)).expect("open a reference model");
    let tokenizer = Tokenizer::from_gguf(&f).expect("reference tokenizer");
    let template = ChatTemplate::from_gguf(&f, &tokenizer);
    Reference {
        tokenizer,
        template,
    }
}

/// SmolLM2's byte-level BPE tokenizer and ChatML template.
pub fn smollm2() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| load_reference(SMOLLM2))
}

/// Gemma 3's SentencePiece tokenizer (no chat template in this base model).
pub fn gemma3() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| load_reference(GEMMA3))
}

/// The tiny llama-architecture model the gate-file target checks gates against.
pub fn tiny_llama_bytes() -> Vec<u8> {
    let mut spec = synth::TinySpec::new("llama");
    spec.n_embd = 32;
    spec.n_ff = 32;
    spec.n_head = 2;
    spec.n_head_kv = 1;
    spec.n_ctx = 64;
    synth::tiny_model(&spec, &synth::Vocab::bytes(0)).to_bytes()
}

pub fn tiny_llama() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let path = scratch_dir().join(format!("tiny-llama-{}.gguf", std::process::id()));
        std::fs::write(&path, tiny_llama_bytes()).expect("write the tiny model");
        let model = Model::load(&path).expect("load the tiny model");
        // The model keeps its file mapped; the name can go.
        let _ = std::fs::remove_file(&path);
        model
    })
}

/// Where scratch files go: memory-backed when the machine has /dev/shm.
fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Write `bytes` to this process's scratch file `name` and return its path (one
/// file per process and name, rewritten for every input).
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(format!("fastkv-fuzz-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).expect("write the scratch file");
    path
}

/// Split an input at its first NUL byte (the rest is empty when there is none).
pub fn split_nul(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// The fingerprint the saved-context target stamps its files with.
pub const CONTEXT_FINGERPRINT: u64 = 0x5eed_f00d_cafe_0001;

/// The cache shape of the saved-context target: two layers of two KV heads, the second
/// with a sliding window (as Gemma 3's local layers).
pub fn saved_context_shape() -> fastkv::kv::KvShape {
    fastkv::kv::KvShape {
        n_layer: 2,
        n_head_kv: 2,
        head_dim: 8,
        head_dim_v: 8,
        windows: vec![None, Some(4)],
    }
}

/// The bytes before a context file's body: magic, format version and fingerprint
/// (src/kv/persist.rs).
const CONTEXT_HEADER_LEN: usize = 8 + 4 + 8;

/// A whole context file around `body`: header with [`CONTEXT_FINGERPRINT`], then the
/// body, then the checksum.
pub fn context_file(body: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(CONTEXT_HEADER_LEN + body.len() + 8);
    file.extend_from_slice(b"FASTKVCX");
    file.extend_from_slice(&1u32.to_le_bytes());
    file.extend_from_slice(&CONTEXT_FINGERPRINT.to_le_bytes());
    file.extend_from_slice(body);
    let sum = xxhash_rust::xxh3::xxh3_64(&file);
    file.extend_from_slice(&sum.to_le_bytes());
    file
}

/// The body of a whole context file (what [`context_file`] wraps).
pub fn context_body(file: &[u8]) -> &[u8] {
    &file[CONTEXT_HEADER_LEN..file.len() - 8]
}
