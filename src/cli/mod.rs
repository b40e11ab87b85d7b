//! The `fastkv` command line: subcommands and flags named as llama.cpp names them.
mod bench;
mod chat;
mod eval;
mod inspect;
mod perplexity;
mod run;
mod serve;
mod train_gates;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::gate::{find_gates, Gates};
use crate::kv::{EvictMode, Level, Policy};
use crate::model::Model;
use crate::sampling::{Sampler, SamplerParams};
use crate::session::{CompressReport, EvictionConfig, Session, TeacherPrompt};
use crate::tokenizer::sandbox::{self, Limits, Sandbox};
use crate::tokenizer::{ChatTemplate, Detokenizer, Tokenizer};

/// The model used when `-m` is not given (fetched by `python3 models/fetch.py`).
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `fastkv --version`: the version, then what build.rs found (the git commit, cargo
/// features and the SIMD extensions compiled for). `-V` prints the version alone.
const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\n", env!("FASTKV_BUILD_INFO"));

#[derive(Parser, Debug)]
#[command(
    name = "fastkv",
    version,
    long_version = LONG_VERSION,
    about = "CPU inference for GGUF models with learned KV-cache eviction"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt, streaming tokens as they are sampled.
    Run(run::RunArgs),
    /// Interactive multi-turn chat with the model's chat template.
    Chat(chat::ChatArgs),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(perplexity::PerplexityArgs),
    /// Print a model's architecture, hyper-parameters, tokenizer and tensors.
    Inspect(inspect::InspectArgs),
    /// Prompt and generation speed as llama-bench measures it (`--compare llama.cpp`:
    /// side by side with llama.cpp).
    Bench(bench::BenchArgs),
    /// Quality of KV eviction against the full cache: `kld`, `niah`, `sweep`.
    Eval(eval::EvalArgs),
    /// Train Fast KVzip gates for a model on a text corpus (forward passes only).
    TrainGates(train_gates::TrainGatesArgs),
    /// An OpenAI-compatible HTTP server with a chat page (llama-server's routes).
    Serve(serve::ServeArgs),
    /// Print a shell completion script, e.g. `fastkv completions bash >
    /// ~/.local/share/bash-completion/completions/fastkv`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `fastkv render-template`: render one chat template job (JSON on stdin) under memory
/// and CPU limits. The child process of the template sandbox
/// (src/tokenizer/sandbox.rs), not a user's command: parsed apart from [`Cli`] so that
/// help and shell completions do not list it.
#[derive(Parser, Debug)]
#[command(name = "fastkv render-template")]
struct RenderTemplateArgs {
    #[arg(long)]
    memory_mib: u64,
    #[arg(long)]
    cpu_seconds: u64,
}

/// Output formats of the commands that print tables (`-o`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Md,
    Json,
    Csv,
}

/// Flags shared by every command that runs a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(short = 'm', long = "model", env = "FASTKV_ARG_MODEL")]
    pub model: Option<PathBuf>,
    /// Number of threads (default: all cores).
    #[arg(short = 't', long = "threads", env = "FASTKV_ARG_THREADS")]
    pub threads: Option<usize>,
}

/// Which chat template to use, for the commands that render conversations (chat,
/// serve, eval, train-gates).
#[derive(Args, Debug, Clone, Default)]
pub struct TemplateArgs {
    /// Which of the model's chat templates to use: `default` (tokenizer.chat_template)
    /// or the name of another it ships (tokenizer.chat_template.NAME, e.g. tool_use);
    /// `fastkv inspect` lists them.
    #[arg(
        long = "chat-template",
        value_name = "NAME",
        env = "FASTKV_ARG_CHAT_TEMPLATE",
        conflicts_with = "chat_template_file"
    )]
    pub chat_template: Option<String>,
    /// A Jinja chat template file to use instead of the model's.
    #[arg(
        long = "chat-template-file",
        value_name = "FILE",
        env = "FASTKV_ARG_CHAT_TEMPLATE_FILE"
    )]
    pub chat_template_file: Option<PathBuf>,
}

