//! Hyper-parameters and architecture differences, read from GGUF metadata.
//!
//! One decoder serves every supported architecture; this file is the only place that
//! knows how they differ. A missing or inconsistent hyper-parameter is an error, never
//! a guess (defaults are used only where llama.cpp documents one).
use crate::gguf::GgufFile;
use crate::kernels::RopeStyle;

use super::ModelError;

/// The most layers a model may have: llama.cpp's `LLAMA_MAX_LAYERS`. Checked before
/// anything is sized by the block count.
pub const MAX_LAYERS: usize = 512;

/// The supported architectures (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" => Self::Gemma3,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// silu(gate) * up
    SwiGlu,
    /// gelu_tanh(gate) * up
    GeGlu,
}

/// Everything the forward pass needs to know about a model's shape and variant.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Dimension of each key (and query) head.
    pub head_dim: usize,
    /// Dimension of each value head.
    pub head_dim_v: usize,
    pub n_ff: usize,
    /// Context length the model was trained with.
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    /// Dimensions rotated by RoPE (usually all of `head_dim`).
    pub n_rot: usize,
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (Gemma 3's local layers).
    pub rope_base_swa: f32,
    /// Linear RoPE scaling of full-attention layers (positions are multiplied by it).
    pub rope_freq_scale: f32,
    pub rope_style: RopeStyle,
    /// Sliding-window size, if the model has sliding-window layers.
    pub sliding_window: Option<usize>,
    /// Per layer: true where the layer uses the sliding window.
    pub swa_layers: Vec<bool>,
    /// RMSNorm of each query and key head before RoPE (qwen3, gemma3).
    pub qk_norm: bool,
    /// RMSNorm after attention and after the FFN, before the residual add (gemma3).
    pub post_norms: bool,
    pub activation: Activation,
    /// Scale applied to token embeddings (gemma3: sqrt(n_embd)).
    pub embed_scale: Option<f32>,
    /// Scale of the query before the attention dot product.
    pub attn_scale: f32,
    /// Final logit soft-capping (`logits = c * tanh(logits / c)`), if any.
    pub final_softcap: Option<f32>,
}

impl Config {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch_name = f.require_str("general.architecture")?;
        let arch = Arch::from_name(arch_name)
            .ok_or_else(|| ModelError::UnsupportedArch(arch_name.to_string()))?;
        let a = arch_name;
        let key = |k: &str| format!("{a}.{k}");
        let req = |k: &str| -> Result<usize, ModelError> {
            let v = f.require_u64(&key(k))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v <= 1 << 24)
                .ok_or_else(|| ModelError::BadConfig(format!("{} = {v} is out of range", key(k))))
        };
        let opt = |k: &str| -> Result<Option<usize>, ModelError> {
            match f.value(&key(k)) {
                None => Ok(None),
                Some(_) => req(k).map(Some),
            }
        };

        let n_embd = req("embedding_length")?;
        let n_layer = req("block_count")?;
        if n_layer > MAX_LAYERS {
            return Err(ModelError::BadConfig(format!(
                "{} = {n_layer}: at most {MAX_LAYERS} layers are supported (as in llama.cpp)",
                key("block_count")
            )));
        }
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt("attention.head_count_kv")?.unwrap_or(n_head);
        let n_ff = req("feed_forward_length")?;
        let n_ctx_train = req("context_length")?;
        if n_head % n_head_kv != 0 {
            return Err(ModelError::BadConfig(format!(
                "{n_head} query heads are not a multiple of {n_head_kv} KV heads"
            )));
        }
        let head_dim = opt("attention.key_length")?.unwrap_or(n_embd / n_head);
        let head_dim_v = opt("attention.value_length")?.unwrap_or(head_dim);
        if head_dim % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "head dimension {head_dim} is odd"
            )));
        }
        let n_rot = opt("rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "RoPE dimension {n_rot} does not fit head dimension {head_dim}"
            )));
        }
        let rms_eps = f.require_f32(&key("attention.layer_norm_rms_epsilon"))?;
        if !(rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(ModelError::BadConfig(format!(
                "RMS epsilon {rms_eps} is out of range"
            )));
        }
        let positive = |k: &str, default: f32| -> Result<f32, ModelError> {
            match f.value(&key(k)) {
                None => Ok(default),
                Some(_) => {
                    let v = f.require_f32(&key(k))?;
                    if v.is_finite() && v > 0.0 {
                        Ok(v)
                    } else {
                        Err(ModelError::BadConfig(format!(
                            "{} = {v} is out of range",
                            key(k)
                        )))
                    }
                }
            }
        };
        let rope_base = positive("rope.freq_base", 10000.0)?;
        let rope_freq_scale = match f.get_str(&key("rope.scaling.type")) {
            None | Some("none") => 1.0,
            Some("linear") => 1.0 / positive("rope.scaling.factor", 1.0)?,
            Some(other) => {
                return Err(ModelError::BadConfig(format!(
                    "RoPE scaling '{other}' is not supported (supported: none, linear)"
                )))
            }
        };

        let n_vocab = f
            .get_array("tokenizer.ggml.tokens")
            .map(|t| t.len())
            .or_else(|| opt("vocab_size").ok().flatten())
            .ok_or_else(|| ModelError::BadConfig("no vocabulary (tokenizer.ggml.tokens)".into()))?;

        let mut cfg = Config {
            arch,
            n_vocab,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            head_dim_v,
            n_ff,
            n_ctx_train,
            rms_eps,
            n_rot,
            rope_base,
            rope_base_swa: rope_base,
            rope_freq_scale,
            rope_style: RopeStyle::Neox,
            sliding_window: None,
            swa_layers: vec![false; n_layer],
            qk_norm: false,
            post_norms: false,
            activation: Activation::SwiGlu,
            embed_scale: None,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            final_softcap: None,
        };
        match arch {
            Arch::Llama => cfg.rope_style = RopeStyle::Normal,
            // NeoX RoPE (the default); its Q/K/V biases are loaded where present.
            Arch::Qwen2 => {}
            Arch::Qwen3 => cfg.qk_norm = true,
            Arch::Gemma3 => {
                cfg.qk_norm = true;
                cfg.post_norms = true;
                cfg.activation = Activation::GeGlu;
                cfg.embed_scale = Some((n_embd as f32).sqrt());
                if let Some(window) = opt("attention.sliding_window")? {
                    // Every 6th layer is global unless the file says otherwise.
                    let pattern = opt("attention.sliding_window_pattern")?.unwrap_or(6);
                    cfg.sliding_window = Some(window);
                    cfg.swa_layers = (0..n_layer).map(|il| il % pattern < pattern - 1).collect();
                    cfg.rope_base_swa = positive("rope.freq_base_swa", 10000.0)?;
                }
                if let Some(c) = f
                    .get_f32(&key("final_logit_softcapping"))
                    .filter(|&c| c > 0.0)
                {
                    cfg.final_softcap = Some(c);
                }
            }
        }
        Ok(cfg)
    }

    /// Query heads per KV head.
    pub fn n_gqa(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    /// Whether layer `il` attends only within the sliding window.
    pub fn is_swa(&self, il: usize) -> bool {
        self.swa_layers[il]
    }

    /// Bytes of f16 keys and values one token adds to one layer's cache.
    pub fn kv_bytes_per_token_layer(&self) -> usize {
        self.n_head_kv * (self.head_dim + self.head_dim_v) * 2
    }
}
