//! `fastkv train-gates`: Fast KVzip gates for a model, trained on a text corpus with
//! forward passes only (stage A: features and teacher scores; stage B: SGD).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{note, progress, ModelArgs, TemplateArgs};
use crate::eval::harness::PromptFormat;
use crate::gate::train::{self, FeatureFiles, StageA, TrainConfig, AGREE_AT};
use crate::gate::{gated_layers, GateMeta, GateShape, Gates, TrainingInfo};
use crate::session::TeacherPrompt;

/// Feature files are kept under this size unless --sample-every says otherwise.
const FEATURE_BUDGET_BYTES: usize = 4 << 30;

#[derive(Args, Debug)]
pub struct TrainGatesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Training text: a file, or a directory whose files are all read. Never the
    /// text you evaluate on.
    #[arg(long = "corpus")]
    pub corpus: PathBuf,
    /// Gate file to write [default: models/<model file stem>.gates.gguf].
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Directory for stage A's features; an unfinished stage A there resumes
    /// [default: <out>.work].
    #[arg(long = "work")]
    pub work: Option<PathBuf>,
    /// Tokens per training document (1024-8192 fit the reference models).
    #[arg(long = "doc-tokens", default_value_t = 1024)]
    pub doc_tokens: usize,
    /// Use at most this many corpus tokens [default: all].
    #[arg(long = "max-tokens")]
    pub max_tokens: Option<usize>,
    /// Keep the features of every K-th token [default: 1, or what keeps them under 4 GiB].
    #[arg(long = "sample-every")]
    pub sample_every: Option<usize>,
    /// SGD steps [default: five passes over the kept tokens, 300..5000].
    #[arg(long = "steps")]
    pub steps: Option<usize>,
    /// Token positions per step.
    #[arg(long = "batch", default_value_t = 1000)]
    pub batch: usize,
    /// Peak learning rate (SGD, momentum 0.9, warm-up 50 steps, x0.5 at 50%, x0.25 at 75%).
    #[arg(long = "lr", default_value_t = 0.2)]
    pub lr: f32,
    /// Seed of the initialisation and of the batch order.
    #[arg(short = 's', long = "seed", default_value_t = 0)]
    pub seed: u64,
    /// Report validation every this many steps.
    #[arg(long = "eval-every", default_value_t = 250)]
    pub eval_every: usize,
}