/// The context size, for the commands that hold one context (run, chat, perplexity,
/// serve). The others set their lengths with their own flags and refuse `-c`.
#[derive(Args, Debug, Clone)]
pub struct CtxArgs {
    /// Context size in tokens (0 = the model's training context).
    #[arg(
        short = 'c',
        long = "ctx-size",
        default_value_t = 4096,
        env = "FASTKV_ARG_CTX_SIZE"
    )]
    pub ctx_size: usize,
}

impl CtxArgs {
    /// The context size to use (`-c 0` = the model's training context).
    pub fn n_ctx(&self, model: &Model) -> usize {
        if self.ctx_size == 0 {
            model.config.n_ctx_train
        } else {
            self.ctx_size.min(model.config.n_ctx_train)
        }
    }
}

/// KV eviction flags, shared by the commands that run a model.
#[derive(Args, Debug, Clone, Default)]
pub struct KvArgs {
    /// KV eviction policy [default: when --kv-keep or --kv-budget is given, gated
    /// where gates for the model are found (or named by --gates), else snapkv;
    /// without them, full].
    #[arg(
        long = "kv-policy",
        env = "FASTKV_ARG_KV_POLICY",
        value_parser = PossibleValuesParser::new(Policy::ALL.map(Policy::name)),
        ignore_case = true
    )]
    pub policy: Option<String>,
    /// Fast KVzip gate file for --kv-policy gated [default: the *.gates.gguf trained
    /// for this model in the model's directory or models/].
    #[arg(long = "gates", env = "FASTKV_ARG_GATES")]
    pub gates: Option<PathBuf>,
    /// Fraction of a context's KV pairs to keep, 0 < r <= 1
    /// [default: 0.3 with a policy other than full, else 1].
    #[arg(long = "kv-keep", env = "FASTKV_ARG_KV_KEEP")]
    pub keep: Option<f64>,
    /// Decode budget: KV pairs per (layer, KV head) on average; evicts every 128 tokens.
    #[arg(long = "kv-budget", env = "FASTKV_ARG_KV_BUDGET")]
    pub budget: Option<usize>,
    /// Recent tokens of a context kept whole [default: 4096 for a context of 16000
    /// tokens or more, else 2% of it or a quarter of what is kept, the larger].
    #[arg(long = "kv-window", env = "FASTKV_ARG_KV_WINDOW")]
    pub window: Option<usize>,
    /// Where the keep ratio applies: global (one threshold, non-uniform heads), layer,
    /// head, auto (global, or layer where fewer than 8 layers are evicted)
    /// [default: head for snapkv, auto for gated and kvzip, else global].
    #[arg(
        long = "kv-level",
        env = "FASTKV_ARG_KV_LEVEL",
        value_parser = PossibleValuesParser::new(Level::ALL.map(Level::name)),
        ignore_case = true
    )]
    pub level: Option<String>,
    /// Tokens per prefill step; eviction runs after each.
    #[arg(
        long = "prefill-chunk",
        default_value_t = crate::session::DEFAULT_PREFILL_CHUNK,
        env = "FASTKV_ARG_PREFILL_CHUNK"
    )]
    pub prefill_chunk: usize,
}

