//! `fastkv perplexity`: llama.cpp's perplexity method on a text file.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::{CtxArgs, ModelArgs};
use crate::eval;
use crate::session::Session;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub ctx: CtxArgs,
    /// Text file to score (e.g. wikitext-2-raw/wiki.test.raw).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Score at most this many chunks of -c tokens.
    #[arg(long = "chunks")]
    pub chunks: Option<usize>,
    /// Write the result as JSON to this file.
    #[arg(long = "json")]
    pub json: Option<PathBuf>,
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    let l = a.model.load()?;
    let n_ctx = a.ctx.n_ctx(&l.model);
    let tokens = l.tokenizer.encode(&text, l.tokenizer.add_bos(), false);
    let bos = if l.tokenizer.add_bos() {
        l.tokenizer.bos()
    } else {
        None
    };
    let available = tokens.len() / n_ctx;
    let n_chunks = a.chunks.map_or(available, |c| c.min(available));
    eprintln!(
        "perplexity: {} tokens, {n_chunks} chunks of {n_ctx}",
        tokens.len()
    );
    let mut session = Session::new(&l.model, n_ctx);
    let start = std::time::Instant::now();
    // The running estimate after each chunk, as llama-perplexity prints it.
    let mut out = std::io::stdout();
    let r = eval::perplexity_reporting(
        &tokens,
        n_ctx,
        a.chunks,
        bos,
        l.model.config.n_vocab,
        |i, chunk| {
            session.clear();
            let logits = session.feed_all_logits(chunk)?;
            if i == 0 {
                let s = start.elapsed().as_secs_f64();
                eprintln!(
                    "perplexity: {s:.2} s per chunk, about {:.1} min in all",
                    s * n_chunks as f64 / 60.0
                );
            }
            Ok(logits)
        },
        |i, estimate| {
            let sep = if i == 0 { "" } else { "," };
            // A closed pipe must not stop the run; the result still goes to --json.
            let _ = write!(out, "{sep}[{}]{estimate:.4}", i + 1).and_then(|()| out.flush());
        },
    )?;
    println!();
    println!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_err);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
