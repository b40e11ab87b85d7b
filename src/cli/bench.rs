//! `fastkv bench`: prompt-processing and generation speed, measured as llama.cpp's
//! `llama-bench` measures them (same flags, test names and table), optionally side by
//! side with llama.cpp itself or with fastkv's own full cache (what a KV policy costs
//! or saves), plus a decode roofline: bytes read per generated token against a memory
//! bandwidth the bench measures on the spot.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use ggml_sys::reference::{RefContext, RefContextParams, RefModel};
use rayon::prelude::*;
use serde::Serialize;

use super::{progress, Format, KvArgs, ModelArgs};
use crate::gguf::GgufFile;
use crate::kv::Policy;
use crate::session::Session;

/// Tokens per forward pass: llama-bench's default micro-batch (`-ub 512`; its `-b 2048`
/// batch is split into micro-batches of this size), so `pp512` is exactly one forward
/// of 512 tokens on both sides.
const UBATCH: usize = 512;

/// llama-bench's CPU default is `-fa auto`, which this llama.cpp resolves to enabled
/// on the CPU backend (it supports the fused flash-attention op); fastkv's attention
/// mirrors that path, so the comparison runs llama.cpp with flash attention on.
const LLAMA_FLASH_ATTN: bool = true;

/// Bytes the bandwidth probe reads per pass: far larger than any CPU cache, so the
/// figure is DRAM bandwidth, not cache bandwidth.
const BANDWIDTH_BYTES: usize = 1 << 30;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// GGUF model file (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(short = 'm', long = "model")]
    pub model: Option<PathBuf>,
    /// Prompt lengths: one `ppN` test each (comma-separated; 0 = none).
    #[arg(short = 'p', long = "n-prompt", value_delimiter = ',', default_values_t = [512])]
    pub n_prompt: Vec<usize>,
    /// Generation lengths: one `tgN` test each (comma-separated; 0 = none).
    #[arg(short = 'n', long = "n-gen", value_delimiter = ',', default_values_t = [128])]
    pub n_gen: Vec<usize>,
    /// Context depths: fill the cache with this many tokens (untimed) before each test.
    #[arg(short = 'd', long = "n-depth", value_delimiter = ',', default_values_t = [0])]
    pub n_depth: Vec<usize>,
    /// Number of threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Timed repetitions of each test (after one untimed warm-up).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: usize,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Md)]
    pub output: Format,
    /// Also run other configurations on the same model (comma-separated: llama.cpp,
    /// full), alternating runs, and report all of them (medians) and the ratios
    /// fastkv / other.
    #[arg(long = "compare", value_enum, value_delimiter = ',')]
    pub compare: Vec<Compare>,
    /// KV eviction: with --kv-keep, a `ppN` test prefills its N tokens as a context
    /// compressed as it arrives (`run --context-file`'s chunked prefill, eviction
    /// and scoring timed), and the depth fill of a test at depth is compressed the
    /// same way (untimed); llama.cpp and `--compare full` keep their full cache.
    #[command(flatten)]
    pub kv: KvArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    /// llama.cpp built from the same ggml source, through the ggml-sys crate.
    #[value(name = "llama.cpp")]
    LlamaCpp,
    /// fastkv with the full cache and no gates: the cost (or gain) of --kv-policy.
    Full,
}

impl Compare {
    fn label(self) -> &'static str {
        match self {
            Compare::LlamaCpp => "llama.cpp",
            Compare::Full => "full",
        }
    }
}

/// The other side of `--compare`, for one test.
enum Other<'m> {
    LlamaCpp(RefContext<'m>),
    Full(Box<Session<'m>>),
}

impl Other<'_> {
    /// One run of `test`: seconds, and for fastkv the KV bytes held on average.
    fn run(&mut self, tokens: &TokenSource, test: &TestSpec) -> Result<(f64, Option<f64>)> {
        Ok(match self {
            Other::LlamaCpp(ctx) => (llama_run(ctx, tokens, test)?, None),
            Other::Full(session) => {
                let s = fastkv_run(session, tokens, test)?;
                (s.secs, Some((s.kv_start + s.kv_end) as f64 / 2.0))
            }
        })
    }
}

