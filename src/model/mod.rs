//! The decoder: weights named after their GGUF tensors, and one forward pass that
//! serves llama, qwen2, qwen3 and gemma3 through the differences in [`Config`].
//!
//! Read [`Model::forward_batch`] top to bottom: it is the whole model.
mod config;

pub use config::{Activation, Arch, Config};

use std::path::Path;

use rayon::prelude::*;

use crate::gguf::{GgufError, GgufFile};
use crate::kernels::{
    self, matmul, matmuls, rmsnorm, rmsnorm_inplace, rope_angles, rope_rotate, Activations,
    GgmlType, QMatrix,
};
use crate::kv::{self, KvCache, KvShape, Probe};

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture '{0}' (supported: llama, qwen2, qwen3, gemma3)")]
    UnsupportedArch(String),
    #[error("model file lacks tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    BadShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error(
        "tensor '{name}' is not supported for {arch} models (ignoring it would give wrong results)"
    )]
    UnsupportedTensor { name: String, arch: &'static str },
    #[error("inconsistent model hyper-parameters: {0}")]
    BadConfig(String),
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    #[error("context is full: {needed} tokens needed, the context holds {n_ctx} (raise -c)")]
    ContextFull { needed: usize, n_ctx: usize },
}

/// A weight matrix: where it lies in the file, and its shape.
#[derive(Debug, Clone)]
struct Weight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    offset: usize,
    n_bytes: usize,
}

/// The weights of one transformer block.
#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    wq: Weight,
    wk: Weight,
    wv: Weight,
    wo: Weight,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    bo: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    ffn_gate: Weight,
    ffn_up: Weight,
    ffn_down: Weight,
    post_ffn_norm: Option<Vec<f32>>,
}

/// Receives each layer's attention input during a forward call: (layer index, n rows
/// of n_embd values, the `attn_norm` output). Any `FnMut(usize, &[f32])` is one.
pub trait AttnInput {
    fn attn_input(&mut self, layer: usize, x: &[f32]);
}

impl<F: FnMut(usize, &[f32])> AttnInput for F {
    fn attn_input(&mut self, layer: usize, x: &[f32]) {
        self(layer, x)
    }
}

pub type AttnInputTap<'a> = &'a mut dyn AttnInput;

/// One sequence of a [`Model::forward_batch`] call: its new tokens, the cache they
/// continue, and what [`Model::forward_observed`] takes besides.
pub struct Sequence<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: Logits,
    pub n_ctx: usize,
    pub probe: Option<&'a Probe>,
    pub attn_input: Option<AttnInputTap<'a>>,
}

/// Tokens whose feed-forward activations are computed together. Every product is
/// per token (and bit-identical in every tile shape), so the block size changes
/// memory, not results.
const FFN_BLOCK: usize = 128;

/// Which positions of a batch need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token (perplexity, evaluation).
    All,
    /// None (prefill of a context that is continued later).
    None,
}

/// A loaded model: the memory-mapped file and its configuration.
pub struct Model {
    pub config: Config,
    file: GgufFile,
    tok_embd: Weight,
    output_norm: Vec<f32>,
    output: Weight,
    layers: Vec<Layer>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}