pub fn train_gates(a: TrainGatesArgs) -> Result<()> {
    if a.doc_tokens < 64 {
        bail!("--doc-tokens must be at least 64");
    }
    if a.batch == 0 || a.steps == Some(0) || a.sample_every == Some(0) {
        bail!("--batch, --steps and --sample-every must be at least 1");
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("--lr must be a positive number");
    }
    if !a.corpus.exists() {
        bail!("the corpus {} does not exist", a.corpus.display());
    }
    let l = a.model.load()?;
    let model = &l.model;
    let out = match &a.out {
        Some(p) => p.clone(),
        None => default_gate_path(&l.path),
    };
    let work = a
        .work
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.work", out.display())));
    let t_all = Instant::now();

    // Documents, and the prompt they are fed in (the one `eval` questions use).
    let template = l.template(&a.template)?;
    let format = PromptFormat::new(&l.tokenizer, &template, None)?;
    let teacher = TeacherPrompt::new(&l.tokenizer, &template)?;
    let doc_tokens = a.doc_tokens.min(model.config.n_ctx_train / 2);
    let docs = train::corpus_documents(&a.corpus, &l.tokenizer, doc_tokens, a.max_tokens)?;
    let n_tokens: usize = docs.iter().map(Vec::len).sum();
    if docs.is_empty() {
        bail!(
            "the corpus {} holds no document of at least {} tokens",
            a.corpus.display(),
            doc_tokens / 4
        );
    }
    let layers = gated_layers(model);
    let row_bytes = layers.len() * model.config.n_embd * 2;
    let sample_every = a
        .sample_every
        .unwrap_or_else(|| (n_tokens * row_bytes).div_ceil(FEATURE_BUDGET_BYTES).max(1));
    eprintln!(
        "corpus: {} documents, {n_tokens} tokens ({}); {} gated layers; features of {} \
         kept: {:.2} GiB in {}",
        docs.len(),
        a.corpus.display(),
        layers.len(),
        if sample_every == 1 {
            "every token".to_string()
        } else {
            format!("1 token in {sample_every}")
        },
        (n_tokens / sample_every * row_bytes) as f64 / (1u64 << 30) as f64,
        work.display()
    );
    let template_name = if format.chat {
        "chat template"
    } else {
        "plain"
    };
    let stage = StageA {
        prefix: format.head().to_vec(),
        teacher,
        sample_every,
        corpus: a.corpus.display().to_string(),
        doc_tokens,
    };

    // Stage A.
    if let Some(p) = train::StageAProgress::load(&work).filter(|p| p.docs_done > 0) {
        eprintln!(
            "stage A: {} holds {} of {} documents from an earlier run; those with the same \
             model, corpus and settings are reused",
            work.display(),
            p.docs_done,
            p.n_docs
        );
    }
    let t_a = Instant::now();
    let pb = progress(n_tokens as u64, "stage A");
    let prog = train::collect(model, &docs, &work, &stage, |p| {
        pb.set_position(p.corpus_tokens as u64);
        if pb.is_hidden() && (p.docs_done % 20 == 0 || p.complete()) {
            note(
                &pb,
                format!(
                    "stage A: {}/{} documents, {} tokens, {:.0} s",
                    p.docs_done,
                    p.n_docs,
                    p.corpus_tokens,
                    t_a.elapsed().as_secs_f64()
                ),
            );
        }
    })?;
    pb.finish_and_clear();
    let stage_a_s = t_a.elapsed().as_secs_f64();
    eprintln!(
        "stage A: {} documents, {} tokens scored, {} kept, in {stage_a_s:.0} s",
        prog.n_docs, prog.corpus_tokens, prog.kept
    );

    // Stage B.
    let files = FeatureFiles::open(&work)?;
    let n_train = files.progress.kept - files.progress.kept / train::VAL_EVERY;
    let cfg = TrainConfig {
        steps: a
            .steps
            .unwrap_or_else(|| TrainConfig::steps_for(n_train, a.batch)),
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        eval_every: a.eval_every,
        ..TrainConfig::default()
    };
    let t_b = Instant::now();
    let pb = progress(cfg.steps as u64, "stage B");
    let shape = GateShape::for_model(&model.config);
    let trained = train::train(files.view(), &layers, shape, &cfg, |p| {
        pb.set_position(p.step as u64);
        if let Some(v) = p.val {
            note(
                &pb,
                format!(
                    "step {:>5}/{} lr {:.3}  train loss {:.4}  val loss {:.4}  val agreement {:.4}",
                    p.step, p.steps, p.lr, p.train_loss, v.loss, v.agreement
                ),
            );
        }
    })?;
    pb.finish_and_clear();
    let stage_b_s = t_b.elapsed().as_secs_f64();

    let mut meta = GateMeta::for_model(model, &l.path);
    meta.training = TrainingInfo {
        template: template_name.to_string(),
        corpus: stage.corpus.clone(),
        n_docs: prog.n_docs as u64,
        doc_tokens: doc_tokens as u64,
        corpus_tokens: prog.corpus_tokens as u64,
        feature_tokens: prog.kept as u64,
        sample_every: sample_every as u64,
        steps: cfg.steps as u64,
        batch: cfg.batch as u64,
        seed: cfg.seed,
        val_tokens: trained.n_val as u64,
        val_loss: trained.val.loss as f32,
        val_agreement: trained.val.agreement as f32,
    };
    let gates = Gates::new(meta, model.config.n_layer, trained.gates);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    gates
        .save(&out)
        .with_context(|| format!("cannot write {}", out.display()))?;

    println!("| layer | val loss | val agreement (threshold {AGREE_AT}) |");
    println!("|---|---|---|");
    for (il, m) in &trained.per_layer {
        println!("| {il} | {:.4} | {:.4} |", m.loss, m.agreement);
    }
    println!(
        "| all | {:.4} | {:.4} |",
        trained.val.loss, trained.val.agreement
    );
    eprintln!(
        "wrote {} ({} gated layers, {} parameters); {} training and {} validation tokens; \
         stage A {stage_a_s:.0} s, stage B {stage_b_s:.0} s, total {:.0} s",
        out.display(),
        layers.len(),
        layers.len() * shape.n_params(),
        trained.n_train,
        trained.n_val,
        t_all.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `models/<model file stem>.gates.gguf` next to the model file.
pub fn default_gate_path(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    model
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("{stem}{}", crate::gate::GATE_SUFFIX))
}
