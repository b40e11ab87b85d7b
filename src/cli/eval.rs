//! `fastkv eval`: what eviction costs, against the full cache on the same model.
//! `kld` compares next-token distributions on a continuation, `niah` asks RULER-style
//! retrieval questions, `sweep` runs both over policies and keep ratios and writes
//! CSV, markdown and PNG plots.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use clap::{Args, Subcommand};

use super::{load_gates, note, progress, Format, Loaded, ModelArgs, TemplateArgs};
use crate::eval::budget::BudgetVariant;
use crate::eval::harness::Answer;
use crate::eval::report::{self, Results, Row, INFORMATIVE};
use crate::eval::tasks::{Generator, TaskKind};
use crate::eval::{Harness, Variant};
use crate::gate::find_gates;
use crate::kv::{Level, Policy};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// KL divergence, top-1 agreement and delta NLL of a continuation after a
    /// compressed context, against the full cache.
    Kld(KldArgs),
    /// RULER-style retrieval tasks (needles, variable tracking, key-value) asked after
    /// the compressed context; exact-match accuracy.
    Niah(NiahArgs),
    /// Both, over policies x keep ratios, written as CSV, markdown and PNG plots.
    Sweep(SweepArgs),
    /// A long generation under decode budgets: the full cache generates greedily and
    /// every policy x budget is teacher-forced the same tokens; KL divergence, top-1
    /// agreement and the KV bytes held, over the generation.
    Budget(BudgetArgs),
}

#[derive(Args, Debug)]
pub struct BudgetArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Text the prompt is taken from (its first --prompt tokens).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Prompt tokens before the generation.
    #[arg(long, default_value_t = 1024)]
    pub prompt: usize,
    /// Tokens generated (teacher-forced under the budgets).
    #[arg(long, default_value_t = 4096)]
    pub gen: usize,
    /// Decode budgets: pairs per (layer, KV head) list, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    pub budgets: Vec<usize>,
    /// Generated tokens per row of the per-segment tables.
    #[arg(long, default_value_t = 512)]
    pub segment: usize,
    /// Directory for budget.csv and the plots budget_kv.png and budget_kld.png.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Flags every eval command takes. Sessions use the model's training context (-c
/// is not used): contexts are sized by --ctx / --lengths.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Eviction policies to compare with the full cache, comma-separated
    /// [default: streaming,h2o,snapkv,kvzip,gated,random; gated only when gates for
    /// the model are found].
    #[arg(long, value_delimiter = ',')]
    pub policies: Option<Vec<String>>,
    /// Fast KVzip gate file for the gated policy [default: the *.gates.gguf trained
    /// for the model in its directory or models/].
    #[arg(long = "gates")]
    pub gates: Option<PathBuf>,
    /// When to compress: oneshot (prefill the whole context, then evict once, as the
    /// method papers measure; one prefill serves every variant) or chunked (the
    /// runtime's chunked prefill, one prefill per variant).
    #[arg(long, default_value = "oneshot", value_parser = SCHEDULES)]
    pub schedule: String,
    /// Selection level for every policy [default: each policy's].
    #[arg(
        long = "kv-level",
        value_parser = PossibleValuesParser::new(Level::ALL.map(Level::name)),
        ignore_case = true
    )]
    pub level: Option<String>,
    /// Recent context tokens every policy keeps whole [default: 4096 for a context of
    /// 16000 tokens or more, else 2% of it or a quarter of what is kept, the larger].
    #[arg(long = "kv-window")]
    pub window: Option<usize>,
    /// Seed of the task generators and of the random policy.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// System message for models with a chat template.
    #[arg(long, default_value = "You are a helpful assistant.")]
    pub system: String,
    /// Output format on stdout.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Md)]
    pub output: Format,
}

/// `--schedule`'s values (each a [`crate::eval::Schedule`]).
const SCHEDULES: [&str; 2] = ["oneshot", "chunked"];