impl KvArgs {
    /// The eviction settings these flags ask for (`seed` drives the random policy),
    /// before the model is known: where no policy is named, eviction uses snapkv.
    /// [`KvArgs::resolve`] gives the settings for a loaded model.
    pub fn config(&self, seed: u64) -> Result<EvictionConfig> {
        let policy = match &self.policy {
            Some(p) => p.parse::<Policy>()?,
            None if self.keep.is_some() || self.budget.is_some() => Policy::SnapKv,
            None => Policy::Full,
        };
        if policy == Policy::Full && (self.keep.is_some_and(|k| k < 1.0) || self.budget.is_some()) {
            bail!("--kv-keep and --kv-budget need an eviction policy (--kv-policy), not full");
        }
        let keep = match self.keep {
            Some(k) if !(k > 0.0 && k <= 1.0) => {
                bail!("--kv-keep must lie in (0, 1] (the fraction of KV pairs kept), got {k}")
            }
            Some(k) => k,
            None if policy != Policy::Full && self.budget.is_none() => 0.3,
            None => 1.0,
        };
        if self.prefill_chunk == 0 {
            bail!("--prefill-chunk must be at least 1");
        }
        let level = match &self.level {
            Some(l) => l.parse::<Level>()?,
            None => policy.default_level(),
        };
        let cfg = EvictionConfig {
            policy,
            keep,
            level,
            window: self.window,
            budget: self.budget,
            seed,
            mode: EvictMode::Compact,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The eviction settings for the model in `l`, and the gates they need. Where
    /// eviction is asked for without naming a policy, it is the method this runtime
    /// is built around: Fast KVzip gates, when gates trained for the model are found
    /// (or named by --gates). Without gates it stays snapkv.
    pub fn resolve(&self, seed: u64, l: &Loaded) -> Result<(EvictionConfig, Option<Arc<Gates>>)> {
        let mut cfg = self.config(seed)?;
        let unnamed = self.policy.is_none() && cfg.policy != Policy::Full;
        if unnamed && (self.gates.is_some() || find_gates(&l.model, &l.path).is_ok()) {
            cfg.policy = Policy::Gated;
            if self.level.is_none() {
                cfg.level = Policy::Gated.default_level();
            }
        }
        let gates = if cfg.policy == Policy::Gated {
            Some(load_gates(self.gates.as_deref(), l)?)
        } else if self.gates.is_some() {
            bail!("--gates is for --kv-policy gated");
        } else {
            None
        };
        Ok((cfg, gates))
    }

    /// Apply these flags to a session. `chat` is the template the session's text is
    /// rendered with, None for plain text: the KVzip teacher's repeat prompt follows it.
    pub fn apply(
        &self,
        session: &mut Session,
        l: &Loaded,
        seed: u64,
        chat: Option<&ChatTemplate>,
    ) -> Result<()> {
        let (cfg, gates) = self.resolve(seed, l)?;
        self.install(session, l, cfg, gates, chat)
    }

    /// Put settings from [`KvArgs::resolve`] on a session, as [`KvArgs::apply`] does;
    /// for callers that set up many sessions from one resolution.
    pub fn install(
        &self,
        session: &mut Session,
        l: &Loaded,
        cfg: EvictionConfig,
        gates: Option<Arc<Gates>>,
        chat: Option<&ChatTemplate>,
    ) -> Result<()> {
        if let Some(g) = gates {
            session.set_gates(g);
        }
        if cfg.policy == Policy::KvZip {
            session.set_teacher_prompt(match chat {
                Some(t) => TeacherPrompt::new(&l.tokenizer, t)?,
                None => TeacherPrompt::plain(&l.tokenizer),
            });
        }
        session.set_eviction(cfg)?;
        session.set_prefill_chunk(self.prefill_chunk);
        Ok(())
    }
}

/// The gates named by `--gates`, or those trained for this model found beside it.
pub fn load_gates(path: Option<&Path>, l: &Loaded) -> Result<Arc<Gates>> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            // Found, not named: say which file decides what is evicted.
            let p = find_gates(&l.model, &l.path)?;
            eprintln!(
                "gates: {} (found for this model; --gates FILE names another)",
                p.display()
            );
            p
        }
    };
    let gates = Gates::load(&path, &l.model)
        .with_context(|| format!("cannot use the gates in {}", path.display()))?;
    Ok(Arc::new(gates))
}

