//! Tiny GGUF files written by hand, for tests: a byte-exact GGUF v3 writer (every
//! section's offset is known, so tests can cut or corrupt a file at a chosen place),
//! and random-weight decoders of the supported architectures that both fastkv and
//! llama.cpp can load.
//!
//! The format: magic `GGUF`, u32 version, u64 tensor count, u64 KV count, the KVs
//! (string key, u32 type, value), the tensor infos (string name, u32 n_dims, u64 dims,
//! u32 type, u64 offset relative to the data section), zero padding to the alignment
//! (32), then the tensor data, each tensor at an aligned offset.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fastkv::kernels::GgmlType;

/// GGUF metadata value type ids.
pub mod vtype {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The alignment of the tensor data section and of every tensor in it.
pub const ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone)]
pub enum Value {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
    /// Any type id with hand-made value bytes (for malformed files).
    Raw {
        type_id: u32,
        bytes: Vec<u8>,
    },
}

impl Value {
    pub fn str(s: &str) -> Self {
        Self::Str(s.to_string())
    }

    fn type_id(&self) -> u32 {
        match self {
            Self::U32(_) => vtype::U32,
            Self::I32(_) => vtype::I32,
            Self::U64(_) => vtype::U64,
            Self::F32(_) => vtype::F32,
            Self::Bool(_) => vtype::BOOL,
            Self::Str(_) => vtype::STRING,
            Self::StrArray(_) | Self::F32Array(_) | Self::I32Array(_) => vtype::ARRAY,
            Self::Raw { type_id, .. } => *type_id,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::Bool(v) => out.push(*v as u8),
            Self::Str(s) => put_str(out, s),
            Self::StrArray(a) => {
                put_u32(out, vtype::STRING);
                put_u64(out, a.len() as u64);
                a.iter().for_each(|s| put_str(out, s));
            }
            Self::F32Array(a) => {
                put_u32(out, vtype::F32);
                put_u64(out, a.len() as u64);
                a.iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            Self::I32Array(a) => {
                put_u32(out, vtype::I32);
                put_u64(out, a.len() as u64);
                a.iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            Self::Raw { bytes, .. } => out.extend_from_slice(bytes),
        }
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// One tensor: its descriptor and its bytes.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
    /// Written instead of the computed offset (for malformed files).
    pub offset_override: Option<u64>,
}

/// Where each section of a written file starts and ends (byte offsets).
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// End of the 24-byte header (magic, version, counts).
    pub header_end: usize,
    /// End of the metadata KVs.
    pub kv_end: usize,
    /// End of the tensor infos.
    pub infos_end: usize,
    /// Start of the (aligned) tensor data section.
    pub data_start: usize,
    pub total: usize,
}

/// A GGUF file under construction.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    pub magic: [u8; 4],
    pub version: u32,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<Tensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self {
            magic: *b"GGUF",
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Set (or replace) a metadata key.
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.kvs.push((key.to_string(), value)),
        }
        self
    }

    /// Remove a metadata key; panics if it was not there (a test bug).
    pub fn remove_key(&mut self, key: &str) -> &mut Self {
        let before = self.kvs.len();
        self.kvs.retain(|(k, _)| k != key);
        assert_eq!(self.kvs.len() + 1, before, "no metadata key {key}");
        self
    }

    /// Remove a tensor; panics if it was not there (a test bug).
    pub fn remove_tensor(&mut self, name: &str) -> &mut Self {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        assert_eq!(self.tensors.len() + 1, before, "no tensor {name}");
        self
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut Tensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// Add a tensor with raw bytes and any type id.
    pub fn add_raw(&mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push(Tensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id,
            data,
            offset_override: None,
        });
        self
    }