#[derive(Args, Debug)]
pub struct KldArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Text file to cut documents from (e.g. wikitext-2-raw/wiki.test.raw).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Keep ratios, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.3")]
    pub keeps: Vec<f64>,
    #[command(flatten)]
    pub docs: DocArgs,
}

/// How the continuation documents are cut.
#[derive(Args, Debug, Clone)]
pub struct DocArgs {
    /// Context tokens compressed per document (comma-separated: one measurement per
    /// length).
    #[arg(long, value_delimiter = ',', default_value = "2048")]
    pub ctx: Vec<usize>,
    /// Continuation tokens teacher-forced after the context.
    #[arg(long, default_value_t = 64)]
    pub cont: usize,
    /// Documents, spread evenly over the file.
    #[arg(long, default_value_t = 8)]
    pub docs: usize,
}

/// Which retrieval tasks run, and how many samples of each.
#[derive(Args, Debug, Clone)]
pub struct TaskArgs {
    /// Tasks: single-noise, single-text, multi-key, multi-value, vt, kv.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single-noise,single-text,multi-key,multi-value,vt,kv"
    )]
    pub tasks: Vec<String>,
    /// Samples (contexts) per task and length; question depths are spread over them.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Questions per sample: that many instances of the task share one haystack and
    /// one prefill, and each is asked on its own (long contexts: most of the cost is
    /// the prefill). Questions per task = --samples x --queries.
    #[arg(long, default_value_t = 1)]
    pub queries: usize,
    /// Stop a task at a length once the full cache has answered this many of its
    /// questions and fewer than half of them correctly (uninformative: eviction can
    /// show no difference there); samples run in an order that spreads the first
    /// ones over the depths. 0: never stop.
    #[arg(long, default_value_t = 0)]
    pub stop_uninformative: usize,
}

#[derive(Args, Debug)]
pub struct NiahArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Keep ratios, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.3")]
    pub keeps: Vec<f64>,
    /// Context lengths in tokens, comma-separated (up to the model's context).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    pub lengths: Vec<usize>,
    #[command(flatten)]
    pub tasks: TaskArgs,
    /// Text that text haystacks are cut from (needed by single-text).
    #[arg(long)]
    pub haystack: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Keep ratios, comma-separated (1.0 is the full cache, always measured).
    #[arg(long, value_delimiter = ',', default_value = "0.75,0.5,0.3,0.2,0.1")]
    pub keeps: Vec<f64>,
    /// Text for the continuation measurement, and the text haystack unless
    /// --haystack is given (e.g. wikitext-2-raw/wiki.test.raw). Without it only the
    /// tasks run.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Text that text haystacks are cut from [default: -f].
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// Context lengths of the tasks, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048")]
    pub lengths: Vec<usize>,
    #[command(flatten)]
    pub tasks: TaskArgs,
    #[command(flatten)]
    pub docs: DocArgs,
    /// Directory for results.csv, results.md, results.json and the plots.
    #[arg(long, default_value = "eval-out")]
    pub out: PathBuf,
    /// A previous sweep's results.csv to add this run's rows to (rows measured again
    /// replace the earlier ones), e.g. to add a policy to a published sweep.
    #[arg(long)]
    pub merge: Option<PathBuf>,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    match a.command {
        EvalCommand::Kld(a) => {
            let (l, variants) = setup(&a.common, &a.keeps)?;
            let h = harness(&a.common, &l, &variants)?;
            let mut results = Results::default();
            let t0 = Instant::now();
            kld(&h, &l, &a.file, &a.docs, &variants, &mut results)?;
            finish(&a.common, &results.rows(), t0)
        }
        EvalCommand::Niah(a) => {
            let (l, variants) = setup(&a.common, &a.keeps)?;
            let h = harness(&a.common, &l, &variants)?;
            let text = read_optional(a.haystack.as_deref())?;
            let mut results = Results::default();
            let t0 = Instant::now();
            let spec = NiahSpec::new(&a.tasks, &a.lengths, text.as_deref(), a.common.seed)?;
            niah(&h, &l, &spec, &variants, &mut results)?;
            finish(&a.common, &results.rows(), t0)
        }
        EvalCommand::Sweep(a) => sweep(a),
        EvalCommand::Budget(a) => budget(a),
    }
}