/// One test: `n_prompt` tokens in one go or `n_gen` single-token steps, after
/// `n_depth` tokens already in the cache. Exactly one of n_prompt / n_gen is > 0.
#[derive(Debug, Clone, Copy)]
struct TestSpec {
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
}

impl TestSpec {
    /// llama-bench's test name: `pp512`, `tg128`, `pp512 @ d4096`.
    fn name(&self) -> String {
        let base = if self.n_prompt > 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        };
        if self.n_depth > 0 {
            format!("{base} @ d{}", self.n_depth)
        } else {
            base
        }
    }
    fn n_tokens(&self) -> usize {
        self.n_prompt + self.n_gen
    }
    /// Cache room the test needs.
    fn n_ctx(&self) -> usize {
        self.n_depth + self.n_tokens()
    }
}

/// llama-bench's order: for each depth, the prompt tests, then the generation tests.
fn test_specs(a: &BenchArgs) -> Vec<TestSpec> {
    let mut out = Vec::new();
    for &n_depth in &a.n_depth {
        for &n_prompt in a.n_prompt.iter().filter(|&&n| n > 0) {
            out.push(TestSpec {
                n_prompt,
                n_gen: 0,
                n_depth,
            });
        }
        for &n_gen in a.n_gen.iter().filter(|&&n| n > 0) {
            out.push(TestSpec {
                n_prompt: 0,
                n_gen,
                n_depth,
            });
        }
    }
    out
}

/// The token ids a run feeds, with no tokenizer involved (tokenization is not part
/// of what llama-bench times): BOS first when the model adds one, as llama-bench does,
/// then ids cycling through the lower vocabulary. Both runtimes get the same ids.
struct TokenSource {
    bos: Option<u32>,
    n_vocab: usize,
}

impl TokenSource {
    /// Ids `start..start + n` of the run's sequence.
    fn ids(&self, start: usize, n: usize) -> Vec<u32> {
        (start..start + n)
            .map(|i| match self.bos {
                Some(b) if i == 0 => b,
                _ => ((100 + i * 7 % 1000) % self.n_vocab) as u32,
            })
            .collect()
    }
}

/// What one timed run of the fastkv side saw.
struct Sample {
    secs: f64,
    /// KV bytes held when the timed part started and ended (for the roofline).
    kv_start: usize,
    kv_end: usize,
}