    /// Add a tensor of `values` (row-major, rows of `dims[0]`) stored as `ty` (F32, F16,
    /// or a quantized type whose block size divides `dims[0]`).
    pub fn add(&mut self, name: &str, dims: &[u64], ty: GgmlType, values: &[f32]) -> &mut Self {
        let n: u64 = dims.iter().product();
        assert_eq!(
            n as usize,
            values.len(),
            "{name}: {} values for dims {dims:?}",
            values.len()
        );
        let cols = dims[0] as usize;
        let row_bytes = ty.row_bytes(cols);
        let mut data = vec![0u8; row_bytes * (values.len() / cols)];
        for (src, dst) in values
            .chunks_exact(cols)
            .zip(data.chunks_exact_mut(row_bytes))
        {
            ty.from_f32(src, dst);
        }
        self.add_raw(name, dims, ty.id(), data)
    }

    /// Encode the file; returns its bytes and where its sections lie.
    pub fn to_bytes_with_layout(&self) -> (Vec<u8>, Layout) {
        let mut out = Vec::new();
        out.extend_from_slice(&self.magic);
        put_u32(&mut out, self.version);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.kvs.len() as u64);
        let header_end = out.len();
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            put_u32(&mut out, v.type_id());
            v.encode(&mut out);
        }
        let kv_end = out.len();
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            t.dims.iter().for_each(|&d| put_u64(&mut out, d));
            put_u32(&mut out, t.type_id);
            put_u64(&mut out, t.offset_override.unwrap_or(offset as u64));
            offsets.push(offset);
            offset = align(offset + t.data.len());
        }
        let infos_end = out.len();
        out.resize(align(out.len()), 0);
        let data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(&t.data);
        }
        out.resize(align(out.len()), 0);
        let total = out.len();
        (
            out,
            Layout {
                header_end,
                kv_end,
                infos_end,
                data_start,
                total,
            },
        )
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_with_layout().0
    }

    /// Write the file into `dir` as `name`; returns its path.
    pub fn write_to(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.to_bytes()).expect("write synthetic GGUF");
        path
    }
}

/// A seeded xorshift64* generator: reproducible weights without the rand crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    /// `n` values uniform in [1 - spread, 1 + spread) (norm weights).
    pub fn around_one(&mut self, n: usize, spread: f32) -> Vec<f32> {
        (0..n).map(|_| 1.0 + self.uniform() * spread).collect()
    }

    /// An integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A tokenizer's GGUF metadata (gpt2-style BPE).
#[derive(Debug, Clone)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub token_type: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
    /// Where it came from, for messages.
    pub source: &'static str,
}

impl Vocab {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// SmolLM2's tokenizer (49152 tokens), copied from its GGUF; None if the model
    /// file is absent. Read once per test binary.
    pub fn smollm2() -> Option<&'static Vocab> {
        static VOCAB: OnceLock<Option<Vocab>> = OnceLock::new();
        VOCAB
            .get_or_init(|| {
                let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("models")
                    .join(super::SMOLLM2);
                if !path.is_file() {
                    eprintln!(
                        "note: {} not found (`python3 models/fetch.py`); \
                         using a byte-level vocabulary instead",
                        path.display()
                    );
                    return None;
                }
                let f = fastkv::gguf::GgufFile::open(&path).expect("open SmolLM2");
                let strings = |key: &str| -> Vec<String> {
                    f.require_str_array(key)
                        .unwrap_or_else(|e| panic!("{key}: {e}"))
                        .into_iter()
                        .map(str::to_string)
                        .collect()
                };
                let token_type = f
                    .get_i64_array("tokenizer.ggml.token_type")
                    .expect("token_type")
                    .expect("SmolLM2 has token types")
                    .into_iter()
                    .map(|t| t as i32)
                    .collect();
                Some(Vocab {
                    tokens: strings("tokenizer.ggml.tokens"),
                    token_type,
                    merges: strings("tokenizer.ggml.merges"),
                    bos: f.get_u64("tokenizer.ggml.bos_token_id").expect("bos") as u32,
                    eos: f.get_u64("tokenizer.ggml.eos_token_id").expect("eos") as u32,
                    source: "SmolLM2",
                })
            })
            .as_ref()
    }

    /// A byte-level gpt2 vocabulary with no merges: the 256 byte tokens (GPT-2's
    /// byte-to-unicode mapping), then `<|endoftext|>` (control, bos = eos), then
    /// `extra` filler tokens. Needs no model file.
    pub fn bytes(extra: usize) -> Vocab {
        let mut tokens: Vec<String> = (0u8..=255).map(gpt2_byte_char).map(String::from).collect();
        let mut token_type = vec![1; 256];
        tokens.push("<|endoftext|>".to_string());
        token_type.push(3);
        for i in 0..extra {
            tokens.push(format!("<extra_{i}>"));
            token_type.push(4);
        }
        Vocab {
            tokens,
            token_type,
            merges: Vec::new(),
            bos: 256,
            eos: 256,
            source: "byte-level",
        }
    }

    /// SmolLM2's vocabulary if present, else [`Vocab::bytes`] (so a test still runs).
    pub fn smollm2_or_bytes() -> Vocab {
        Vocab::smollm2()
            .cloned()
            .unwrap_or_else(|| Vocab::bytes(1024))
    }
}