fn budget(a: BudgetArgs) -> Result<()> {
    if a.prompt == 0 || a.gen == 0 || a.segment == 0 || a.budgets.is_empty() {
        bail!("--prompt, --gen, --segment and --budgets must be at least 1");
    }
    let (l, variants) = setup(&a.common, &[1.0])?;
    let mut policies: Vec<Policy> = variants.iter().map(|v| v.policy).collect();
    if a.common.policies.is_none() {
        // The default list, less what cannot run under a budget (kvzip) and the floor.
        policies.retain(|p| p.scores_incrementally() && *p != Policy::Random);
    }
    if let Some(p) = policies.iter().find(|p| !p.scores_incrementally()) {
        bail!("{p} scores a whole context at once and cannot run under a decode budget");
    }
    let mut variants = Vec::new();
    for &policy in &policies {
        for &budget in &a.budgets {
            let cfg = crate::session::EvictionConfig {
                budget: Some(budget),
                ..crate::session::EvictionConfig::new(policy, 1.0)
            };
            cfg.validate()?;
            variants.push(BudgetVariant { policy, budget });
        }
    }
    let h = harness(
        &a.common,
        &l,
        &policies
            .iter()
            .map(|&policy| Variant::new(policy, 1.0))
            .collect::<Vec<_>>(),
    )?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    let mut prompt = l.tokenizer.encode("", true, false);
    let body = l.tokenizer.encode(&text, false, false);
    if body.len() < a.prompt {
        bail!(
            "{} has {} tokens, fewer than --prompt {}",
            a.file.display(),
            body.len(),
            a.prompt
        );
    }
    prompt.extend_from_slice(&body[..a.prompt]);
    let t0 = Instant::now();
    eprintln!(
        "eval budget: {} prompt tokens, {} generated, {} sessions in one batch",
        prompt.len(),
        a.gen,
        variants.len() + 1
    );
    let traces = h.budget_fidelity(&prompt, a.gen, &variants)?;
    let secs = t0.elapsed().as_secs_f64();
    let md = report::budget_markdown(&traces, a.segment);
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let p = dir.join("budget.csv");
        std::fs::write(&p, report::budget_csv(&traces))
            .with_context(|| format!("cannot write {}", p.display()))?;
        let name = l
            .path
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        let plots = report::budget_plots(&traces, a.segment, dir, &name)?;
        eprintln!(
            "wrote budget.csv, {} in {}",
            plots.join(", "),
            dir.display()
        );
    }
    match a.common.output {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report::budget_json(&traces))?
        ),
        Format::Csv => print!("{}", report::budget_csv(&traces)),
        Format::Md => println!("{md}"),
    }
    eprintln!("eval budget: {:.1} min", secs / 60.0);
    Ok(())
}

