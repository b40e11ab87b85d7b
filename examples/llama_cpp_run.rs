//! llama.cpp's side of the peak-memory comparison (`benches/peak_rss.py`): what
//! `fastkv run -m MODEL -c CTX -f FILE -n N --temp 0 -t T` does (load the model,
//! tokenize the file, prefill in batches of 512, decode greedily), through llama.cpp
//! built from the same ggml source (the `ggml-sys` crate), flash attention on as in
//! llama.cpp's CPU default. Prints the same figures as `fastkv run --stats-json`:
//! prompt and generated tokens, and the process's peak resident set size.
//!
//! Usage: `llama_cpp_run MODEL CTX FILE N_PREDICT THREADS`
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
    let generated = ctx
        .generate_greedy(&prompt, n_predict)
        .map_err(|e| anyhow!(e))?;
    println!(
        "{}",
        serde_json::json!({
            "n_prompt": prompt.len(),
            "n_gen": generated.len(),
            "peak_rss_bytes": fastkv::cli::peak_rss_bytes(),
        })
    );
    Ok(())
}
