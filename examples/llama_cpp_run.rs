//! llama.cpp's side of the peak-memory comparison (`benches/peak_rss.py`): what
//! `fastkv run -m MODEL -c CTX -f FILE -n N --temp 0 -t T` does (load the model,
//! tokenize the file, prefill in batches of 512, decode greedily), through llama.cpp
//! built from the same ggml source (the `ggml-sys` crate), flash attention on as in
//! llama.cpp's CPU default. Prints the same figures as `fastkv run --stats-json`:
//! prompt and generated tokens, and the process's peak resident set size.
//!
//! Usage: `llama_cpp_run MODEL CTX FILE N_PREDICT THREADS`
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ggml_sys::reference::{RefContext, RefContextParams, RefModel};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, ctx, file, n_predict, threads] = args.as_slice() else {
        bail!("usage: llama_cpp_run MODEL CTX FILE N_PREDICT THREADS");
    };
    let n_ctx: u32 = ctx.parse().context("CTX must be a number")?;
    let n_predict: usize = n_predict.parse().context("N_PREDICT must be a number")?;
    let n_threads: i32 = threads.parse().context("THREADS must be a number")?;
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;

    let model = RefModel::load(std::path::Path::new(model), false).map_err(|e| anyhow!(e))?;
    let prompt = model.tokenize(&text, true, false);
    if prompt.len() + n_predict > n_ctx as usize {
        bail!(
            "{} prompt tokens + {n_predict} do not fit a context of {n_ctx}",
            prompt.len()
        );
    }
    let params = RefContextParams {
        n_ctx,
        n_batch: 512,
        n_threads,
        flash_attn: true,
    };
    let mut ctx = RefContext::new(&model, params).map_err(|e| anyhow!(e))?;
    let t = Instant::now();
    let mut logits = ctx.eval(&prompt, false).map_err(|e| anyhow!(e))?;
    let prompt_s = t.elapsed().as_secs_f64();
    // Greedy decoding, timed as `fastkv run` times it: the steps that run a token.
    let (mut n_gen, mut decoded, mut gen_s) = (0usize, 0usize, 0f64);
    while n_gen < n_predict {
        let next = fastkv::kernels::argmax(&logits) as i32;
        if model.is_eog(next) {
            break;
        }
        n_gen += 1;
        if n_gen == n_predict {
            break;
        }
        let t = Instant::now();
        logits = ctx.eval(&[next], false).map_err(|e| anyhow!(e))?;
        gen_s += t.elapsed().as_secs_f64();
        decoded += 1;
    }
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    println!(
        "{}",
        serde_json::json!({
            "n_prompt": prompt.len(),
            "n_gen": n_gen,
            "prompt_tps": rate(prompt.len(), prompt_s),
            "gen_tps": rate(decoded, gen_s),
            "peak_rss_bytes": fastkv::cli::peak_rss_bytes(),
        })
    );
    Ok(())
}