fn sweep(a: SweepArgs) -> Result<()> {
    let (l, variants) = setup(&a.common, &a.keeps)?;
    let h = harness(&a.common, &l, &variants)?;
    let haystack = read_optional(a.haystack.as_deref().or(a.file.as_deref()))?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let t0 = Instant::now();
    let mut results = Results::default();
    let spec = NiahSpec::new(&a.tasks, &a.lengths, haystack.as_deref(), a.common.seed)?;
    niah(&h, &l, &spec, &variants, &mut results)?;
    if let Some(f) = &a.file {
        kld(&h, &l, f, &a.docs, &variants, &mut results)?;
    }
    let mut rows = results.rows();
    if let Some(prev) = &a.merge {
        let text = std::fs::read_to_string(prev)
            .with_context(|| format!("cannot read {}", prev.display()))?;
        let earlier = report::rows_from_csv(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a sweep's results.csv: {e}", prev.display()))?;
        rows = report::merge(earlier, rows);
    }
    let name = l
        .path
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let write = |file: &str, text: String| -> Result<()> {
        let p = a.out.join(file);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    write("results.csv", report::csv(&rows))?;
    write("results.json", serde_json::to_string_pretty(&rows)? + "\n")?;
    let secs = t0.elapsed().as_secs_f64();
    let header = format!(
        "## {name}\n\nSchedule {}, seed {}, prompts {}, wall time {:.1} min.\n\n",
        a.common.schedule,
        a.common.seed,
        if h.uses_chat_template() {
            "in the model's chat template"
        } else {
            "as plain text (no chat template)"
        },
        secs / 60.0
    );
    write("results.md", header + &report::markdown(&rows))?;
    let plots = report::plots(&rows, &a.out, &name)?;
    println!("{}", report::markdown(&rows));
    eprintln!(
        "eval sweep: {:.1} min; wrote results.csv, results.json, results.md, {} in {}",
        secs / 60.0,
        plots.join(", "),
        a.out.display()
    );
    Ok(())
}

/// Check the flags, load the model and turn the policy and keep flags into variants.
fn setup(c: &CommonArgs, keeps: &[f64]) -> Result<(Loaded, Vec<Variant>)> {
    for &k in keeps {
        if !(k > 0.0 && k <= 1.0) {
            bail!("keep ratios must lie in (0, 1], got {k}");
        }
    }
    let named = match &c.policies {
        Some(names) => Some(parse_policies(names)?),
        None => None,
    };
    let l = c.model.load()?;
    let policies = match named {
        Some(p) => p,
        None => {
            let mut p: Vec<Policy> = Policy::ALL
                .into_iter()
                .filter(|&p| p != Policy::Full)
                .collect();
            if c.gates.is_none() && find_gates(&l.model, &l.path).is_err() {
                eprintln!(
                    "note: no gates for {} found; the gated policy is left out (see --gates)",
                    l.path.display()
                );
                p.retain(|&x| x != Policy::Gated);
            }
            p
        }
    };
    let variants = policies
        .iter()
        .flat_map(|&policy| keeps.iter().map(move |&keep| Variant::new(policy, keep)))
        .collect();
    Ok((l, variants))
}

/// `--policies`, without the full cache (always measured) and without repeats.
fn parse_policies(names: &[String]) -> Result<Vec<Policy>> {
    let mut policies = Vec::new();
    for p in names {
        let p: Policy = p.trim().parse()?;
        if p != Policy::Full && !policies.contains(&p) {
            policies.push(p);
        }
    }
    Ok(policies)
}

fn harness<'m>(c: &CommonArgs, l: &'m Loaded, variants: &[Variant]) -> Result<Harness<'m>> {
    let template = l.template(&c.template)?;
    let mut h = Harness::new(&l.model, &l.tokenizer, &template, Some(&c.system))?;
    h.schedule = c.schedule.parse()?;
    h.level = c.level.as_deref().map(str::parse).transpose()?;
    h.window = c.window;
    h.seed = c.seed;
    let wants_gates = variants.iter().any(|v| v.policy == Policy::Gated);
    if wants_gates {
        h.gates = Some(load_gates(c.gates.as_deref(), l)?);
    } else if c.gates.is_some() {
        bail!("--gates is for the gated policy (--policies ...,gated)");
    }
    Ok(h)
}

fn read_optional(path: Option<&Path>) -> Result<Option<String>> {
    path.map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()
}