/// A progress bar with an ETA, for long work.
pub fn progress(n: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed} (ETA {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Prefills shorter than this many tokens show no progress bar.
const PREFILL_BAR_FROM: usize = 2048;

/// The progress bar of a long prefill (tokens, tokens/s, ETA) on a terminal, drawn
/// from the session's progress reports; nothing for a short one.
pub struct PrefillBar {
    what: &'static str,
    bar: Option<ProgressBar>,
}

impl PrefillBar {
    pub fn new(what: &'static str) -> Self {
        Self { what, bar: None }
    }

    /// `done` of `n` tokens are in.
    pub fn update(&mut self, done: usize, n: usize) {
        if n < PREFILL_BAR_FROM {
            return;
        }
        let what = self.what;
        let bar = self.bar.get_or_insert_with(|| {
            let pb = ProgressBar::new(n as u64);
            pb.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} tokens ({per_sec}, ETA {eta})",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            pb.set_message(format!("prefill ({what})"));
            pb
        });
        bar.set_position(done as u64);
    }

    /// Remove the bar (the summary lines follow).
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A line above the progress bar, or on stderr when the bar is hidden (not a
/// terminal), so logs show progress too.
pub fn note(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

/// One line on what compressing a context did.
pub fn print_compression(r: &CompressReport, cfg: &EvictionConfig) {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let how = if cfg.is_active() && cfg.keep < 1.0 {
        format!(
            "{}, keep {}, level {}, window {}",
            cfg.policy, cfg.keep, cfg.level, r.window
        )
    } else {
        "no eviction".to_string()
    };
    let teacher = if r.teacher_ms > 0.0 {
        format!(", of which the kvzip teacher {:.0} ms", r.teacher_ms)
    } else {
        String::new()
    };
    eprintln!(
        "context: {} tokens, KV cache {:.2} MiB full -> {:.2} MiB held ({:.1}%; {how}) in {:.0} ms{teacher}",
        r.n_context,
        mib(r.kv_bytes_full),
        mib(r.kv_bytes),
        100.0 * r.kv_bytes as f64 / r.kv_bytes_full.max(1) as f64,
        r.prefill_ms,
    );
}

/// Sampling flags, with llama.cpp's names and defaults.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 means greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Top-k sampling (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Top-p (nucleus) sampling (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Min-p sampling (0.0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for repeating recent tokens (1.0 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty considers.
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed (default: random).
    #[arg(short = 's', long = "seed")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplerParams> {
        if !(self.temp.is_finite() && self.temp >= 0.0) {
            bail!("--temp must be a number >= 0, got {}", self.temp);
        }
        if !(0.0..=1.0).contains(&self.top_p) || !(0.0..=1.0).contains(&self.min_p) {
            bail!("--top-p and --min-p must lie in [0, 1]");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            bail!("--repeat-penalty must be > 0");
        }
        let seed = self.seed();
        Ok(SamplerParams {
            temp: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        })
    }

    /// `-s`, or a seed from the clock.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        })
    }
}

pub fn main() -> Result<()> {
    // The template sandbox's child starts no thread pool: it runs under an
    // address-space limit and renders on this thread.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == sandbox::COMMAND)
    {
        let a = RenderTemplateArgs::parse_from(std::env::args_os().skip(1));
        return sandbox::child_main(a.memory_mib, a.cpu_seconds)
            .context("the template renderer failed");
    }
    // llama.cpp's two-letter short flags, which clap cannot declare.
    let cli = Cli::parse_from(std::env::args_os().map(|a| match a.to_str() {
        Some("-np") => "--parallel".into(),
        _ => a,
    }));
    if let Some(t) = cli.command.threads() {
        if t == 0 {
            bail!("-t/--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    // The command runs on one of the pool's threads. A parallel loop started there
    // hands half its work straight to the other threads; started from any other
    // thread, it is queued and the caller sleeps on an OS latch until it is done, a
    // round trip through the scheduler for every matrix product of every token
    // (decoding SmolLM2 on 2 threads: 77 t/s that way, 104 t/s this way).
    rayon::scope(|_| match cli.command {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::chat(a),
        Command::Perplexity(a) => perplexity::perplexity(a),
        Command::Inspect(a) => inspect::inspect(a),
        Command::Bench(a) => bench::bench(a),
        Command::Eval(a) => eval::eval(a),
        Command::TrainGates(a) => train_gates::train_gates(a),
        Command::Serve(a) => serve::serve(a),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "fastkv", &mut std::io::stdout());
            Ok(())
        }
    })
}

impl Command {
    /// The thread count the command was given (`-t`), if any.
    fn threads(&self) -> Option<usize> {
        match self {
            Command::Run(a) => a.model.threads,
            Command::Chat(a) => a.model.threads,
            Command::Perplexity(a) => a.model.threads,
            Command::Inspect(_) | Command::Completions { .. } => None,
            Command::Bench(a) => a.threads,
            Command::Eval(a) => match &a.command {
                eval::EvalCommand::Kld(e) => e.common.model.threads,
                eval::EvalCommand::Niah(e) => e.common.model.threads,
                eval::EvalCommand::Sweep(e) => e.common.model.threads,
                eval::EvalCommand::Budget(e) => e.common.model.threads,
            },
            Command::TrainGates(a) => a.model.threads,
            Command::Serve(a) => a.model.threads,
        }
    }
}

/// `-m`, or the default model: `$FASTKV_MODEL`, then `models/` in the current
/// directory, then `models/` of the source tree this binary was built from.
pub fn resolve_model(m: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = m {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("FASTKV_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        PathBuf::from("models").join(DEFAULT_MODEL),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(DEFAULT_MODEL),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no model given (-m) and the default model {DEFAULT_MODEL} is not in models/; \
                 fetch it with `python3 models/fetch.py`"
            )
        })
}

/// A model and its tokenizer, loaded per the shared flags.
pub struct Loaded {
    pub model: Model,
    /// Shared with the server's HTTP handlers.
    pub tokenizer: Arc<Tokenizer>,
    pub path: PathBuf,
}

impl Loaded {
    /// The chat template `args` choose: a file, one of the model's named templates, or
    /// the model's own; the plain fallback (with a note) when the model has none. The
    /// template is rendered in a child process under the sandbox's limits
    /// (src/tokenizer/sandbox.rs): a model's template is a program from the model file.
    pub fn template(&self, args: &TemplateArgs) -> Result<ChatTemplate> {
        let file = self.model.file();
        let template = if let Some(path) = &args.chat_template_file {
            let source = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the chat template {}", path.display()))?;
            ChatTemplate::for_tokenizer(&source, &self.tokenizer)
                .with_context(|| format!("the chat template {} is not valid", path.display()))?
        } else if let Some(name) = &args.chat_template {
            ChatTemplate::from_gguf_named(file, &self.tokenizer, name)
                .with_context(|| format!("{}", self.path.display()))?
        } else if let Some(template) = ChatTemplate::from_gguf(file, &self.tokenizer) {
            template
        } else {
            eprintln!(
                "note: {} has no chat template; using a plain \"User:/Assistant:\" format \
                 (--chat-template-file gives one)",
                self.path.display()
            );
            return Ok(ChatTemplate::plain());
        };
        let sandbox = Sandbox::this_binary(Limits::default())
            .context("cannot find this program to render the chat template in")?;
        Ok(template.sandboxed(sandbox))
    }
}

impl ModelArgs {
    /// Load the model and tokenizer (the thread pool of `-t` was started by `main`).
    pub fn load(&self) -> Result<Loaded> {
        let path = resolve_model(self.model.as_deref())?;
        let model =
            Model::load(&path).with_context(|| format!("cannot load model {}", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(model.file())
            .with_context(|| format!("cannot read the tokenizer of {}", path.display()))?;
        // Building the tokenizer leaves megabytes of freed temporaries in the heap;
        // hand them back so they do not count in the process's resident memory.
        crate::kv::release_freed_memory();
        if tokenizer.n_vocab() != model.config.n_vocab {
            bail!(
                "{}: tokenizer has {} tokens but the model {}",
                path.display(),
                tokenizer.n_vocab(),
                model.config.n_vocab
            );
        }
        Ok(Loaded {
            model,
            tokenizer: Arc::new(tokenizer),
            path,
        })
    }
}

/// Timings and sizes of one generation, as `--stats-json` reports them.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GenStats {
    pub n_prompt: usize,
    pub n_gen: usize,
    pub prompt_ms: f64,
    pub gen_ms: f64,
    pub prompt_tps: f64,
    pub gen_tps: f64,
    /// Bytes the KV cache holds at the end.
    pub kv_bytes: usize,
    /// Bytes it would hold without eviction.
    pub kv_bytes_full: usize,
    /// The most bytes it held at any point.
    pub peak_kv_bytes: usize,
    pub peak_rss_bytes: u64,
    /// What compressing a context did, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressReport>,
    /// Tokens run through the model while generating (the last sampled one is not).
    #[serde(skip)]
    n_decoded: usize,
}

impl GenStats {
    fn finish(&mut self, session: &Session) {
        self.prompt_tps = rate(self.n_prompt, self.prompt_ms);
        self.gen_tps = rate(self.n_decoded, self.gen_ms);
        self.kv_bytes = session.kv_bytes();
        self.kv_bytes_full = session.cache().full_bytes();
        self.peak_kv_bytes = session.peak_kv_bytes();
        self.peak_rss_bytes = peak_rss_bytes();
    }

    pub fn print(&self) {
        eprintln!(
            "\nprompt: {} tokens in {:.1} ms ({:.2} tokens/s)\n\
             generation: {} tokens in {:.1} ms ({:.2} tokens/s)\n\
             KV cache: {:.2} MiB held ({:.2} MiB without eviction, peak {:.2} MiB), peak RSS: {:.1} MiB",
            self.n_prompt,
            self.prompt_ms,
            self.prompt_tps,
            self.n_gen,
            self.gen_ms,
            self.gen_tps,
            self.kv_bytes as f64 / (1 << 20) as f64,
            self.kv_bytes_full as f64 / (1 << 20) as f64,
            self.peak_kv_bytes as f64 / (1 << 20) as f64,
            self.peak_rss_bytes as f64 / (1 << 20) as f64,
        );
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1000.0 / ms
    } else {
        0.0
    }
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Write a piece of generated text and flush it, so the user sees each token.
pub fn print_piece(out: &mut impl std::io::Write, piece: &str) -> Result<ControlFlow<()>> {
    out.write_all(piece.as_bytes())?;
    out.flush()?;
    Ok(ControlFlow::Continue(()))
}

/// Prefill `prompt` (reusing what the session holds), then sample up to `n_predict`
/// tokens (None = until end of generation or a full context), calling `emit` with
/// each piece of text as soon as it is complete UTF-8; `emit` may stop the reply
/// (`Break`: its token is still fed, so the session holds the reply as returned).
/// Returns the generated ids.
pub fn generate(
    session: &mut Session,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    prompt: &[u32],
    n_predict: Option<usize>,
    stats: &mut GenStats,
    mut emit: impl FnMut(&str) -> Result<ControlFlow<()>>,
) -> Result<Vec<u32>> {
    for &t in prompt {
        sampler.accept(t);
    }
    let t0 = Instant::now();
    let mut bar = PrefillBar::new("prompt");
    let (mut logits, n_fed) =
        session.feed_reusing_prefix_with_progress(prompt, &mut |done, n| bar.update(done, n))?;
    bar.finish();
    stats.prompt_ms += t0.elapsed().as_secs_f64() * 1e3;
    stats.n_prompt += n_fed;

    let mut out = Vec::new();
    let mut detok = Detokenizer::new(tokenizer, false);
    loop {
        if n_predict.is_some_and(|n| out.len() >= n) {
            break;
        }
        let tok = sampler.sample(&mut logits);
        if tokenizer.is_eog(tok) {
            break;
        }
        sampler.accept(tok);
        out.push(tok);
        let flow = emit(&detok.push(tok))?;
        if session.tokens().len() >= session.n_ctx() {
            eprintln!("\n[context full: {} tokens]", session.n_ctx());
            break;
        }
        let t = Instant::now();
        logits = session.feed(&[tok])?;
        stats.gen_ms += t.elapsed().as_secs_f64() * 1e3;
        stats.n_decoded += 1;
        if flow.is_break() {
            break;
        }
    }
    stats.n_gen += out.len();
    // The rest of the text (an incomplete UTF-8 tail); the reply ends here anyway.
    let _ = emit(&detok.finish())?;
    stats.finish(session);
    Ok(out)
}
