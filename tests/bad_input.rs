//! Damaged, hostile or incomplete model files give typed errors whose message names
//! the problem, never a panic, an abort or an out-of-bounds read. Every file is
//! written by the test (tests/common/synth.rs), so nothing needs downloading.
mod common;

use std::path::PathBuf;

use common::synth::{tiny_model, GgufWriter, Layout, Rng, TinySpec, Value, Vocab};
use fastkv::gguf::{GgufError, GgufFile};
use fastkv::kernels::GgmlType;
use fastkv::model::{Logits, Model, ModelError};

/// A small but complete llama model (F32, byte-level vocabulary, ~110 KB).
fn tiny_spec(arch: &'static str) -> TinySpec {
    TinySpec {
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        n_head_kv: 1,
        head_dim: 16,
        n_ff: 64,
        embd_type: GgmlType::F32,
        weight_type: GgmlType::F32,
        ..TinySpec::new(arch)
    }
}

fn tiny(arch: &'static str) -> GgufWriter {
    tiny_model(&tiny_spec(arch), &Vocab::bytes(0))
}

/// A temporary file holding `bytes`.
struct TempFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn temp_file(bytes: &[u8]) -> TempFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    TempFile { _dir: dir, path }
}

/// Open `bytes` as a GGUF file, which must fail; `Model::load` must fail the same way.
fn open_err(what: &str, bytes: &[u8]) -> GgufError {
    let f = temp_file(bytes);
    let err = match GgufFile::open(&f.path) {
        Ok(_) => panic!("{what}: GgufFile::open accepted the file"),
        Err(e) => e,
    };
    match Model::load(&f.path) {
        Ok(_) => panic!("{what}: Model::load accepted the file"),
        Err(ModelError::Gguf(e)) => assert_eq!(
            std::mem::discriminant(&e),
            std::mem::discriminant(&err),
            "{what}: Model::load and GgufFile::open disagree: {e} / {err}"
        ),
        Err(e) => panic!("{what}: Model::load failed with a non-GGUF error: {e}"),
    }
    eprintln!("{what}: {err}");
    err
}

/// The file `w` opens as GGUF, but loading it as a model must fail.
fn load_err(what: &str, w: &GgufWriter) -> ModelError {
    let f = temp_file(&w.to_bytes());
    GgufFile::open(&f.path).unwrap_or_else(|e| panic!("{what}: the GGUF itself is fine: {e}"));
    let err = Model::load(&f.path)
        .err()
        .unwrap_or_else(|| panic!("{what}: Model::load accepted the file"));
    eprintln!("{what}: {err}");
    err
}

fn assert_mentions(what: &str, err: &dyn std::fmt::Display, words: &[&str]) {
    let msg = err.to_string();
    let lower = msg.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(&w.to_lowercase())),
        "{what}: the message should mention one of {words:?}: {msg}"
    );
}

#[test]
fn the_unbroken_file_loads_and_runs() {
    // The baseline every other test breaks: it must be valid for them to mean anything.
    let w = tiny("llama");
    let f = temp_file(&w.to_bytes());
    let g = GgufFile::open(&f.path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.tensors().len(), w.tensors.len());
    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    let model = Model::load(&f.path).unwrap();
    let mut cache = model.new_cache();
    let logits = model
        .forward(&[1, 2, 3], &mut cache, Logits::All, 16)
        .unwrap();
    assert_eq!(logits.len(), 3 * model.config.n_vocab);
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn bad_magic_is_reported_as_not_gguf() {
    let mut w = tiny("llama");
    w.magic = *b"GGML";
    let err = open_err("magic GGML", &w.to_bytes());
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err:?}");
    assert_mentions("magic GGML", &err, &["magic"]);

    let err = open_err("a text file", b"This is not a model.\nJust text.\n");
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err:?}");
    assert_mentions("a text file", &err, &["not a GGUF file"]);
}

