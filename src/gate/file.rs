//! The gate file: a small GGUF sidecar next to the model (never inside it), with one
//! tensor set per gated layer and metadata saying which model the gates were trained
//! for and how, written with gguf-rs-lib and read back through our own reader.
//!
//! Tensors (GGUF dims, innermost first): `blk.N.gate_q.weight` [D, H*G*d],
//! `blk.N.gate_q.bias` [H*G*d], `blk.N.gate_k.weight` [D, H*d], `blk.N.gate_q_norm`
//! [d], `blk.N.gate_k_norm` [d], `blk.N.gate_sink` [d, S, H], `blk.N.gate_bias` [G, H].
use std::path::{Path, PathBuf};

use gguf_rs_lib::prelude::{GGUFBuilder, MetadataValue};

use super::{GateError, GateShape, Gates, LayerGate};
use crate::gguf::GgufFile;
use crate::kernels::GgmlType;
use crate::model::Model;

/// The file type tag of a gate file.
const KIND: &str = "fastkv.gates";
/// The file name suffix gate files carry (`<model stem>.gates.gguf`).
pub const GATE_SUFFIX: &str = ".gates.gguf";

/// Bounds on what a gate file may claim, far above any real model (SmolLM2: 30
/// layers, width 576, 3 KV heads of 3 query heads, d = 16, 16 sinks).
const MAX_LAYERS: usize = 1 << 12;
const MAX_EMBD: usize = 1 << 18;
const MAX_HEAD_DIM: usize = 1 << 10;

/// How a gate file's gates were trained, and how well.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TrainingInfo {
    /// The prompt format documents were fed in ("chat template" or "plain").
    pub template: String,
    /// The corpus, as given to `train-gates`.
    pub corpus: String,
    pub n_docs: u64,
    /// Tokens per training document (at most).
    pub doc_tokens: u64,
    /// Context tokens prefilled and scored by the teacher.
    pub corpus_tokens: u64,
    /// Tokens whose features were kept (every `sample_every`-th).
    pub feature_tokens: u64,
    pub sample_every: u64,
    pub steps: u64,
    pub batch: u64,
    pub seed: u64,
    /// Held-out tokens (every 100th kept one) and the final metrics on them.
    pub val_tokens: u64,
    pub val_loss: f32,
    /// Share of (token, layer, head) where `pred >= 0.05` agrees with `target >= 0.05`.
    pub val_agreement: f32,
}

/// What a gate file says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct GateMeta {
    pub shape: GateShape,
    /// The model's architecture, file name, layer count and fingerprint.
    pub model_arch: String,
    pub model_name: String,
    pub n_layer: usize,
    pub fingerprint: u64,
    pub training: TrainingInfo,
}

impl GateMeta {
    /// Metadata for gates of `model` (loaded from `model_path`), before training.
    pub fn for_model(model: &Model, model_path: &Path) -> Self {
        Self {
            shape: GateShape::for_model(&model.config),
            model_arch: model.config.arch.name().to_string(),
            model_name: file_name(model_path),
            n_layer: model.config.n_layer,
            fingerprint: model.file().fingerprint(),
            training: TrainingInfo::default(),
        }
    }

    /// The metadata of an open gate file (`path` is for messages).
    fn read(f: &GgufFile, path: &Path) -> Result<Self, GateError> {
        let not = |why: String| GateError::NotGates {
            path: path.display().to_string(),
            why,
        };
        if f.get_str("general.type") != Some(KIND) {
            return Err(not("its general.type is not fastkv.gates".into()));
        }
        let u = |k: &str| -> Result<usize, GateError> {
            Ok(f.require_u64(&format!("fastkv.gates.{k}"))? as usize)
        };
        let s = GateShape {
            n_embd: u("embedding_length")?,
            n_head_kv: u("head_count_kv")?,
            group: u("group")?,
            dim: u("dim")?,
            sinks: u("sinks")?,
        };
        if [s.n_embd, s.n_head_kv, s.group, s.dim, s.sinks].contains(&0) {
            return Err(not(format!("a gate dimension is zero: {s:?}")));
        }
        // Sizes are multiplied and loops run over them before any tensor is read: a
        // hostile file must not make that overflow, allocate or spin without end.
        if s.n_embd > MAX_EMBD
            || [s.n_head_kv, s.group, s.dim, s.sinks]
                .iter()
                .any(|&v| v > MAX_HEAD_DIM)
        {
            return Err(not(format!("a gate dimension is implausibly large: {s:?}")));
        }
        let n_layer = u("model.block_count")?;
        if n_layer == 0 || n_layer > MAX_LAYERS {
            return Err(not(format!(
                "its model block count {n_layer} is not between 1 and {MAX_LAYERS}"
            )));
        }
        let text = |k: &str| f.get_str(&format!("fastkv.gates.{k}")).unwrap_or_default();
        let num = |k: &str| {
            f.get_u64(&format!("fastkv.gates.training.{k}"))
                .unwrap_or(0)
        };
        let real = |k: &str| {
            f.get_f32(&format!("fastkv.gates.training.{k}"))
                .unwrap_or(f32::NAN)
        };
        let fingerprint = u64::from_str_radix(text("model.fingerprint"), 16)
            .map_err(|_| not("its model fingerprint is missing or malformed".into()))?;
        Ok(GateMeta {
            shape: s,
            model_arch: text("model.architecture").to_string(),
            model_name: text("model.name").to_string(),
            n_layer,
            fingerprint,
            training: TrainingInfo {
                template: text("training.template").to_string(),
                corpus: text("training.corpus").to_string(),
                n_docs: num("docs"),
                doc_tokens: num("doc_tokens"),
                corpus_tokens: num("corpus_tokens"),
                feature_tokens: num("feature_tokens"),
                sample_every: num("sample_every"),
                steps: num("steps"),
                batch: num("batch"),
                seed: num("seed"),
                val_tokens: num("val_tokens"),
                val_loss: real("val_loss"),
                val_agreement: real("val_agreement"),
            },
        })
    }