/// One run of `test` on fastkv: clear, fill the cache to the test's depth (untimed),
/// then time the prompt forward or the decode steps. Everything about the cache
/// (size, later eviction policy) comes with `session`, so options that change it plug
/// in where the session is made.
fn fastkv_run(session: &mut Session, tokens: &TokenSource, test: &TestSpec) -> Result<Sample> {
    session.clear();
    if test.n_depth > 0 {
        let fill = tokens.ids(0, test.n_depth);
        if session.eviction().is_active() {
            // The first token is the protected prefix; the rest is the context.
            session.feed_context(&fill[..1], &fill[1..])?;
        } else {
            session.feed(&fill)?;
        }
    }
    let ids = tokens.ids(test.n_depth, test.n_tokens());
    let kv_start = kv_read_bytes(session);
    let compress = session.eviction().is_active() && session.eviction().keep < 1.0;
    let t = Instant::now();
    if test.n_prompt > 0 && compress {
        // The prompt is a context compressed as it arrives; at depth 0 its first
        // token is the protected prefix, as for the depth fill.
        let split = usize::from(test.n_depth == 0).min(ids.len());
        session.feed_context(&ids[..split], &ids[split..])?;
    } else if test.n_prompt > 0 {
        session.feed(&ids)?;
    } else {
        for &id in &ids {
            session.feed(&[id])?;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(Sample {
        secs,
        kv_start,
        kv_end: kv_read_bytes(session),
    })
}

/// Bytes of keys and values (f16) a decode step reads: what the cache holds, not
/// what it has allocated (`Session::kv_bytes`, which counts spare capacity).
fn kv_read_bytes(session: &Session) -> usize {
    let c = session.cache();
    let per_token = (c.shape.head_dim + c.shape.head_dim_v) * 2;
    c.layers
        .iter()
        .flat_map(|l| &l.heads)
        .map(|h| h.len() * per_token)
        .sum()
}

/// The same run on llama.cpp.
fn llama_run(ctx: &mut RefContext, tokens: &TokenSource, test: &TestSpec) -> Result<f64> {
    let to_i32 = |v: Vec<u32>| v.into_iter().map(|t| t as i32).collect::<Vec<_>>();
    ctx.clear();
    if test.n_depth > 0 {
        ctx.eval(&to_i32(tokens.ids(0, test.n_depth)), false)
            .map_err(|e| anyhow!(e))?;
    }
    let ids = to_i32(tokens.ids(test.n_depth, test.n_tokens()));
    let t = Instant::now();
    if test.n_prompt > 0 {
        ctx.eval(&ids, false).map_err(|e| anyhow!(e))?;
    } else {
        for &id in &ids {
            ctx.eval(&[id], false).map_err(|e| anyhow!(e))?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The untimed warm-up llama-bench does before a test: the prompt once (at most one
/// micro-batch of it: that already touches every weight and starts the threads, and
/// a long prompt would double the test's time), or one generation step.
fn warm_up(test: &TestSpec) -> TestSpec {
    TestSpec {
        n_depth: 0,
        n_gen: test.n_gen.min(1),
        n_prompt: test.n_prompt.min(UBATCH),
    }
}

/// Mean and sample standard deviation.
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len().is_multiple_of(2) {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    }
}

/// The model as llama-bench describes it.
#[derive(Debug, Serialize)]
struct ModelInfo {
    model_filename: String,
    /// `arch size type`, e.g. `llama 135M Q4_1`.
    model_type: String,
    /// Bytes of all tensors.
    model_size: usize,
    model_n_params: usize,
    /// Bytes of weights read to generate one token: every tensor but the token
    /// embedding, the output projection (the embedding again when tied), one
    /// embedding row.
    #[serde(skip)]
    weight_bytes_per_token: usize,
}

/// llama.cpp's name of a `general.file_type` (llama_ftype_name).
fn ftype_name(ftype: u64) -> Option<&'static str> {
    Some(match ftype {
        0 => "all F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K - Medium",
        11 => "Q3_K - Small",
        12 => "Q3_K - Medium",
        13 => "Q3_K - Large",
        14 => "Q4_K - Small",
        15 => "Q4_K - Medium",
        16 => "Q5_K - Small",
        17 => "Q5_K - Medium",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

fn model_info(f: &GgufFile, path: &std::path::Path, n_vocab: usize) -> ModelInfo {
    let tensors = f.tensors();
    let size: usize = tensors.iter().map(|t| t.n_bytes).sum();
    let params: usize = tensors.iter().map(|t| t.n_elements()).sum();
    let embd = tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .map_or(0, |t| t.n_bytes);
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    let weight_bytes_per_token = size - embd + if tied { embd } else { 0 } + embd / n_vocab.max(1);
    let arch = f.get_str("general.architecture").unwrap_or("?");
    let label = f.get_str("general.size_label").map_or_else(
        || {
            if params < 1_000_000_000 {
                format!("{}M", (params as f64 / 1e6).round())
            } else {
                format!("{:.1}B", params as f64 / 1e9)
            }
        },
        str::to_string,
    );
    let ftype = f
        .get_u64("general.file_type")
        .and_then(ftype_name)
        .unwrap_or("?");
    ModelInfo {
        model_filename: path.display().to_string(),
        model_type: format!("{arch} {label} {ftype}"),
        model_size: size,
        model_n_params: params,
        weight_bytes_per_token,
    }
}

/// Read bandwidth of main memory with `rayon`'s threads (the bench's thread count):
/// each thread sums its share of a buffer much larger than the caches; the best of a
/// few passes, in GB/s (1e9 bytes).
fn memory_bandwidth_gbs() -> f64 {
    let n = BANDWIDTH_BYTES / 8;
    // Non-zero contents: an all-zero allocation can map every page to the one shared
    // zero page, which would measure cache bandwidth instead.
    let mut buf = vec![0u64; n];
    let chunk = n.div_ceil(rayon::current_num_threads());
    buf.par_chunks_mut(chunk).enumerate().for_each(|(c, s)| {
        for (i, x) in s.iter_mut().enumerate() {
            *x = (c * chunk + i) as u64;
        }
    });
    let mut best = 0.0f64;
    for _ in 0..4 {
        let t = Instant::now();
        let sum: u64 = buf
            .par_chunks(chunk)
            // A wrapping integer sum vectorises (unlike an f32 sum, which must keep
            // its order), so the loop is limited by memory, not by the adds.
            .map(|s| s.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        best = best.max(BANDWIDTH_BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// What one `--compare` configuration measured for one test.
#[derive(Debug, Serialize)]
struct OtherResult {
    /// `llama.cpp` or `full`.
    name: &'static str,
    /// Median tokens/s, and fastkv's median over it.
    tps: f64,
    ratio: f64,
    samples_ts: Vec<f64>,
    /// Generation tests: bytes it reads per generated token, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_per_token: Option<f64>,
}

/// Results of one test.
#[derive(Debug, Serialize)]
struct TestResult {
    test: String,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    /// fastkv, as llama-bench reports: mean and sample sd of tokens/s over the reps.
    avg_ts: f64,
    stddev_ts: f64,
    samples_ts: Vec<f64>,
    /// Generation tests: bytes read per generated token (weights + KV held, the KV
    /// averaged over the test) and what fastkv's mean speed makes of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_per_token: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    achieved_gbs: Option<f64>,
    /// KV bytes fastkv holds at the end of the test.
    kv_bytes: usize,
    /// `--compare`: fastkv's median, and every other configuration's.
    #[serde(skip_serializing_if = "Option::is_none")]
    fastkv_tps: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    others: Vec<OtherResult>,
    /// The first `--compare` configuration's median, ratio, samples and bytes per
    /// token (the fields of `others[0]`, as a single comparison reports them).
    #[serde(skip_serializing_if = "Option::is_none")]
    other_tps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    other_samples_ts: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    other_bytes_per_token: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    model: ModelInfo,
    backend: &'static str,
    n_threads: usize,
    n_ubatch: usize,
    repetitions: usize,
    memory_bandwidth_gbs: f64,
    /// The `--compare` configurations, comma-separated.
    #[serde(skip_serializing_if = "Option::is_none")]
    compare: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    llama_cpp_flash_attn: Option<bool>,
    /// fastkv's KV eviction (policy, keep ratio, level).
    kv_policy: String,
    kv_keep: f64,
    kv_level: String,
    /// Whether prompt tests prefill a compressed context (eviction at keep < 1).
    kv_compressed_prefill: bool,
    tests: Vec<TestResult>,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let specs = test_specs(&a);
    if specs.is_empty() {
        bail!("nothing to measure: every -p and -n value is 0");
    }
    if a.reps == 0 {
        bail!("-r/--repetitions must be at least 1");
    }
    let mut compare = a.compare.clone();
    compare.dedup();
    let loaded = ModelArgs {
        model: a.model.clone(),
        threads: a.threads,
    }
    .load()?;
    let model = &loaded.model;
    let n_threads = rayon::current_num_threads();
    let n_ctx_train = model.config.n_ctx_train;
    if let Some(t) = specs.iter().find(|t| t.n_ctx() > n_ctx_train) {
        bail!(
            "test {} needs {} tokens of context, more than the model's {n_ctx_train}",
            t.name(),
            t.n_ctx()
        );
    }
    let info = model_info(model.file(), &loaded.path, model.config.n_vocab);
    let tokens = TokenSource {
        bos: loaded
            .tokenizer
            .add_bos()
            .then(|| loaded.tokenizer.bos())
            .flatten(),
        n_vocab: model.config.n_vocab,
    };
    let reference = if compare.contains(&Compare::LlamaCpp) {
        Some(
            RefModel::load(&loaded.path, false)
                .map_err(|e| anyhow!(e))
                .context("--compare llama.cpp")?,
        )
    } else {
        None
    };
    let labels: Vec<&str> = compare.iter().map(|c| c.label()).collect();
    eprintln!(
        "fastkv bench: {} ({n_threads} threads, {} reps{})",
        info.model_filename,
        a.reps,
        if labels.is_empty() {
            String::new()
        } else {
            format!(", alternating with {}", labels.join(" and "))
        }
    );
    let (kv, gates) = a.kv.resolve(0, &loaded)?;
    let kv_active = kv.is_active();
    let compressed_prefill = kv_active && kv.keep < 1.0;
    if kv_active {
        eprintln!(
            "fastkv KV eviction: {}, keep {}, level {} (prompts are prefilled as compressed \
             contexts; depth fills are compressed before each test)",
            kv.policy, kv.keep, kv.level
        );
    } else if kv.policy == Policy::Gated {
        eprintln!("fastkv gates score every token; nothing is evicted at keep 1.0");
    }
    let bandwidth = memory_bandwidth_gbs();

    let mut results = Vec::new();
    for spec in &specs {
        eprintln!("  {} ...", spec.name());
        let mut session = Session::new(model, spec.n_ctx());
        a.kv.install(&mut session, &loaded, kv.clone(), gates.clone(), None)?;
        session.set_prefill_chunk(UBATCH);
        let mut others = Vec::new();
        for c in &compare {
            others.push(match (c, &reference) {
                (Compare::LlamaCpp, Some(r)) => Other::LlamaCpp(
                    RefContext::new(
                        r,
                        RefContextParams {
                            n_ctx: spec.n_ctx() as u32,
                            n_batch: UBATCH as u32,
                            n_threads: n_threads as i32,
                            flash_attn: LLAMA_FLASH_ATTN,
                        },
                    )
                    .map_err(|e| anyhow!(e))?,
                ),
                (Compare::LlamaCpp, None) => unreachable!("llama.cpp is loaded when compared"),
                (Compare::Full, _) => {
                    let mut full = Session::new(model, spec.n_ctx());
                    full.set_prefill_chunk(UBATCH);
                    Other::Full(Box::new(full))
                }
            });
        }
        fastkv_run(&mut session, &tokens, &warm_up(spec))?;
        for o in others.iter_mut() {
            o.run(&tokens, &warm_up(spec))?;
        }
        let (mut ours, mut kv_held) = (vec![], vec![]);
        let mut theirs: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); others.len()];
        let mut kv_end = 0;
        // The repetitions as they finish (on a terminal; a pipe gets the line above).
        let bar = progress(a.reps as u64, &spec.name());
        for _ in 0..a.reps {
            let s = fastkv_run(&mut session, &tokens, spec)?;
            ours.push(spec.n_tokens() as f64 / s.secs);
            kv_held.push((s.kv_start + s.kv_end) as f64 / 2.0);
            kv_end = session.kv_bytes();
            for (o, (tps, kv)) in others.iter_mut().zip(theirs.iter_mut()) {
                let (secs, held) = o.run(&tokens, spec)?;
                tps.push(spec.n_tokens() as f64 / secs);
                kv.extend(held);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let (avg, sd) = mean_sd(&ours);
        let weights = info.weight_bytes_per_token as f64;
        let bytes_per_token = (spec.n_gen > 0).then(|| weights + mean_sd(&kv_held).0);
        let ours_median = median(&ours);
        let others: Vec<OtherResult> = compare
            .iter()
            .zip(theirs)
            .map(|(c, (tps, their_kv))| {
                // What the other side reads per token: fastkv's full cache measures it;
                // llama.cpp reads what fastkv does unless fastkv evicts (llama.cpp keeps
                // its full cache), and then it is not known here.
                let bytes = bytes_per_token.and_then(|b| {
                    if !their_kv.is_empty() {
                        Some(weights + mean_sd(&their_kv).0)
                    } else {
                        (!kv_active).then_some(b)
                    }
                });
                OtherResult {
                    name: c.label(),
                    tps: median(&tps),
                    ratio: ours_median / median(&tps),
                    samples_ts: tps,
                    bytes_per_token: bytes,
                }
            })
            .collect();
        let first = others.first();
        results.push(TestResult {
            test: spec.name(),
            n_prompt: spec.n_prompt,
            n_gen: spec.n_gen,
            n_depth: spec.n_depth,
            avg_ts: avg,
            stddev_ts: sd,
            bytes_per_token,
            achieved_gbs: bytes_per_token.map(|b| b * avg / 1e9),
            kv_bytes: kv_end,
            fastkv_tps: first.map(|_| ours_median),
            other_tps: first.map(|o| o.tps),
            ratio: first.map(|o| o.ratio),
            other_samples_ts: first.map(|o| o.samples_ts.clone()),
            other_bytes_per_token: first.and_then(|o| o.bytes_per_token),
            others,
            samples_ts: ours,
        });
    }
    let report = Report {
        model: info,
        backend: "CPU",
        n_threads,
        n_ubatch: UBATCH,
        repetitions: a.reps,
        memory_bandwidth_gbs: bandwidth,
        compare: (!labels.is_empty()).then(|| labels.join(",")),
        llama_cpp_flash_attn: reference.is_some().then_some(LLAMA_FLASH_ATTN),
        kv_policy: if kv.is_active() || kv.policy == Policy::Gated {
            kv.policy
        } else {
            Policy::Full
        }
        .to_string(),
        kv_keep: kv.keep,
        kv_level: kv.level.to_string(),
        kv_compressed_prefill: compressed_prefill,
        tests: results,
    };
    match a.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Csv => print!("{}", csv(&report)),
        Format::Md => print!("{}", markdown(&report)),
    }
    Ok(())
}

/// llama-bench's size column: MiB below 1 GiB, else GiB.
fn fmt_size(bytes: usize) -> String {
    let b = bytes as f64;
    if b < (1u64 << 30) as f64 {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    }
}

/// llama-bench's params column: M below a billion, else B.
fn fmt_params(n: usize) -> String {
    if n < 1_000_000_000 {
        format!("{:.2} M", n as f64 / 1e6)
    } else {
        format!("{:.2} B", n as f64 / 1e9)
    }
}

/// A markdown table with columns padded to their widest cell; `right[i]` right-aligns
/// column i, as llama-bench aligns numbers.
fn md_table(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len(), 3])
                .max()
                .unwrap_or(3)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((c, &w), &r)| {
                if r {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    let rule: Vec<String> = widths
        .iter()
        .zip(right)
        .map(|(&w, &r)| {
            if r {
                format!("{}:", "-".repeat(w - 1))
            } else {
                "-".repeat(w)
            }
        })
        .collect();
    out += &format!("| {} |\n", rule.join(" | "));
    for r in rows {
        out += &line(r.clone());
    }
    out
}

fn markdown(r: &Report) -> String {
    let compared = r.compare.is_some();
    // Column names: "fastkv" (with its policy when it evicts or scores); the others by
    // name, fastkv's own full cache as "full".
    let ours = if r.kv_policy == Policy::Full.name() {
        "fastkv".to_string()
    } else {
        format!("{}@{}", r.kv_policy, r.kv_keep)
    };
    let names: Vec<&str> = r
        .tests
        .first()
        .map_or(Vec::new(), |t| t.others.iter().map(|o| o.name).collect());
    let ours_ts = format!("{ours} t/s");
    let other_ts: Vec<String> = names.iter().map(|n| format!("{n} t/s")).collect();
    let ratios: Vec<String> = names.iter().map(|n| format!("{ours} / {n}")).collect();
    let lead = |t: &TestResult| {
        vec![
            r.model.model_type.clone(),
            fmt_size(r.model.model_size),
            fmt_params(r.model.model_n_params),
            r.backend.to_string(),
            r.n_threads.to_string(),
            t.test.clone(),
        ]
    };
    let mut header = vec!["model", "size", "params", "backend", "threads", "test"];
    let mut right = vec![false, true, true, false, true, true];
    let rows: Vec<Vec<String>> = if compared {
        header.push(ours_ts.as_str());
        header.extend(other_ts.iter().map(String::as_str));
        header.extend(ratios.iter().map(String::as_str));
        right.extend(std::iter::repeat_n(true, 1 + 2 * names.len()));
        r.tests
            .iter()
            .map(|t| {
                let mut row = lead(t);
                row.push(format!("{:.2}", t.fastkv_tps.unwrap_or(0.0)));
                row.extend(t.others.iter().map(|o| format!("{:.2}", o.tps)));
                row.extend(t.others.iter().map(|o| format!("{:.2}", o.ratio)));
                row
            })
            .collect()
    } else {
        header.push("t/s");
        right.push(true);
        r.tests
            .iter()
            .map(|t| {
                let mut row = lead(t);
                row.push(format!("{:.2} ± {:.2}", t.avg_ts, t.stddev_ts));
                row
            })
            .collect()
    };
    let mut out = md_table(&header, &right, &rows);
    if compared {
        let runs = if r.repetitions == 1 {
            "one run each".to_string()
        } else {
            format!("medians of {} runs", r.repetitions)
        };
        out += &format!(
            "\nt/s: {runs}, fastkv and {} alternating, n_ubatch {}",
            names.join(" and "),
            r.n_ubatch
        );
        if let Some(flash) = r.llama_cpp_flash_attn {
            out += &format!(
                "; llama.cpp with flash attention {} (llama-bench's CPU default, -fa auto)",
                if flash { "on" } else { "off" }
            );
        }
        out += ".\n";
    }
    if r.kv_compressed_prefill {
        out += &format!(
            "fastkv: --kv-policy {} --kv-keep {} (level {}): ppN prefills N tokens as a context \
             compressed as it arrives; a test at depth runs after a compressed fill. The \
             others keep their full cache.\n",
            r.kv_policy, r.kv_keep, r.kv_level
        );
    }
    let decode: Vec<&TestResult> = r.tests.iter().filter(|t| t.n_gen > 0).collect();
    if !decode.is_empty() {
        let ours_gbs = format!("{ours} GB/s");
        let other_gbs: Vec<String> = names.iter().map(|n| format!("{n} GB/s")).collect();
        let mut header = vec!["test", "MB/token", ours_ts.as_str(), ours_gbs.as_str()];
        for (ts, gbs) in other_ts.iter().zip(&other_gbs) {
            header.extend([ts.as_str(), gbs.as_str()]);
        }
        header.push("of bandwidth");
        let right = vec![true; header.len()];
        let rows: Vec<Vec<String>> = decode
            .iter()
            .map(|t| {
                let b = t.bytes_per_token.unwrap_or(0.0);
                // With --compare the medians, as in the table above; else the mean.
                let ours = t.fastkv_tps.unwrap_or(t.avg_ts);
                let mut row = vec![
                    t.test.clone(),
                    format!("{:.2}", b / 1e6),
                    format!("{ours:.2}"),
                    format!("{:.2}", b * ours / 1e9),
                ];
                for o in &t.others {
                    row.push(format!("{:.2}", o.tps));
                    row.push(
                        o.bytes_per_token
                            .map_or("–".into(), |b| format!("{:.2}", b * o.tps / 1e9)),
                    );
                }
                row.push(format!(
                    "{:.0}%",
                    100.0 * b * ours / 1e9 / r.memory_bandwidth_gbs
                ));
                row
            })
            .collect();
        out += &format!(
            "\ndecode roofline: bytes read per generated token (weights {:.2} MB + KV held), \
             against measured memory bandwidth {:.2} GB/s ({} threads)\n\n",
            r.model.weight_bytes_per_token as f64 / 1e6,
            r.memory_bandwidth_gbs,
            r.n_threads
        );
        out += &md_table(&header, &right, &rows);
    }
    out
}

fn csv(r: &Report) -> String {
    let names: Vec<&str> = r
        .tests
        .first()
        .map_or(Vec::new(), |t| t.others.iter().map(|o| o.name).collect());
    let mut out = String::from(
        "model_filename,model_type,model_size,model_n_params,backend,n_threads,test,\
         n_prompt,n_gen,n_depth,avg_ts,stddev_ts,bytes_per_token,achieved_gbs,\
         memory_bandwidth_gbs,kv_policy,kv_keep,kv_bytes",
    );
    if !names.is_empty() {
        out += ",compare,fastkv_tps,other_tps,ratio";
        for n in &names {
            out += &format!(",{n}_tps,{n}_ratio");
        }
    }
    out += "\n";
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.6}"));
    for t in &r.tests {
        out += &format!(
            "{},{},{},{},{},{},{},{},{},{},{:.6},{:.6},{},{},{:.6},{},{},{}",
            q(&r.model.model_filename),
            q(&r.model.model_type),
            r.model.model_size,
            r.model.model_n_params,
            q(r.backend),
            r.n_threads,
            q(&t.test),
            t.n_prompt,
            t.n_gen,
            t.n_depth,
            t.avg_ts,
            t.stddev_ts,
            opt(t.bytes_per_token.map(|b| b.round())),
            opt(t.achieved_gbs),
            r.memory_bandwidth_gbs,
            q(&r.kv_policy),
            r.kv_keep,
            t.kv_bytes,
        );
        if !names.is_empty() {
            out += &format!(
                ",{},{},{},{}",
                q(r.compare.as_deref().unwrap_or_default()),
                opt(t.fastkv_tps),
                opt(t.other_tps),
                opt(t.ratio)
            );
            for o in &t.others {
                out += &format!(",{:.6},{:.6}", o.tps, o.ratio);
            }
        }
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_bench() {
        let t = |n_prompt, n_gen, n_depth| TestSpec {
            n_prompt,
            n_gen,
            n_depth,
        };
        assert_eq!(t(512, 0, 0).name(), "pp512");
        assert_eq!(t(0, 128, 0).name(), "tg128");
        assert_eq!(t(512, 0, 4096).name(), "pp512 @ d4096");
        assert_eq!(t(0, 64, 4096).name(), "tg64 @ d4096");
    }

    #[test]
    fn statistics() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((sd - 1.0).abs() < 1e-12);
        assert_eq!(mean_sd(&[5.0]).1, 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn bos_comes_first_and_ids_stay_in_the_vocabulary() {
        let s = TokenSource {
            bos: Some(1),
            n_vocab: 500,
        };
        let ids = s.ids(0, 300);
        assert_eq!(ids[0], 1);
        assert!(ids.iter().all(|&i| (i as usize) < 500));
        assert_eq!(s.ids(10, 5), ids[10..15]);
    }
}
