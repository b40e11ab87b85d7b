//! `fastkv run`: one prompt, streamed generation, then speed and memory figures.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{generate, print_piece, GenStats, ModelArgs, SamplingArgs};
use crate::sampling::Sampler;
use crate::session::Session;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompt text (taken literally: no backslash unescaping).
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Number of tokens to generate (-1 = until end of generation or a full context).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// Write prompt/generation speed and memory figures to this file as JSON.
    #[arg(long = "stats-json")]
    pub stats_json: Option<PathBuf>,
    /// Do not echo the prompt before the generated text.
    #[arg(long = "no-display-prompt")]
    pub no_display_prompt: bool,
}

pub fn run(a: RunArgs) -> Result<()> {
    let prompt = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read prompt file {}", f.display()))?,
        (None, None) => String::new(),
    };
    let n_predict = match a.n_predict {
        n if n < -1 => bail!("-n must be -1 or a count of tokens, got {n}"),
        -1 => None,
        n => Some(n as usize),
    };
    let params = a.sampling.params()?;
    let l = a.model.load()?;
    let mut session = Session::new(&l.model, a.model.n_ctx(&l.model));
    let mut tokens = l.tokenizer.encode(&prompt, true, true);
    if tokens.is_empty() {
        // Nothing to condition on: start from BOS, as llama.cpp does.
        tokens.extend(l.tokenizer.bos());
        if tokens.is_empty() {
            bail!("the prompt is empty and the model has no BOS token to start from");
        }
    }
    if tokens.len() >= session.n_ctx() {
        bail!(
            "the prompt has {} tokens but the context holds {} (raise -c)",
            tokens.len(),
            session.n_ctx()
        );
    }
    let mut out = std::io::stdout().lock();
    if !a.no_display_prompt {
        write!(out, "{prompt}")?;
        out.flush()?;
    }
    let mut sampler = Sampler::new(params);
    let mut stats = GenStats::default();
    generate(
        &mut session,
        &l.tokenizer,
        &mut sampler,
        &tokens,
        n_predict,
        &mut stats,
        |piece| print_piece(&mut out, piece),
    )?;
    writeln!(out)?;
    stats.print();
    if let Some(path) = &a.stats_json {
        let json = serde_json::to_string_pretty(&stats)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