    /// An error unless these gates were trained for `model`.
    pub fn check_model(&self, model: &Model, path: &Path) -> Result<(), GateError> {
        let c = &model.config;
        let ok = self.fingerprint == model.file().fingerprint()
            && self.n_layer == c.n_layer
            && self.shape == GateShape::for_model(c);
        if ok {
            return Ok(());
        }
        Err(GateError::WrongModel {
            path: path.display().to_string(),
            gates_for: format!("{}, {}", self.model_name, self.model_arch),
            model: format!("{}, {}", file_name(model.file().path()), c.arch.name()),
        })
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

impl Gates {
    /// Write the gates to `path` as a GGUF file.
    pub fn save(&self, path: &Path) -> Result<(), GateError> {
        let m = &self.meta;
        let t = &m.training;
        let s = m.shape;
        let str_ = |v: &str| MetadataValue::String(v.to_string());
        let u64_ = MetadataValue::U64;
        let mut b = GGUFBuilder::new()
            .add_metadata("general.type", str_(KIND))
            .add_metadata("general.name", str_(&format!("gates for {}", m.model_name)))
            .add_metadata("fastkv.gates.model.architecture", str_(&m.model_arch))
            .add_metadata("fastkv.gates.model.name", str_(&m.model_name))
            .add_metadata("fastkv.gates.model.block_count", u64_(m.n_layer as u64))
            .add_metadata(
                "fastkv.gates.model.fingerprint",
                str_(&format!("{:016x}", m.fingerprint)),
            )
            .add_metadata("fastkv.gates.embedding_length", u64_(s.n_embd as u64))
            .add_metadata("fastkv.gates.head_count_kv", u64_(s.n_head_kv as u64))
            .add_metadata("fastkv.gates.group", u64_(s.group as u64))
            .add_metadata("fastkv.gates.dim", u64_(s.dim as u64))
            .add_metadata("fastkv.gates.sinks", u64_(s.sinks as u64))
            .add_metadata("fastkv.gates.training.template", str_(&t.template))
            .add_metadata("fastkv.gates.training.corpus", str_(&t.corpus))
            .add_metadata("fastkv.gates.training.docs", u64_(t.n_docs))
            .add_metadata("fastkv.gates.training.doc_tokens", u64_(t.doc_tokens))
            .add_metadata("fastkv.gates.training.corpus_tokens", u64_(t.corpus_tokens))
            .add_metadata(
                "fastkv.gates.training.feature_tokens",
                u64_(t.feature_tokens),
            )
            .add_metadata("fastkv.gates.training.sample_every", u64_(t.sample_every))
            .add_metadata("fastkv.gates.training.steps", u64_(t.steps))
            .add_metadata("fastkv.gates.training.batch", u64_(t.batch))
            .add_metadata("fastkv.gates.training.seed", u64_(t.seed))
            .add_metadata("fastkv.gates.training.val_tokens", u64_(t.val_tokens))
            .add_metadata(
                "fastkv.gates.training.val_loss",
                MetadataValue::F32(t.val_loss),
            )
            .add_metadata(
                "fastkv.gates.training.val_agreement",
                MetadataValue::F32(t.val_agreement),
            );
        let (qr, kr, d) = (s.q_rows(), s.k_rows(), s.dim);
        let werr = |e: gguf_rs_lib::prelude::GGUFError| GateError::Write {
            path: path.display().to_string(),
            why: e.to_string(),
        };
        for (il, g) in self.gated() {
            let n = |x: &str| format!("blk.{il}.{x}");
            let dims = |v: &[usize]| v.iter().map(|&x| x as u64).collect::<Vec<_>>();
            let (wq, wk) = g.w.split_at(qr * s.n_embd);
            for (name, shape, data) in [
                (n("gate_q.weight"), dims(&[s.n_embd, qr]), wq),
                (n("gate_q.bias"), dims(&[qr]), &g.bq[..]),
                (n("gate_k.weight"), dims(&[s.n_embd, kr]), wk),
                (n("gate_q_norm"), dims(&[d]), &g.gq[..]),
                (n("gate_k_norm"), dims(&[d]), &g.gk[..]),
                (
                    n("gate_sink"),
                    dims(&[d, s.sinks, s.n_head_kv]),
                    &g.sink[..],
                ),
                (n("gate_bias"), dims(&[s.group, s.n_head_kv]), &g.bias[..]),
            ] {
                b = b.add_f32_tensor(name, shape, data.to_vec()).map_err(werr)?;
            }
        }
        // A crash or a second save to the same path never leaves a torn file.
        crate::durable::write_via_path(path, |tmp| {
            b.build_to_file(tmp)
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .map_err(|e| GateError::Write {
            path: path.display().to_string(),
            why: e.to_string(),
        })
    }

    /// Read a gate file, without checking which model it belongs to.
    pub fn open(path: &Path) -> Result<Self, GateError> {
        let f = GgufFile::open(path)?;
        let meta = GateMeta::read(&f, path)?;
        Self::read_tensors(&f, meta, path)
    }

    /// The gate tensors of an open file whose metadata `meta` has been read.
    fn read_tensors(f: &GgufFile, meta: GateMeta, path: &Path) -> Result<Self, GateError> {
        let s = meta.shape;
        let not = |why: String| GateError::NotGates {
            path: path.display().to_string(),
            why,
        };
        let (qr, kr, d) = (s.q_rows(), s.k_rows(), s.dim);
        let mut gated = Vec::new();
        for il in 0..meta.n_layer {
            if f.tensor(&format!("blk.{il}.gate_q.weight")).is_none() {
                continue;
            }
            let read = |name: &str, dims: &[usize]| -> Result<Vec<f32>, GateError> {
                let name = format!("blk.{il}.{name}");
                let t = f
                    .tensor(&name)
                    .ok_or_else(|| not(format!("tensor {name} is missing")))?;
                if t.info.ty != GgmlType::F32 || t.info.dims != dims {
                    return Err(not(format!(
                        "tensor {name} is {} {:?}, expected f32 {dims:?}",
                        t.info.ty.name(),
                        t.info.dims
                    )));
                }
                let mut out = vec![0f32; t.info.n_elements()];
                t.info.ty.to_f32(t.data, &mut out);
                if out.iter().any(|v| !v.is_finite()) {
                    return Err(not(format!("tensor {name} holds NaN or infinite values")));
                }
                Ok(out)
            };
            let mut w = read("gate_q.weight", &[s.n_embd, qr])?;
            w.extend(read("gate_k.weight", &[s.n_embd, kr])?);
            gated.push((
                il,
                LayerGate {
                    w,
                    bq: read("gate_q.bias", &[qr])?,
                    gq: read("gate_q_norm", &[d])?,
                    gk: read("gate_k_norm", &[d])?,
                    sink: read("gate_sink", &[d, s.sinks, s.n_head_kv])?,
                    bias: read("gate_bias", &[s.group, s.n_head_kv])?,
                },
            ));
        }
        if gated.is_empty() {
            return Err(not("it holds no gate tensors".into()));
        }
        let n_layer = meta.n_layer;
        Ok(Gates::new(meta, n_layer, gated))
    }

    /// Read a gate file and check that it was trained for `model`, and that it gates
    /// exactly the layers whose KV the runtime evicts.
    pub fn load(path: &Path, model: &Model) -> Result<Self, GateError> {
        let f = GgufFile::open(path)?;
        let meta = GateMeta::read(&f, path)?;
        // Before any tensor is read: the sizes are then the model's own.
        meta.check_model(model, path)?;
        let g = Self::read_tensors(&f, meta, path)?;
        let evicted = super::gated_layers(model);
        for il in 0..model.config.n_layer {
            let (gated, evictable) = (g.layer(il).is_some(), evicted.contains(&il));
            if gated != evictable {
                return Err(GateError::NotGates {
                    path: path.display().to_string(),
                    why: format!(
                        "layer {il} {} a gate but its KV {} evicted",
                        if gated { "has" } else { "lacks" },
                        if evictable { "is" } else { "is not" }
                    ),
                });
            }
        }
        Ok(g)
    }
}

/// The gate file for `model` (loaded from `model_path`), when none is named: the
/// first `*.gates.gguf` trained for this very model (same fingerprint) in the model's
/// directory, in `models/` of the current directory, or in `models/` of the source
/// tree this binary was built from.
pub fn find_gates(model: &Model, model_path: &Path) -> Result<PathBuf, GateError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = model_path.parent() {
        dirs.push(if d.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            d.to_path_buf()
        });
    }
    dirs.push(PathBuf::from("models"));
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("models"));
    let fingerprint = model.file().fingerprint();
    for dir in &dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(GATE_SUFFIX))
            .collect();
        files.sort();
        for p in files {
            // The metadata is enough to tell; the tensors are read by `Gates::load`.
            let meta = GgufFile::open(&p)
                .map_err(GateError::from)
                .and_then(|f| GateMeta::read(&f, &p));
            if meta.is_ok_and(|m| m.fingerprint == fingerprint) {
                return Ok(p);
            }
        }
    }
    Err(GateError::NotFound {
        model: file_name(model_path),
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}
