//! `fastkv run`: one prompt, streamed generation, then speed and memory figures.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{
    generate, print_compression, print_piece, CtxArgs, GenStats, KvArgs, ModelArgs, PrefillBar,
    SamplingArgs,
};
use crate::sampling::Sampler;
use crate::session::Session;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub ctx: CtxArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// A document to read and compress (per the --kv-* flags) before the prompt is
    /// seen; the prompt then asks about it.
    #[arg(long = "context-file")]
    pub context_file: Option<PathBuf>,
    /// Save the context (compressed, after --context-file; else the whole
    /// conversation after generation) to this file.
    #[arg(long = "save-context")]
    pub save_context: Option<PathBuf>,
    /// Start from a context saved with --save-context (same model).
    #[arg(long = "load-context")]
    pub load_context: Option<PathBuf>,
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
    let mut session = Session::new(&l.model, a.ctx.n_ctx(&l.model));
    a.kv.apply(&mut session, &l, params.seed, None)?;
    if let Some(path) = &a.load_context {
        session
            .load_context(path)
            .with_context(|| format!("cannot load context {}", path.display()))?;
        eprintln!(
            "loaded context {}: {} tokens, KV cache {:.2} MiB",
            path.display(),
            session.tokens().len(),
            session.kv_bytes() as f64 / (1 << 20) as f64
        );
    }
    let mut compression = None;
    if let Some(path) = &a.context_file {
        let doc = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read context file {}", path.display()))?;
        // A document is text: special-token names in it stay text.
        let context = l.tokenizer.encode(&doc, false, false);
        let prefix: Vec<u32> = if session.tokens().is_empty() {
            l.tokenizer
                .bos()
                .filter(|_| l.tokenizer.add_bos())
                .into_iter()
                .collect()
        } else {
            Vec::new()
        };
        let total = session.tokens().len() + prefix.len() + context.len();
        if total >= session.n_ctx() {
            bail!(
                "the context file has {} tokens; with what comes before it the context needs {total}, \
                 but holds {} (raise -c)",
                context.len(),
                session.n_ctx()
            );
        }
        let mut bar = PrefillBar::new("context");
        let (_, report) =
            session.feed_context_with_progress(&prefix, &context, &mut |done, n| {
                bar.update(done, n)
            })?;
        bar.finish();
        print_compression(&report, session.eviction());
        if let Some(save) = &a.save_context {
            save_context(&mut session, save)?;
        }
        compression = Some(report);
    }
    let mut tokens = if session.tokens().is_empty() {
        l.tokenizer.encode(&prompt, true, true)
    } else {
        let mut t = session.tokens().to_vec();
        t.extend(l.tokenizer.encode(&prompt, false, true));
        t
    };
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
    let compressing = session.eviction().is_active() && session.eviction().keep < 1.0;
    if compression.is_none() && session.tokens().is_empty() && compressing {
        // A prompt under a keep ratio is compressed as it arrives, as a context file
        // is (its end stays whole in the recent window); generation then continues
        // from its last token.
        let bos = l.tokenizer.bos().filter(|_| l.tokenizer.add_bos());
        let n_prefix = usize::from(bos.is_some() && tokens.first() == bos.as_ref());
        let mut bar = PrefillBar::new("prompt");
        let (_, report) = session.feed_context_with_progress(
            &tokens[..n_prefix],
            &tokens[n_prefix..],
            &mut |done, n| bar.update(done, n),
        )?;
        bar.finish();
        print_compression(&report, session.eviction());
        compression = Some(report);
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
    stats.compression = compression;
    if let (Some(save), None) = (&a.save_context, &a.context_file) {
        save_context(&mut session, save)?;
    }
    if let Some(path) = &a.stats_json {
        let json = serde_json::to_string_pretty(&stats)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn save_context(session: &mut Session, path: &std::path::Path) -> Result<()> {
    session
        .save_context(path)
        .with_context(|| format!("cannot save the context to {}", path.display()))?;
    eprintln!(
        "saved context to {} ({} tokens)",
        path.display(),
        session.tokens().len()
    );
    Ok(())
}