fn kld(
    h: &Harness,
    l: &Loaded,
    file: &Path,
    d: &DocArgs,
    variants: &[Variant],
    results: &mut Results,
) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let tokens = l.tokenizer.encode(&text, false, false);
    for &ctx in &d.ctx {
        kld_at(h, l, file, &tokens, ctx, d, variants, results)?;
    }
    Ok(())
}

/// `eval kld` at one context length.
#[allow(clippy::too_many_arguments)]
fn kld_at(
    h: &Harness,
    l: &Loaded,
    file: &Path,
    tokens: &[u32],
    ctx: usize,
    d: &DocArgs,
    variants: &[Variant],
    results: &mut Results,
) -> Result<()> {
    let (cont, docs) = (d.cont, d.docs);
    let len = ctx + cont + 1;
    if ctx < 64 || cont == 0 || docs == 0 {
        bail!("--ctx must be at least 64, --cont and --docs at least 1");
    }
    if ctx + cont + 2 > l.model.config.n_ctx_train {
        bail!(
            "--ctx + --cont = {} exceeds the model's context of {}",
            ctx + cont,
            l.model.config.n_ctx_train
        );
    }
    let stride = tokens.len() / docs;
    if stride < len {
        bail!(
            "{} has {} tokens: not enough for {docs} documents of {len} (use fewer --docs or a shorter --ctx)",
            file.display(),
            tokens.len()
        );
    }
    for v in variants {
        if let Err(e) = h.check(*v, 1, ctx) {
            eprintln!("eval kld: skipping {v} at {ctx} tokens: {e}");
        }
    }
    let pb = progress(docs as u64, "kld docs");
    for d in 0..docs {
        let t = Instant::now();
        let doc = &tokens[d * stride..d * stride + len];
        let c = h.fidelity(doc, ctx, variants)?;
        let worst = c
            .iter()
            .map(|c| c.tokens.iter().map(|t| t.kld).sum::<f64>() / c.tokens.len() as f64)
            .fold(0.0, f64::max);
        note(
            &pb,
            format!(
                "kld @ {ctx}, doc {}/{docs}: {:.1} s, largest mean KLD {worst:.4}",
                d + 1,
                t.elapsed().as_secs_f64()
            ),
        );
        results.add_continuations(ctx, c);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(())
}

/// Tokens of a task's length left for the template, the question and the answer.
const RESERVE: usize = 160;

struct NiahSpec<'a> {
    tasks: Vec<TaskKind>,
    lengths: &'a [usize],
    samples: usize,
    queries: usize,
    stop_uninformative: usize,
    haystack: Option<&'a str>,
    seed: u64,
}

impl<'a> NiahSpec<'a> {
    fn new(
        t: &TaskArgs,
        lengths: &'a [usize],
        haystack: Option<&'a str>,
        seed: u64,
    ) -> Result<Self> {
        let tasks = t
            .tasks
            .iter()
            .map(|n| Ok(n.trim().parse::<TaskKind>()?))
            .collect::<Result<_>>()?;
        if t.samples == 0 || t.queries == 0 {
            bail!("--samples and --queries must be at least 1");
        }
        Ok(Self {
            tasks,
            lengths,
            samples: t.samples,
            queries: t.queries,
            stop_uninformative: t.stop_uninformative,
            haystack,
            seed,
        })
    }
}