#[test]
fn unsupported_version_is_named() {
    for version in [0, 1, 99, u32::MAX] {
        let mut w = tiny("llama");
        w.version = version;
        let what = format!("version {version}");
        let err = open_err(&what, &w.to_bytes());
        match err {
            GgufError::UnsupportedVersion { version: v, .. } => assert_eq!(v, version),
            ref e => panic!("{what}: expected UnsupportedVersion, got {e:?}"),
        }
        assert_mentions(&what, &err, &[&format!("version {version}")]);
    }
}

#[test]
fn version_2_files_are_not_refused_as_unsupported() {
    // GGUF v2 and v3 have the same little-endian layout; llama.cpp reads both, and our
    // own error message says "supported: 2 and 3".
    let mut w = tiny("llama");
    w.version = 2;
    let f = temp_file(&w.to_bytes());
    assert!(
        ggml_sys::reference::RefModel::load(&f.path, true).is_ok(),
        "llama.cpp reads GGUF v2"
    );
    if let Err(e) = GgufFile::open(&f.path) {
        panic!("a GGUF v2 file is refused with a self-contradictory message: {e}");
    }
}

#[test]
fn empty_file_is_truncated() {
    let err = open_err("empty file", &[]);
    assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    assert_mentions("empty file", &err, &["truncated"]);
}

#[test]
fn truncation_anywhere_is_reported_as_truncated() {
    let (bytes, l): (Vec<u8>, Layout) = tiny("llama").to_bytes_with_layout();
    let cuts = [
        ("inside the magic", 3),
        ("inside the header", 10),
        ("right after the header", l.header_end),
        ("inside the metadata", (l.header_end + l.kv_end) / 2),
        ("right after the metadata", l.kv_end),
        ("inside the tensor infos", (l.kv_end + l.infos_end) / 2),
        ("right after the tensor infos", l.infos_end),
        ("at the start of the tensor data", l.data_start),
        ("inside the tensor data", (l.data_start + l.total) / 2),
        ("one byte before the end", l.total - 1),
    ];
    for (what, cut) in cuts {
        let what = format!("cut {what} (byte {cut} of {})", l.total);
        let err = open_err(&what, &bytes[..cut]);
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. }
            ),
            "{what}: expected Truncated, got {err:?}"
        );
        assert_mentions(&what, &err, &["truncated"]);
    }
}

#[test]
fn tensor_data_outside_the_file_is_refused() {
    // Offset far past the end of the file.
    let mut w = tiny("llama");
    w.tensor_mut("blk.1.ffn_down.weight").offset_override = Some(1 << 40);
    let err = open_err("offset 2^40", &w.to_bytes());
    assert!(
        matches!(
            err,
            GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. }
        ),
        "{err:?}"
    );
    assert_mentions("offset 2^40", &err, &["truncated", "outside the file"]);

    // Offset + size overflows u64.
    let mut w = tiny("llama");
    w.tensor_mut("blk.1.ffn_down.weight").offset_override = Some(u64::MAX - 31);
    let err = open_err("offset near 2^64", &w.to_bytes());
    assert!(
        matches!(
            err,
            GgufError::Malformed { .. } | GgufError::TensorOutOfBounds { .. }
        ),
        "{err:?}"
    );
    assert_mentions("offset near 2^64", &err, &["blk.1.ffn_down.weight"]);

    // The last tensor claims more rows than the file holds.
    let mut w = tiny("llama");
    let last = w.tensors.last_mut().unwrap();
    last.dims.push(1000);
    let what = format!("{} with 1000x its rows", last.name);
    let err = open_err(&what, &w.to_bytes());
    assert!(
        matches!(
            err,
            GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. }
        ),
        "{err:?}"
    );

    // Offsets must be aligned.
    let mut w = tiny("llama");
    w.tensor_mut("output_norm.weight").offset_override = Some(8);
    let err = open_err("misaligned offset", &w.to_bytes());
    assert!(matches!(err, GgufError::Malformed { .. }), "{err:?}");
    assert_mentions("misaligned offset", &err, &["aligned"]);
}

