//! `fastkv inspect`: what a GGUF file holds.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::gguf::GgufFile;
use crate::model::Config;
use crate::tokenizer::{ChatTemplate, Tokenizer};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// GGUF file (default: the default model).
    #[arg(short = 'm', long = "model", env = "FASTKV_ARG_MODEL")]
    pub model: Option<PathBuf>,
    /// The GGUF file, positionally (as earlier versions took it; same as -m).
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub file: Option<PathBuf>,
    /// Also list every metadata key (long arrays abbreviated).
    #[arg(long)]
    pub metadata: bool,
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let path = super::resolve_model(a.model.as_deref().or(a.file.as_deref()))?;
    let f = GgufFile::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    println!(
        "file: {} (GGUF v{}, {} bytes)",
        path.display(),
        f.version(),
        f.file_len()
    );
    println!("name: {}", f.get_str("general.name").unwrap_or("?"));
    match Config::from_gguf(&f) {
        Ok(c) => {
            println!("architecture: {}", c.arch.name());
            println!(
                "hyper-parameters: n_vocab {}, n_embd {}, n_layer {}, n_head {}, n_head_kv {}, head_dim {}/{}, n_ff {}, n_ctx_train {}",
                c.n_vocab, c.n_embd, c.n_layer, c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v, c.n_ff, c.n_ctx_train
            );
            println!(
                "rope: {:?}, base {}, dims {}{}; rms_eps {:e}",
                c.rope_style,
                c.rope_base,
                c.n_rot,
                if c.sliding_window.is_some() {
                    format!(", base of local layers {}", c.rope_base_swa)
                } else {
                    String::new()
                },
                c.rms_eps
            );
            if let Some(w) = c.sliding_window {
                let local = c.swa_layers.iter().filter(|&&s| s).count();
                println!(
                    "sliding window: {w} tokens in {local} of {} layers",
                    c.n_layer
                );
            }
            println!(
                "variant: qk_norm {}, post_norms {}, activation {:?}, embed_scale {:?}",
                c.qk_norm, c.post_norms, c.activation, c.embed_scale
            );
            println!(
                "KV cache: {} bytes per token",
                c.kv_bytes_per_token_layer() * c.n_layer
            );
        }
        Err(e) => println!("architecture: not runnable by fastkv ({e})"),
    }
    match Tokenizer::from_gguf(&f) {
        Ok(t) => println!(
            "tokenizer: {}, {} tokens, bos {:?}, eos {:?}, add_bos {}",
            t.kind(),
            t.n_vocab(),
            t.bos(),
            t.eos(),
            t.add_bos()
        ),
        Err(e) => println!("tokenizer: unusable ({e})"),
    }
    // The names --chat-template takes.
    let templates = ChatTemplate::names_in_gguf(&f);
    println!(
        "chat templates: {}",
        if templates.is_empty() {
            "none".to_string()
        } else {
            templates.join(", ")
        }
    );
    if a.metadata {
        println!("\nmetadata:");
        for k in f.keys() {
            let v = format!("{:?}", f.value(k).expect("key listed"));
            let short: String = v.chars().take(120).collect();
            println!(
                "  {k} = {short}{}",
                if v.len() > short.len() { " ..." } else { "" }
            );
        }
    }
    println!(
        "\n{:<40} {:>6} {:>20} {:>12}",
        "tensor", "type", "shape", "bytes"
    );
    let mut total = 0usize;
    for t in f.tensors() {
        let shape = t
            .dims
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(" x ");
        println!(
            "{:<40} {:>6} {:>20} {:>12}",
            t.name,
            t.ty.name(),
            shape,
            t.n_bytes
        );
        total += t.n_bytes;
    }
    let params: usize = f.tensors().iter().map(|t| t.n_elements()).sum();
    println!(
        "{} tensors, {} parameters, {} bytes ({:.1} MiB)",
        f.tensors().len(),
        params,
        total,
        total as f64 / (1 << 20) as f64
    );
    Ok(())
}