/// Every sample of every task and length under the full cache and `variants`: one
/// prefill per sample serves them all (under the one-shot schedule). Tasks on which
/// the full cache scores below 50% are measured too, and the report marks them
/// uninformative (eviction cannot show a difference there).
fn niah(
    h: &Harness,
    l: &Loaded,
    spec: &NiahSpec,
    variants: &[Variant],
    results: &mut Results,
) -> Result<()> {
    let mut tasks = spec.tasks.clone();
    if spec.haystack.is_none() && tasks.iter().any(|t| t.needs_text()) {
        eprintln!(
            "eval: skipping single-text: it needs a text haystack (--haystack FILE or -f FILE)"
        );
        tasks.retain(|t| !t.needs_text());
    }
    let n_ctx_train = l.model.config.n_ctx_train;
    for &len in spec.lengths {
        if len > n_ctx_train || len <= RESERVE {
            bail!("length {len} must lie in ({RESERVE}, {n_ctx_train}] (the model's context)");
        }
        for v in variants {
            if let Err(e) = h.check(*v, 0, len) {
                eprintln!("eval niah: skipping {v} at length {len}: {e}");
            }
        }
    }
    let count = |s: &str| l.tokenizer.encode(s, false, false).len();
    let mut generator = Generator::new(&count, spec.haystack, spec.seed);
    let units = spec.lengths.len() * tasks.len();
    let pb = progress((units * spec.samples) as u64, "samples");
    for &len in spec.lengths {
        for &task in &tasks {
            let (mut asked, mut right) = (0usize, 0.0f64);
            for (k, i) in spread_order(spec.samples).into_iter().enumerate() {
                if spec.stop_uninformative > 0
                    && asked >= spec.stop_uninformative
                    && right < asked as f64 * INFORMATIVE
                {
                    note(
                        &pb,
                        format!(
                            "{task} @ {len}: the full cache answered {right:.1} of {asked} \
                             questions; uninformative, the other {} samples are not run",
                            spec.samples - k
                        ),
                    );
                    pb.inc((spec.samples - k) as u64);
                    break;
                }
                let t = Instant::now();
                let sample =
                    generator.sample(task, len - RESERVE, i, spec.samples, spec.queries)?;
                let answers = h.answer(&sample, variants)?;
                let full: Vec<&Answer> = answers
                    .iter()
                    .filter(|a| a.variant == Variant::FULL)
                    .collect();
                asked += full.len();
                right += full.iter().map(|a| a.score).sum::<f64>();
                note(
                    &pb,
                    format!(
                        "{task} @ {len}, sample {}/{} (depth slice {}): {:.1} s, full cache {:.2} \
                         (first answer: {:?})",
                        k + 1,
                        spec.samples,
                        i + 1,
                        t.elapsed().as_secs_f64(),
                        full.iter().map(|a| a.score).sum::<f64>() / full.len().max(1) as f64,
                        full.first().map_or("", |a| a.text.as_str())
                    ),
                );
                results.add_answers(task, len, answers);
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    Ok(())
}

/// The sample indices 0..n in an order whose every prefix spreads over the depths
/// (sample i's questions sit in depth slice i): a stride coprime to n of about n/3.
fn spread_order(n: usize) -> Vec<usize> {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let stride = (n.div_ceil(3).max(1)..=n.max(1))
        .find(|&s| gcd(s, n) == 1)
        .unwrap_or(1);
    (0..n).map(|k| k * stride % n.max(1)).collect()
}

fn finish(c: &CommonArgs, rows: &[Row], t0: Instant) -> Result<()> {
    match c.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Format::Csv => print!("{}", report::csv(rows)),
        Format::Md => println!("{}", report::markdown(rows)),
    }
    eprintln!("eval: {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_schedule_parses() {
        for name in SCHEDULES {
            let s: crate::eval::Schedule = name.parse().unwrap();
            assert_eq!(s.to_string(), name);
        }
    }

    #[test]
    fn spread_order_visits_every_sample_once_and_spreads_early() {
        for n in [1, 2, 3, 8, 24, 25] {
            let mut o = spread_order(n);
            let first: Vec<usize> = o.iter().copied().take(n.div_ceil(3)).collect();
            o.sort();
            assert_eq!(o, (0..n).collect::<Vec<_>>(), "n = {n}");
            if n >= 8 {
                // The first third reaches into the last third of the depths.
                assert!(first.iter().any(|&i| i >= 2 * n / 3), "n = {n}: {first:?}");
            }
        }
        assert_eq!(&spread_order(24)[..4], &[0, 11, 22, 9]);
    }
}