#[test]
fn absurd_dimensions_are_refused() {
    let name = "blk.0.attn_q.weight";
    let cases: [(&str, Vec<u64>); 4] = [
        ("2^40 x 2^40", vec![1 << 40, 1 << 40]),
        ("2^20 x 2^21", vec![1 << 20, 1 << 21]),
        ("a zero dimension", vec![32, 0]),
        ("five dimensions", vec![32, 32, 1, 1, 1]),
    ];
    for (what, dims) in cases {
        let mut w = tiny("llama");
        w.tensor_mut(name).dims = dims;
        let err = open_err(what, &w.to_bytes());
        match &err {
            GgufError::BadDimensions { name: n, .. } => assert_eq!(n, name),
            // The tensor table itself is inconsistent (gguf-rs-lib's checks).
            GgufError::Malformed { .. } => {
                assert_mentions(what, &err, &["dimension", "element count", "overflow"])
            }
            // The declared size does not fit in the file.
            GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. } => {}
            e => panic!("{what}: unexpected error {e:?}"),
        }
    }
}

#[test]
fn unknown_types_are_refused() {
    let mut w = tiny("llama");
    w.tensor_mut("output_norm.weight").type_id = 200;
    let err = open_err("tensor type 200", &w.to_bytes());
    assert!(
        matches!(
            err,
            GgufError::Malformed { .. } | GgufError::UnsupportedType { .. }
        ),
        "{err:?}"
    );
    assert_mentions("tensor type 200", &err, &["200"]);

    let mut w = tiny("llama");
    w.set(
        "general.odd",
        Value::Raw {
            type_id: 77,
            bytes: vec![],
        },
    );
    let err = open_err("metadata type 77", &w.to_bytes());
    assert!(matches!(err, GgufError::Malformed { .. }), "{err:?}");
    assert_mentions("metadata type 77", &err, &["77"]);

    // Q8_0 rows are made of 32-value blocks.
    let mut w = tiny("llama");
    w.add_raw("odd.weight", &[33], GgmlType::Q8_0.id(), vec![0; 34]);
    let err = open_err("Q8_0 row of 33 values", &w.to_bytes());
    assert!(
        matches!(
            err,
            GgufError::Malformed { .. } | GgufError::BadDimensions { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn hostile_lengths_and_counts_do_not_allocate() {
    // Each would ask for an absurd allocation if trusted.
    let string_len = Value::Raw {
        type_id: 8,
        bytes: u64::MAX.to_le_bytes().to_vec(),
    };
    let array_len = Value::Raw {
        type_id: 9,
        bytes: [4u32.to_le_bytes().as_slice(), &(1u64 << 60).to_le_bytes()].concat(),
    };
    for (what, v) in [
        ("string of 2^64-1 bytes", string_len),
        ("array of 2^60 u32", array_len),
    ] {
        let mut w = tiny("llama");
        w.set("general.hostile", v);
        let err = open_err(what, &w.to_bytes());
        assert!(
            matches!(
                err,
                GgufError::Malformed { .. } | GgufError::Truncated { .. }
            ),
            "{what}: {err:?}"
        );
    }

    let bytes = tiny("llama").to_bytes();
    for (what, at, count) in [
        ("2^64-1 metadata entries", 16, u64::MAX),
        ("2^40 tensors", 8, 1u64 << 40),
        ("metadata count one too high", 16, 0),
    ] {
        let mut b = bytes.clone();
        let count = if count == 0 {
            u64::from_le_bytes(b[16..24].try_into().unwrap()) + 1
        } else {
            count
        };
        b[at..at + 8].copy_from_slice(&count.to_le_bytes());
        let err = open_err(what, &b);
        assert!(
            matches!(
                err,
                GgufError::Malformed { .. } | GgufError::Truncated { .. }
            ),
            "{what}: {err:?}"
        );
    }

    let mut w = tiny("llama");
    w.add_raw("output_norm.weight", &[32], 0, vec![0; 128]);
    let err = open_err("duplicate tensor name", &w.to_bytes());
    assert!(matches!(err, GgufError::Malformed { .. }), "{err:?}");
    assert_mentions("duplicate tensor name", &err, &["output_norm.weight"]);
}

#[test]
fn missing_required_keys_are_named() {
    for key in [
        "general.architecture",
        "llama.embedding_length",
        "llama.block_count",
        "llama.context_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.layer_norm_rms_epsilon",
    ] {
        let mut w = tiny("llama");
        w.remove_key(key);
        let err = load_err(&format!("no {key}"), &w);
        match &err {
            ModelError::Gguf(GgufError::MissingKey { key: k }) => assert_eq!(k, key),
            e => panic!("no {key}: expected MissingKey, got {e:?}"),
        }
        assert_mentions(key, &err, &[key]);
    }
}

#[test]
fn wrong_or_inconsistent_metadata_is_named() {
    let mut w = tiny("llama");
    w.set("llama.block_count", Value::str("two"));
    let err = load_err("block_count is a string", &w);
    assert!(
        matches!(&err, ModelError::Gguf(GgufError::WrongType { key, .. }) if key == "llama.block_count"),
        "{err:?}"
    );
    assert_mentions("block_count is a string", &err, &["llama.block_count"]);

    let mut w = tiny("llama");
    w.set("general.architecture", Value::str("mamba"));
    let err = load_err("architecture mamba", &w);
    assert!(
        matches!(&err, ModelError::UnsupportedArch(a) if a == "mamba"),
        "{err:?}"
    );
    assert_mentions("architecture mamba", &err, &["mamba"]);

    let mut w = tiny("llama");
    w.set("llama.attention.head_count_kv", Value::U32(3));
    let err = load_err("2 heads over 3 KV heads", &w);
    assert!(matches!(err, ModelError::BadConfig(_)), "{err:?}");

    let mut w = tiny("llama");
    w.set("llama.block_count", Value::U32(3));
    let err = load_err("3 blocks, tensors for 2", &w);
    assert!(
        matches!(&err, ModelError::MissingTensor(t) if t.starts_with("blk.2.")),
        "{err:?}"
    );

    // Found by fuzzing (fuzz/fuzz_targets/gguf_model.rs): a block count of millions
    // sized the layer table (8.5 GB) before any tensor was looked for. llama.cpp loads
    // at most 512 layers (LLAMA_MAX_LAYERS); so does fastkv, said before anything else.
    for n in [513u32, 1 << 23] {
        let mut w = tiny("llama");
        w.set("llama.block_count", Value::U32(n));
        let err = load_err("too many blocks", &w);
        assert!(matches!(err, ModelError::BadConfig(_)), "{err:?}");
        assert_mentions("too many blocks", &err, &["512"]);
    }
}

#[test]
fn missing_tensors_are_named() {
    for (arch, name) in [
        ("llama", "token_embd.weight"),
        ("llama", "blk.1.ffn_down.weight"),
        ("llama", "output_norm.weight"),
        ("qwen3", "blk.1.attn_k_norm.weight"),
        ("qwen2", "blk.0.attn_q.weight"),
    ] {
        let mut w = tiny(arch);
        w.remove_tensor(name);
        let what = format!("{arch} without {name}");
        let err = load_err(&what, &w);
        assert!(
            matches!(&err, ModelError::MissingTensor(t) if t == name),
            "{what}: {err:?}"
        );
        assert_mentions(&what, &err, &[name]);
    }
}

/// A tensor the model would not use is an error (skipping it would be silently
/// wrong), while optional biases are used where present (llama.cpp treats Q/K/V
/// biases as optional).
#[test]
fn unused_tensors_are_refused_and_biases_are_optional() {
    let mut w = tiny("qwen2");
    w.remove_tensor("blk.0.attn_v.bias");
    let f = temp_file(&w.to_bytes());
    Model::load(&f.path).expect("a qwen2 model without one V bias still loads");

    let mut w = tiny("llama");
    let ones: Vec<u8> = [1f32; 8].iter().flat_map(|v| v.to_le_bytes()).collect();
    w.add_raw("rope_freqs.weight", &[8], 0, ones);
    let err = load_err("llama with rope_freqs", &w);
    assert!(
        matches!(&err, ModelError::UnsupportedTensor { name, .. } if name == "rope_freqs.weight"),
        "{err:?}"
    );
    assert_mentions("llama with rope_freqs", &err, &["rope_freqs.weight"]);

    // A tensor of the wrong shape is named too.
    let mut w = tiny("llama");
    let t = w.tensor_mut("blk.0.attn_q.weight");
    t.dims = vec![32, 16];
    t.data.truncate(32 * 16 * 4);
    let err = load_err("attn_q of 16 rows", &w);
    assert!(
        matches!(&err, ModelError::BadShape { name, .. } if name == "blk.0.attn_q.weight"),
        "{err:?}"
    );
}

#[test]
fn nonexistent_path_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-model.gguf");
    let err = GgufFile::open(&path).unwrap_err();
    match &err {
        GgufError::Open { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        e => panic!("expected Open, got {e:?}"),
    }
    assert_mentions("nonexistent path", &err, &["no-such-model.gguf"]);
    assert!(matches!(
        Model::load(&path),
        Err(ModelError::Gguf(GgufError::Open { .. }))
    ));
}

#[test]
fn directory_is_an_open_error_not_a_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = GgufFile::open(dir.path()).unwrap_err();
    eprintln!("directory: {err}");
    assert!(
        matches!(err, GgufError::Open { .. }),
        "a directory should be reported as unreadable (Open: 'Is a directory'), not as {err:?}: '{err}'"
    );
    assert!(matches!(
        Model::load(dir.path()),
        Err(ModelError::Gguf(GgufError::Open { .. }))
    ));
}

#[test]
fn bad_tokens_and_overfull_contexts_are_errors() {
    let w = tiny("llama");
    let f = temp_file(&w.to_bytes());
    let model = Model::load(&f.path).unwrap();
    let n_vocab = model.config.n_vocab as u32;
    let mut cache = model.new_cache();
    let err = model
        .forward(&[1, n_vocab], &mut cache, Logits::Last, 16)
        .unwrap_err();
    assert!(
        matches!(err, ModelError::BadToken(t) if t == n_vocab),
        "{err:?}"
    );
    let err = model
        .forward(&[1; 17], &mut cache, Logits::Last, 16)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextFull {
                needed: 17,
                n_ctx: 16
            }
        ),
        "{err:?}"
    );
    // Neither error consumed the cache: a valid call still works.
    assert_eq!(
        model
            .forward(&[1, 2], &mut cache, Logits::Last, 16)
            .unwrap()
            .len(),
        n_vocab as usize
    );
}

/// Random damage to the header, metadata and tensor table: whatever happens, opening
/// and loading return (Ok or a typed error), and a model that still loads still runs.
/// `FASTKV_FUZZ_ROUNDS=20000` runs a longer campaign.
#[test]
fn random_corruption_never_panics() {
    let (bytes, l) = tiny("llama").to_bytes_with_layout();
    let mut rng = Rng::new(7);
    let rounds: usize = std::env::var("FASTKV_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let (mut opened, mut loaded) = (0, 0);
    for round in 0..rounds {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(l.data_start);
            b[at] = match rng.below(3) {
                0 => rng.next_u64() as u8,
                1 => b[at] ^ (1 << rng.below(8)),
                _ => 0xff,
            };
        }
        if round % 5 == 0 {
            b.truncate(rng.below(b.len()));
        }
        let f = temp_file(&b);
        if GgufFile::open(&f.path).is_ok() {
            opened += 1;
        }
        if let Ok(model) = Model::load(&f.path) {
            loaded += 1;
            let n = model.config.n_vocab as u32;
            let mut cache = model.new_cache();
            let out = model.forward(&[0, 1 % n, 2 % n], &mut cache, Logits::Last, 8);
            if let Ok(out) = out {
                assert_eq!(out.len(), model.config.n_vocab);
            }
        }
    }
    eprintln!("random corruption: {opened} of {rounds} damaged files opened, {loaded} loaded");
    // Damage to text (names, strings) is often harmless; damage to lengths is not.
    assert!(
        opened < rounds,
        "every damaged file opened: the damage missed"
    );
}