/// GPT-2's printable stand-in for a byte (its `bytes_to_unicode` table).
fn gpt2_byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + rank).expect("valid code point")
}

/// The shape and storage of a tiny random decoder.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// "llama", "qwen2" or "qwen3".
    pub arch: &'static str,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    /// Storage of token_embd.weight (and output.weight when untied).
    pub embd_type: GgmlType,
    /// Storage of the 2-D layer weights.
    pub weight_type: GgmlType,
    /// No output.weight: the output head reuses token_embd.weight.
    pub tied: bool,
    pub seed: u64,
}

impl TinySpec {
    /// n_embd 64, 2 layers, 4 heads, 2 KV heads, head_dim 16, n_ff 128, context 256.
    pub fn new(arch: &'static str) -> Self {
        Self {
            arch,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            n_ff: 128,
            n_ctx: 256,
            rope_base: 10000.0,
            rms_eps: 1e-6,
            embd_type: GgmlType::F16,
            weight_type: GgmlType::F16,
            tied: true,
            seed: 1,
        }
    }
}

/// A random-weight decoder of `spec.arch` with `vocab`'s tokenizer, as a writer (so a
/// test can still remove or damage parts before writing it).
pub fn tiny_model(spec: &TinySpec, vocab: &Vocab) -> GgufWriter {
    let s = spec;
    let a = s.arch;
    let (d, ff, nv) = (s.n_embd as u64, s.n_ff as u64, vocab.len() as u64);
    let q_dim = (s.n_head * s.head_dim) as u64;
    let kv_dim = (s.n_head_kv * s.head_dim) as u64;
    let mut rng = Rng::new(s.seed);
    let mut w = GgufWriter::new();

    w.set("general.architecture", Value::str(a))
        .set("general.name", Value::Str(format!("tiny-random-{a}")))
        .set("general.alignment", Value::U32(ALIGNMENT as u32))
        .set(&format!("{a}.context_length"), Value::U32(s.n_ctx as u32))
        .set(
            &format!("{a}.embedding_length"),
            Value::U32(s.n_embd as u32),
        )
        .set(&format!("{a}.block_count"), Value::U32(s.n_layer as u32))
        .set(
            &format!("{a}.feed_forward_length"),
            Value::U32(s.n_ff as u32),
        )
        .set(
            &format!("{a}.attention.head_count"),
            Value::U32(s.n_head as u32),
        )
        .set(
            &format!("{a}.attention.head_count_kv"),
            Value::U32(s.n_head_kv as u32),
        )
        .set(
            &format!("{a}.attention.key_length"),
            Value::U32(s.head_dim as u32),
        )
        .set(
            &format!("{a}.attention.value_length"),
            Value::U32(s.head_dim as u32),
        )
        .set(
            &format!("{a}.rope.dimension_count"),
            Value::U32(s.head_dim as u32),
        )
        .set(&format!("{a}.rope.freq_base"), Value::F32(s.rope_base))
        .set(
            &format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(s.rms_eps),
        );
    if a == "llama" {
        w.set("llama.vocab_size", Value::U32(nv as u32));
    }
    let is_qwen = a.starts_with("qwen");
    w.set("tokenizer.ggml.model", Value::str("gpt2"))
        .set(
            "tokenizer.ggml.pre",
            Value::str(if is_qwen { "qwen2" } else { "smollm" }),
        )
        .set(
            "tokenizer.ggml.tokens",
            Value::StrArray(vocab.tokens.clone()),
        )
        .set(
            "tokenizer.ggml.token_type",
            Value::I32Array(vocab.token_type.clone()),
        )
        .set(
            "tokenizer.ggml.merges",
            Value::StrArray(vocab.merges.clone()),
        )
        .set("tokenizer.ggml.bos_token_id", Value::U32(vocab.bos))
        .set("tokenizer.ggml.eos_token_id", Value::U32(vocab.eos))
        .set("tokenizer.ggml.add_bos_token", Value::Bool(!is_qwen));

    // Scales keep activations O(1): embeddings and the head large enough that the
    // top-1 token is well separated, Q/K large enough that attention is not uniform.
    w.add(
        "token_embd.weight",
        &[d, nv],
        s.embd_type,
        &rng.vec((d * nv) as usize, 0.5),
    );
    for il in 0..s.n_layer {
        let n = |t: &str| format!("blk.{il}.{t}");
        let wt = s.weight_type;
        w.add(
            &n("attn_norm.weight"),
            &[d],
            GgmlType::F32,
            &rng.around_one(s.n_embd, 0.2),
        );
        w.add(
            &n("attn_q.weight"),
            &[d, q_dim],
            wt,
            &rng.vec((d * q_dim) as usize, 0.25),
        );
        w.add(
            &n("attn_k.weight"),
            &[d, kv_dim],
            wt,
            &rng.vec((d * kv_dim) as usize, 0.25),
        );
        w.add(
            &n("attn_v.weight"),
            &[d, kv_dim],
            wt,
            &rng.vec((d * kv_dim) as usize, 0.2),
        );
        if a == "qwen2" {
            w.add(
                &n("attn_q.bias"),
                &[q_dim],
                GgmlType::F32,
                &rng.vec(q_dim as usize, 0.5),
            );
            w.add(
                &n("attn_k.bias"),
                &[kv_dim],
                GgmlType::F32,
                &rng.vec(kv_dim as usize, 0.5),
            );
            w.add(
                &n("attn_v.bias"),
                &[kv_dim],
                GgmlType::F32,
                &rng.vec(kv_dim as usize, 0.5),
            );
        }
        if a == "qwen3" {
            let hd = s.head_dim as u64;
            w.add(
                &n("attn_q_norm.weight"),
                &[hd],
                GgmlType::F32,
                &rng.around_one(s.head_dim, 0.3),
            );
            w.add(
                &n("attn_k_norm.weight"),
                &[hd],
                GgmlType::F32,
                &rng.around_one(s.head_dim, 0.3),
            );
        }
        w.add(
            &n("attn_output.weight"),
            &[q_dim, d],
            wt,
            &rng.vec((q_dim * d) as usize, 0.15),
        );
        w.add(
            &n("ffn_norm.weight"),
            &[d],
            GgmlType::F32,
            &rng.around_one(s.n_embd, 0.2),
        );
        w.add(
            &n("ffn_gate.weight"),
            &[d, ff],
            wt,
            &rng.vec((d * ff) as usize, 0.2),
        );
        w.add(
            &n("ffn_up.weight"),
            &[d, ff],
            wt,
            &rng.vec((d * ff) as usize, 0.2),
        );
        w.add(
            &n("ffn_down.weight"),
            &[ff, d],
            wt,
            &rng.vec((ff * d) as usize, 0.15),
        );
    }
    w.add(
        "output_norm.weight",
        &[d],
        GgmlType::F32,
        &rng.around_one(s.n_embd, 0.2),
    );
    if !s.tied {
        w.add(
            "output.weight",
            &[d, nv],
            s.embd_type,
            &rng.vec((d * nv) as usize, 0.5),
        );
    }
    w
}