impl Model {
    /// Open a GGUF file and check that it holds a complete, consistent model.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_gguf(GgufFile::open(path)?)
    }

    pub fn from_gguf(file: GgufFile) -> Result<Self, ModelError> {
        kernels::init();
        let c = Config::from_gguf(&file)?;
        let (d, v, ff) = (c.n_embd, c.n_vocab, c.n_ff);
        let (q_dim, k_dim, v_dim) = (
            c.n_head * c.head_dim,
            c.n_head_kv * c.head_dim,
            c.n_head_kv * c.head_dim_v,
        );
        // Every tensor of the file must be used: one that we silently skipped (a bias,
        // RoPE frequency factors) would make the results quietly wrong.
        let used = std::cell::RefCell::new(std::collections::HashSet::new());
        let mark = |name: &str| {
            used.borrow_mut().insert(name.to_string());
        };
        let w = |name: &str, cols: usize, rows: usize| {
            mark(name);
            weight(&file, name, cols, rows)
        };
        let vector = |name: &str, n: usize| {
            mark(name);
            vector(&file, name, n)
        };
        let opt_vector = |name: &str, n: usize| -> Result<Option<Vec<f32>>, ModelError> {
            match file.tensor(name) {
                None => Ok(None),
                Some(_) => vector(name, n).map(Some),
            }
        };
        // A tensor the variant needs, or (when `cond` is false) none at all.
        let required_if =
            |cond: bool, name: &str, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
                if cond {
                    vector(name, len).map(Some)
                } else {
                    Ok(None)
                }
            };
        let tok_embd = w("token_embd.weight", d, v)?;
        let output = match file.tensor("output.weight") {
            Some(_) => w("output.weight", d, v)?,
            None => tok_embd.clone(),
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for il in 0..c.n_layer {
            let n = |s: &str| format!("blk.{il}.{s}");
            layers.push(Layer {
                attn_norm: vector(&n("attn_norm.weight"), d)?,
                wq: w(&n("attn_q.weight"), d, q_dim)?,
                wk: w(&n("attn_k.weight"), d, k_dim)?,
                wv: w(&n("attn_v.weight"), d, v_dim)?,
                wo: w(&n("attn_output.weight"), c.n_head * c.head_dim_v, d)?,
                // Projection biases are optional in every architecture, as in llama.cpp.
                bq: opt_vector(&n("attn_q.bias"), q_dim)?,
                bk: opt_vector(&n("attn_k.bias"), k_dim)?,
                bv: opt_vector(&n("attn_v.bias"), v_dim)?,
                bo: opt_vector(&n("attn_output.bias"), d)?,
                q_norm: required_if(c.qk_norm, &n("attn_q_norm.weight"), c.head_dim)?,
                k_norm: required_if(c.qk_norm, &n("attn_k_norm.weight"), c.head_dim)?,
                post_attn_norm: required_if(c.post_norms, &n("post_attention_norm.weight"), d)?,
                ffn_norm: vector(&n("ffn_norm.weight"), d)?,
                ffn_gate: w(&n("ffn_gate.weight"), d, ff)?,
                ffn_up: w(&n("ffn_up.weight"), d, ff)?,
                ffn_down: w(&n("ffn_down.weight"), ff, d)?,
                post_ffn_norm: required_if(c.post_norms, &n("post_ffw_norm.weight"), d)?,
            });
        }
        let output_norm = vector("output_norm.weight", d)?;
        let used = used.into_inner();
        if let Some(t) = file.tensors().iter().find(|t| !used.contains(&t.name)) {
            return Err(ModelError::UnsupportedTensor {
                name: t.name.clone(),
                arch: c.arch.name(),
            });
        }
        Ok(Self {
            output_norm,
            tok_embd,
            output,
            layers,
            config: c,
            file,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The shape of a KV cache for this model.
    pub fn kv_shape(&self) -> KvShape {
        let c = &self.config;
        KvShape {
            n_layer: c.n_layer,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            head_dim_v: c.head_dim_v,
            windows: (0..c.n_layer)
                .map(|il| c.is_swa(il).then_some(c.sliding_window).flatten())
                .collect(),
        }
    }

    /// A fresh, empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.kv_shape())
    }

    fn mat(&self, w: &Weight) -> QMatrix<'_> {
        let data = self
            .file
            .tensor_bytes(w.offset, w.n_bytes)
            .expect("weight bounds were checked at load");
        QMatrix {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            data,
        }
    }

    /// Run `tokens` (positions continuing the cache) through the model, appending
    /// their keys and values to `cache`. Returns logits as rows of `n_vocab`: one row
    /// for [`Logits::Last`], one per token for [`Logits::All`], none for
    /// [`Logits::None`].
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        n_ctx: usize,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_observed(tokens, cache, logits, n_ctx, None, None)
    }

    /// [`Model::forward`], and with a `probe`, also score the entries of every
    /// evictable layer by the attention they receive (see [`kv::observe`]); with
    /// `attn_input`, also hand every layer's attention input (the `attn_norm` output,
    /// `n` rows of `n_embd`) to that function, with the layer index: the Fast KVzip
    /// gates read it. Neither changes any output: eviction uses them, the model does
    /// not.
    pub fn forward_observed<'a>(
        &self,
        tokens: &'a [u32],
        cache: &'a mut KvCache,
        logits: Logits,
        n_ctx: usize,
        probe: Option<&'a Probe>,
        attn_input: Option<AttnInputTap<'a>>,
    ) -> Result<Vec<f32>, ModelError> {
        let mut seq = [Sequence {
            tokens,
            cache,
            logits,
            n_ctx,
            probe,
            attn_input,
        }];
        Ok(self.forward_batch(&mut seq)?.pop().unwrap_or_default())
    }

    /// Run several sequences, each continuing its own cache, through the model in one
    /// pass: the weights are read once for all their tokens (a server decoding one
    /// token for each of its conversations). Returns each sequence's logits as
    /// [`Model::forward_observed`] would. Every product and attention is per token,
    /// so each sequence's results are bit-identical to running it alone.
    pub fn forward_batch(&self, seqs: &mut [Sequence<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.config;
        for s in seqs.iter() {
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
                return Err(ModelError::BadToken(bad));
            }
            if s.cache.n_seen() + s.tokens.len() > s.n_ctx {
                return Err(ModelError::ContextFull {
                    needed: s.cache.n_seen() + s.tokens.len(),
                    n_ctx: s.n_ctx,
                });
            }
        }
        // Sequence i holds rows spans[i] of every activation matrix.
        let mut spans = Vec::with_capacity(seqs.len());
        let mut n = 0;
        for s in seqs.iter() {
            spans.push(n..n + s.tokens.len());
            n += s.tokens.len();
        }
        if n == 0 {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
        let d = c.n_embd;
        let (nh, nkv, hd, hdv) = (c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v);
        let pos: Vec<u32> = seqs
            .iter()
            .flat_map(|s| (0..s.tokens.len()).map(|t| (s.cache.n_seen() + t) as u32))
            .collect();

        // Token embeddings.
        let mut x = vec![0f32; n * d];
        let embd = self.mat(&self.tok_embd);
        let tokens = seqs.iter().flat_map(|s| s.tokens);
        for (row, &tok) in x.chunks_exact_mut(d).zip(tokens) {
            embd.dequantize_row(tok as usize, row);
            if let Some(s) = c.embed_scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }

        let mut xn = vec![0f32; n * d];
        let mut q = vec![0f32; n * nh * hd];
        let mut k = vec![0f32; n * nkv * hd];
        let mut v = vec![0f32; n * nkv * hdv];
        let mut attn = vec![0f32; n * nh * hdv];
        let mut o = vec![0f32; n * d];
        let mut gate = vec![0f32; n.min(FFN_BLOCK) * c.n_ff];
        let mut up = vec![0f32; n.min(FFN_BLOCK) * c.n_ff];

        for (il, l) in self.layers.iter().enumerate() {
            // Attention block.
            norm_rows(&x, &l.attn_norm, c.rms_eps, &mut xn, d);
            for (s, r) in seqs.iter_mut().zip(&spans) {
                if let Some(f) = s.attn_input.as_mut() {
                    f.attn_input(il, &xn[r.start * d..r.end * d]);
                }
            }
            matmuls(
                &mut [
                    (self.mat(&l.wq), &mut q),
                    (self.mat(&l.wk), &mut k),
                    (self.mat(&l.wv), &mut v),
                ],
                &mut Activations::new(&xn, n, d),
            );
            add_bias(&mut q, l.bq.as_deref());
            add_bias(&mut k, l.bk.as_deref());
            add_bias(&mut v, l.bv.as_deref());
            let (base, scale) = if c.is_swa(il) {
                (c.rope_base_swa, 1.0)
            } else {
                (c.rope_base, c.rope_freq_scale)
            };
            q.par_chunks_mut(nh * hd)
                .zip(k.par_chunks_mut(nkv * hd))
                .zip(&pos)
                .for_each_init(Vec::new, |angles, ((qt, kt), &p)| {
                    rope_angles(p as f32, c.n_rot, base, scale, angles);
                    for (heads, norm) in [(qt, &l.q_norm), (kt, &l.k_norm)] {
                        for head in heads.chunks_exact_mut(hd) {
                            if let Some(w) = norm {
                                rmsnorm_inplace(head, w, c.rms_eps);
                            }
                            rope_rotate(head, angles, c.rope_style);
                        }
                    }
                });
            for (s, r) in seqs.iter_mut().zip(&spans) {
                let cache = &mut *s.cache;
                let (q, pos) = (&q[r.start * nh * hd..r.end * nh * hd], &pos[r.clone()]);
                cache.append(
                    il,
                    r.len(),
                    &k[r.start * nkv * hd..r.end * nkv * hd],
                    &v[r.start * nkv * hdv..r.end * nkv * hdv],
                );
                kv::attention(
                    &cache.layers[il],
                    &cache.shape,
                    nh,
                    q,
                    pos,
                    c.attn_scale,
                    &mut attn[r.start * nh * hdv..r.end * nh * hdv],
                );
                if let Some(probe) = s.probe.filter(|_| cache.layers[il].is_evictable()) {
                    kv::observe(
                        &mut cache.layers[il],
                        &cache.shape,
                        nh,
                        q,
                        pos,
                        c.attn_scale,
                        probe,
                    );
                }
            }
            let mut acts = Activations::new(&attn, n, nh * hdv);
            matmul(&self.mat(&l.wo), &mut acts, &mut o);
            add_bias(&mut o, l.bo.as_deref());
            if let Some(w) = &l.post_attn_norm {
                o.par_chunks_mut(d)
                    .for_each(|r| rmsnorm_inplace(r, w, c.rms_eps));
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            // Feed-forward block, FFN_BLOCK tokens at a time (each token's result is
            // the same either way): its intermediate activations, the widest of the
            // layer, then take FFN_BLOCK rows of memory instead of n.
            norm_rows(&x, &l.ffn_norm, c.rms_eps, &mut xn, d);
            for t0 in (0..n).step_by(FFN_BLOCK) {
                let m = FFN_BLOCK.min(n - t0);
                let (gate, up) = (&mut gate[..m * c.n_ff], &mut up[..m * c.n_ff]);
                matmuls(
                    &mut [
                        (self.mat(&l.ffn_gate), &mut *gate),
                        (self.mat(&l.ffn_up), &mut *up),
                    ],
                    &mut Activations::new(&xn[t0 * d..(t0 + m) * d], m, d),
                );
                gate.par_chunks_mut(c.n_ff)
                    .zip(up.par_chunks(c.n_ff))
                    .for_each(|(g, u)| match c.activation {
                        Activation::SwiGlu => kernels::swiglu(g, u),
                        Activation::GeGlu => kernels::geglu(g, u),
                    });
                matmul(
                    &self.mat(&l.ffn_down),
                    &mut Activations::new(gate, m, c.n_ff),
                    &mut o[t0 * d..(t0 + m) * d],
                );
            }
            if let Some(w) = &l.post_ffn_norm {
                o.par_chunks_mut(d)
                    .for_each(|r| rmsnorm_inplace(r, w, c.rms_eps));
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.tokens.len());
        }

        // Output head, only for the rows that need logits, all sequences together.
        let wanted: Vec<std::ops::Range<usize>> = seqs
            .iter()
            .zip(&spans)
            .map(|(s, r)| match s.logits {
                Logits::None => r.end..r.end,
                Logits::Last => r.end.saturating_sub(1).max(r.start)..r.end,
                Logits::All => r.clone(),
            })
            .collect();
        let rows: Vec<f32> = wanted
            .iter()
            .flat_map(|r| &x[r.start * d..r.end * d])
            .copied()
            .collect();
        let m = rows.len() / d;
        if m == 0 {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
        let mut normed = vec![0f32; m * d];
        norm_rows(&rows, &self.output_norm, c.rms_eps, &mut normed, d);
        let mut out = vec![0f32; m * c.n_vocab];
        matmul(
            &self.mat(&self.output),
            &mut Activations::new(&normed, m, d),
            &mut out,
        );
        if let Some(cap) = c.final_softcap {
            out.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        let mut at = 0;
        Ok(wanted
            .iter()
            .map(|r| {
                let len = r.len() * c.n_vocab;
                at += len;
                out[at - len..at].to_vec()
            })
            .collect())
    }
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], d: usize) {
    x.par_chunks(d)
        .zip(out.par_chunks_mut(d))
        .for_each(|(xr, or)| rmsnorm(xr, w, eps, or));
}

fn add_bias(x: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in x.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, bv)| *v += bv);
        }
    }
}

/// A 2-D weight `name` with rows of `cols` values and `rows` rows.
fn weight(f: &GgufFile, name: &str, cols: usize, rows: usize) -> Result<Weight, ModelError> {
    let t = f
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    let dims = &t.info.dims;
    let ok = dims.len() == 2 && dims[0] == cols && dims[1] == rows
        || dims.len() == 1 && rows == 1 && dims[0] == cols;
    if !ok {
        return Err(ModelError::BadShape {
            name: name.to_string(),
            expected: vec![cols, rows],
            got: dims.clone(),
        });
    }
    Ok(Weight {
        ty: t.info.ty,
        rows,
        cols,
        offset: t.info.offset,
        n_bytes: t.info.n_bytes,
    })
}

/// A 1-D tensor of `n` values, converted to f32.
fn vector(f: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let w = weight(f, name, n, 1)?;
    let mut out = vec![0f32; n];
    let data = f
        .tensor_bytes(w.offset, w.n_bytes)
        .expect("bounds checked at open");
    w.ty.to_f32(data, &mut out);
    Ok(out)
}
