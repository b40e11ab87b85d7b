//! The eviction schedules of the method spec (`fast-kvzip.md`, section 5), driven by
//! the session: which pairs are candidates when, and with what budget. The policy
//! (in [`crate::kv::policy`]) only scores and selects; the cache only compacts.
//!
//! - **Context compression** ([`Session::feed_context`]): a document is fed in
//!   chunks after a protected prefix. A recent window of W tokens stays; each token
//!   is judged once, when it leaves the window, together with every other pair of
//!   that segment, keeping the top r' = (r*n - W) / (n - W) of them, so that r*n
//!   pairs of the n context tokens remain in the end. KVzip cannot score as tokens
//!   arrive: it prefills the whole context, runs its teacher, then judges once.
//! - **Decode budget** ([`EvictionConfig::budget`]): every 128 tokens fed, if the
//!   evictable lists hold more than B pairs per list on average, the lowest-scored
//!   pairs go, never the first 4 tokens nor the last 128.
use std::path::Path;
use std::time::Instant;

use super::{Progress, Session};
use crate::kv::policy::{max_pool, select, Candidate, SINK_TOKENS, SNAPKV_KERNEL, SNAPKV_WINDOW};
use crate::kv::{
    release_freed_memory, ContextFileError, EvictMode, KeyFilter, Level, Policy, Probe, Reduce,
    SavedContext,
};
use crate::model::{Logits, ModelError};
use crate::tokenizer::{ChatMessage, ChatTemplate, Tokenizer, TokenizerError};

/// Context tokens per KVzip repeat pass (the spec's chunk of 2000).
pub const KVZIP_CHUNK: usize = 2000;
/// Tokens of the previous chunk quoted in a later chunk's repeat instruction.
const KVZIP_QUOTE: usize = 8;
/// The decode budget is enforced every this many tokens...
const BUDGET_PERIOD: usize = 128;
/// ...and never touches the most recent this many.
const BUDGET_RECENT: usize = 128;
/// The recent window, when not given: as the Fast KVzip reference code sizes it,
/// [`LONG_WINDOW`] tokens for a context of at least [`LONG_CONTEXT`] tokens (its
/// prefill chunk); for a shorter context, 2% of it (the reference) but at least a
/// quarter of what is kept. The reference's 2% was sized for contexts of 100k
/// tokens; at 1k-16k it leaves the text just before the question to the gates, and
/// a quarter of the budget halves the continuation's KLD on both reference models at
/// 8k without losing a needle (docs/quality.md, "How the schedule was chosen at
/// length").
const LONG_WINDOW: usize = 4096;
const LONG_CONTEXT: usize = 16_000;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    ContextFile(#[from] ContextFileError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("invalid eviction settings: {0}")]
    BadEviction(String),
    #[error("the kvzip policy needs its repeat prompt (TeacherPrompt) to be set")]
    NoTeacherPrompt,
    #[error(
        "the gated policy needs Fast KVzip gates for this model: pass --gates FILE, or train \
         them with `fastkv train-gates`"
    )]
    NoGates,
    #[error(
        "the kvzip teacher scores contexts within the model's {n_ctx_train} positions, but this one ends at {needed}: use a shorter context"
    )]
    TeacherTooLong { needed: usize, n_ctx_train: usize },
    #[error("the saved context holds {n} tokens but this session's context is {n_ctx} (raise -c)")]
    SavedTooLong { n: usize, n_ctx: usize },
}

/// How a session evicts. The default evicts nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct EvictionConfig {
    pub policy: Policy,
    /// Fraction of a compressed context's pairs to keep, in (0, 1].
    pub keep: f64,
    pub level: Level,
    /// Recent window W of context compression; None = 4096 tokens for a context of at
    /// least 16000, else 2% of the context or a quarter of what is kept, the larger.
    pub window: Option<usize>,
    /// Decode budget: pairs per (layer, KV head) list on average; None = no budget.
    pub budget: Option<usize>,
    /// Seed of the random policy.
    pub seed: u64,
    pub mode: EvictMode,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Full,
            keep: 1.0,
            level: Level::Global,
            window: None,
            budget: None,
            seed: 0,
            mode: EvictMode::Compact,
        }
    }
}

impl EvictionConfig {
    /// A policy at a keep ratio, with the policy's default selection level.
    pub fn new(policy: Policy, keep: f64) -> Self {
        Self {
            policy,
            keep,
            level: policy.default_level(),
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), SessionError> {
        let bad = |m: String| Err(SessionError::BadEviction(m));
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return bad(format!(
                "the keep ratio must lie in (0, 1], got {}",
                self.keep
            ));
        }
        if self.budget.is_some_and(|b| b < SINK_TOKENS + BUDGET_RECENT) {
            return bad(format!(
                "the decode budget must be at least {} pairs per head: the first {SINK_TOKENS} \
                 and the last {BUDGET_RECENT} tokens are always kept",
                SINK_TOKENS + BUDGET_RECENT
            ));
        }
        if self.budget.is_some() && !self.policy.scores_incrementally() {
            return bad(format!(
                "{} scores a whole context at once and cannot run under a decode budget; \
                 use --kv-keep, or a policy that scores tokens as they arrive \
                 (streaming, h2o, snapkv, gated, random)",
                self.policy
            ));
        }
        Ok(())
    }

    /// For a context of `n` judged tokens: the recent window W kept whole, and the
    /// keep ratio r' = (r*n - W) / (n - W) outside it that leaves r*n pairs.
    /// StreamingLLM keeps one recent window of r*n: everything older goes. The other
    /// policies keep a window of W whole, W never more than what is kept.
    fn window_plan(&self, n: usize) -> (usize, f64) {
        let target = (self.keep * n as f64).floor() as usize;
        if self.policy == Policy::Streaming {
            return (target, 0.0);
        }
        let w = self
            .window
            .unwrap_or(if n >= LONG_CONTEXT {
                LONG_WINDOW
            } else {
                (n / 50).max(target / 4)
            })
            .min(target);
        let r = if n > w {
            (self.keep * n as f64 - w as f64) / (n - w) as f64
        } else {
            1.0
        };
        (w, r)
    }

    /// Whether anything would ever be evicted.
    pub fn is_active(&self) -> bool {
        self.policy != Policy::Full && (self.keep < 1.0 || self.budget.is_some())
    }
}

/// The KVzip teacher's repeat prompt, as token ids: the instruction for the first
/// chunk, the one for later chunks (followed by the previous chunk's last 8 tokens),
/// and the header that opens the assistant's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeacherPrompt {
    pub first: Vec<u32>,
    pub next: Vec<u32>,
    pub header: Vec<u32>,
}

impl TeacherPrompt {
    /// The spec's prompt for a context inside a chat: the chat template's assistant
    /// header (what the template puts between a user message and the reply), or the
    /// plain header for a model without a template.
    pub fn new(tokenizer: &Tokenizer, template: &ChatTemplate) -> Result<Self, SessionError> {
        if template.is_fallback() {
            return Ok(Self::plain(tokenizer));
        }
        const MARK: &str = "\u{1}";
        let r = template.render(&[ChatMessage::user(MARK)], true)?;
        let header = r.split_once(MARK).map(|(_, h)| h).unwrap_or_default();
        Ok(Self::with_header(tokenizer, header))
    }

    /// The spec's prompt for plain text (no chat turns): header `"\n\nAnswer: "`.
    pub fn plain(tokenizer: &Tokenizer) -> Self {
        Self::with_header(tokenizer, "\n\nAnswer: ")
    }

    fn with_header(tokenizer: &Tokenizer, header: &str) -> Self {
        let enc = |s: &str| tokenizer.encode(s, false, true);
        Self {
            first: enc("\n\nRepeat the previous context exactly."),
            next: enc("\n\nRepeat the part of the previous context exactly, starting with "),
            header: enc(header),
        }
    }
}

/// Every context pair's score under several policies, from one prefill
/// ([`Session::feed_context_scored`]).
#[derive(Debug, Clone, Default)]
pub struct ContextScores {
    pub n_context: usize,
    /// Per policy, one score per entry of every evictable list.
    scores: Vec<(Policy, Vec<Vec<f32>>)>,
    pub prefill_ms: f64,
    pub teacher_ms: f64,
}

impl ContextScores {
    /// The scores of `policy`, if they were computed.
    pub fn of(&self, policy: Policy) -> Option<&[Vec<f32>]> {
        self.scores
            .iter()
            .find(|(p, _)| *p == policy)
            .map(|(_, s)| s.as_slice())
    }
}

/// What compressing a context did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CompressReport {
    pub n_context: usize,
    /// Recent window kept whole.
    pub window: usize,
    /// KV bytes a full cache would hold after the context.
    pub kv_bytes_full: usize,
    /// KV bytes held after compression.
    pub kv_bytes: usize,
    pub prefill_ms: f64,
    /// Time of the KVzip teacher's repeat passes (0 for other policies).
    pub teacher_ms: f64,
}

impl Session<'_> {
    /// Use these eviction settings from now on.
    pub fn set_eviction(&mut self, cfg: EvictionConfig) -> Result<(), SessionError> {
        cfg.validate()?;
        if cfg.policy == Policy::Gated && self.gate.is_none() {
            return Err(SessionError::NoGates);
        }
        self.eviction = cfg;
        Ok(())
    }

    pub fn eviction(&self) -> &EvictionConfig {
        &self.eviction
    }

    /// The repeat prompt the kvzip policy uses.
    pub fn set_teacher_prompt(&mut self, t: TeacherPrompt) {
        self.teacher = Some(t);
    }

    /// Feed `prefix` (kept whole: template, system prompt), then compress `context`
    /// while feeding it, as the eviction settings say, and report what that did.
    /// Nothing after the context is seen before it is compressed (query-agnostic).
    ///
    /// The logits returned are those of the last context token, computed before the
    /// last eviction step; what follows the context (a question) is meant to be fed
    /// next, against the compressed cache.
    pub fn feed_context(
        &mut self,
        prefix: &[u32],
        context: &[u32],
    ) -> Result<(Vec<f32>, CompressReport), SessionError> {
        self.feed_context_with_progress(prefix, context, &mut |_, _| {})
    }

    /// [`Session::feed_context`], telling `progress` after each chunk of the context
    /// (the KVzip teacher's passes, after the last chunk, are not counted).
    pub fn feed_context_with_progress(
        &mut self,
        prefix: &[u32],
        context: &[u32],
        progress: Progress,
    ) -> Result<(Vec<f32>, CompressReport), SessionError> {
        let t0 = Instant::now();
        let cfg = self.eviction.clone();
        let evicting = cfg.policy != Policy::Full && cfg.keep < 1.0 && !context.is_empty();
        if evicting && cfg.policy == Policy::KvZip {
            // Fail before the prefill rather than after it.
            let ctx_end = self.cache.n_seen() + prefix.len() + context.len();
            self.check_teacher_fits(ctx_end, context.len())?;
        }
        let mut logits = self.feed(prefix)?;
        let ctx_start = self.cache.n_seen();
        // The prefix, and at least the first tokens (attention sinks), are never judged.
        self.judged_below = self.judged_below.max(ctx_start).max(SINK_TOKENS);
        // The context tokens that will be judged or kept in the window.
        let n = (ctx_start + context.len()).saturating_sub(self.judged_below);
        let (window, keep_outside) = cfg.window_plan(n);
        let mut report = CompressReport {
            n_context: context.len(),
            window,
            ..CompressReport::default()
        };
        let n = context.len();
        let chunk_len = self.prefill_chunk;
        let mut done = |i: usize, chunk: &[u32]| progress((i * chunk_len + chunk.len()).min(n), n);
        if !evicting {
            if !context.is_empty() {
                logits = self.feed_with_progress(context, progress)?;
            }
        } else if cfg.policy.scores_incrementally() {
            let n_chunks = context.len().div_ceil(self.prefill_chunk);
            for (i, chunk) in context.chunks(self.prefill_chunk).enumerate() {
                if cfg.policy == Policy::SnapKv {
                    // SnapKV scores afresh from the newest queries (the chunk's last 32).
                    let from = self.judged_below;
                    self.reset_scores(from);
                }
                let probe = cfg.policy.probe(chunk.len());
                logits = self.forward(chunk, last_logits(i, n_chunks), probe)?;
                if cfg.policy == Policy::SnapKv {
                    let from = self.judged_below;
                    self.pool_scores(from);
                }
                let judge_to = self.cache.n_seen().saturating_sub(window);
                self.judge(judge_to, keep_outside);
                if cfg.mode == EvictMode::Compact {
                    // A list that outgrew its room moved and left its old block to the
                    // allocator; give such holes back now, or the peak memory of a long
                    // prefill is the kept pairs plus every hole left on the way.
                    release_freed_memory();
                }
                done(i, chunk);
            }
        } else {
            let n_chunks = context.len().div_ceil(self.prefill_chunk);
            for (i, chunk) in context.chunks(self.prefill_chunk).enumerate() {
                logits = self.forward(chunk, last_logits(i, n_chunks), None)?;
                done(i, chunk);
            }
            let t = Instant::now();
            self.run_teacher(ctx_start, self.cache.n_seen())?;
            report.teacher_ms = t.elapsed().as_secs_f64() * 1e3;
            let judge_to = self.cache.n_seen().saturating_sub(window);
            self.judge(judge_to, keep_outside);
        }
        if evicting && cfg.mode == EvictMode::Compact {
            // Lists kept spare room between chunks for the next appends; now that the
            // context is in, hold exactly what is kept.
            self.cache.shrink_to_fit();
            release_freed_memory();
        }
        report.kv_bytes_full = self.cache.full_bytes();
        report.kv_bytes = self.cache.bytes();
        report.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok((logits, report))
    }

    /// The first half of one-shot compression, the protocol of the method papers'
    /// tables: feed `prefix`, then the whole `context` with the full cache, and score
    /// every context pair under each of `policies` from that single prefill (H2O: the
    /// attention every context query gave; SnapKV: that of the last 32, max-pooled;
    /// KVzip: its teacher; gated: the gates, as the tokens arrive).
    /// [`Session::compress_scored`] then evicts a copy of this session for any policy
    /// and keep ratio without prefilling again. Nothing after
    /// the context is seen (query-agnostic). Returns the last context token's logits.
    pub fn feed_context_scored(
        &mut self,
        prefix: &[u32],
        context: &[u32],
        policies: &[Policy],
    ) -> Result<(Vec<f32>, ContextScores), SessionError> {
        let t0 = Instant::now();
        let wants = |p: Policy| policies.contains(&p);
        if wants(Policy::KvZip) && !context.is_empty() {
            let ctx_end = self.cache.n_seen() + prefix.len() + context.len();
            self.check_teacher_fits(ctx_end, context.len())?;
        }
        if wants(Policy::Gated) && self.gate.is_none() {
            return Err(SessionError::NoGates);
        }
        let mut logits = self.feed(prefix)?;
        let ctx_start = self.cache.n_seen();
        self.judged_below = self.judged_below.max(ctx_start).max(SINK_TOKENS);
        if wants(Policy::Gated) {
            self.gates_aside(true);
        }
        // H2O observes every context query, SnapKV the last 32. When both are wanted,
        // those 32 are fed on their own so that their attention can be kept apart;
        // otherwise the context is fed in the same chunks as `feed_context` feeds it.
        let n = context.len();
        let window_from = n - n.min(SNAPKV_WINDOW);
        let split = if wants(Policy::H2o) && wants(Policy::SnapKv) {
            window_from
        } else {
            n
        };
        let probe = |a: usize, b: usize| {
            let first_row = if wants(Policy::H2o) {
                0
            } else if wants(Policy::SnapKv) && b > window_from {
                window_from.max(a) - a
            } else {
                return None;
            };
            Some(Probe {
                first_row,
                reduce: Reduce::Sum,
                keys: KeyFilter::Visible,
            })
        };
        self.reset_scores(0);
        let n_chunks = split.div_ceil(self.prefill_chunk);
        for (i, chunk) in context[..split].chunks(self.prefill_chunk).enumerate() {
            let a = i * self.prefill_chunk;
            let want = if split == n {
                last_logits(i, n_chunks)
            } else {
                Logits::None
            };
            logits = self.forward(chunk, want, probe(a, a + chunk.len()))?;
        }
        let before_window = self.list_scores();
        if split < n {
            self.reset_scores(0);
            logits = self.forward(&context[split..], Logits::Last, probe(split, n))?;
        }
        let window = self.list_scores();
        let gated = self.gates_aside(false);
        let from = self.judged_below;
        let mut out = ContextScores {
            n_context: context.len(),
            scores: Vec::new(),
            prefill_ms: 0.0,
            teacher_ms: 0.0,
        };
        for &policy in policies {
            let scores = match policy {
                Policy::Full => continue,
                Policy::H2o if split < n => before_window
                    .iter()
                    .zip(&window)
                    .map(|(a, b)| {
                        let mut s = b.clone();
                        s.iter_mut().zip(a).for_each(|(x, y)| *x += y);
                        s
                    })
                    .collect(),
                Policy::H2o => before_window.clone(),
                Policy::SnapKv => {
                    let mut s = window.clone();
                    for (h, list) in self.cache.evictable_heads().zip(&mut s) {
                        let j = h.pos.partition_point(|&p| (p as usize) < from);
                        max_pool(&mut list[j..], SNAPKV_KERNEL);
                    }
                    s
                }
                Policy::KvZip => {
                    let t = Instant::now();
                    self.run_teacher(ctx_start, self.cache.n_seen())?;
                    out.teacher_ms += t.elapsed().as_secs_f64() * 1e3;
                    self.list_scores()
                }
                Policy::Gated => gated.clone().ok_or(SessionError::NoGates)?,
                Policy::Streaming | Policy::Random => {
                    self.set_arrival_scores(policy, 0);
                    self.list_scores()
                }
            };
            out.scores.push((policy, scores));
        }
        self.reset_scores(0);
        out.prefill_ms = t0.elapsed().as_secs_f64() * 1e3 - out.teacher_ms;
        Ok((logits, out))
    }

    /// The second half of one-shot compression: with the scores of `policy` from
    /// [`Session::feed_context_scored`] (on this session or the one it was cloned
    /// from), keep the fraction `cfg.keep` of the context's pairs, with the same
    /// window, sinks and selection as [`Session::feed_context`], and use `cfg` from
    /// now on.
    pub fn compress_scored(
        &mut self,
        scores: &ContextScores,
        cfg: EvictionConfig,
    ) -> Result<CompressReport, SessionError> {
        self.set_eviction(cfg.clone())?;
        let n = scores
            .n_context
            .min(self.cache.n_seen().saturating_sub(self.judged_below));
        let (window, keep_outside) = cfg.window_plan(n);
        let mut report = CompressReport {
            n_context: scores.n_context,
            window,
            prefill_ms: scores.prefill_ms,
            teacher_ms: scores.teacher_ms,
            ..CompressReport::default()
        };
        if cfg.policy != Policy::Full && cfg.keep < 1.0 {
            let lists = scores.of(cfg.policy).ok_or_else(|| {
                SessionError::BadEviction(format!("no {} scores were computed", cfg.policy))
            })?;
            for (h, s) in self.cache.evictable_heads_mut().zip(lists) {
                if h.score.len() != s.len() {
                    return Err(SessionError::BadEviction(
                        "the scores belong to another context".into(),
                    ));
                }
                h.score.copy_from_slice(s);
            }
            let judge_to = self.cache.n_seen().saturating_sub(window);
            self.judge(judge_to, keep_outside);
            if cfg.mode == EvictMode::Compact {
                self.cache.shrink_to_fit();
                release_freed_memory();
            }
        }
        report.kv_bytes_full = self.cache.full_bytes();
        report.kv_bytes = self.cache.bytes();
        Ok(report)
    }

    /// The scores of every evictable list, in [`KvCache::evictable_heads`] order.
    fn list_scores(&self) -> Vec<Vec<f32>> {
        self.cache
            .evictable_heads()
            .map(|h| h.score.clone())
            .collect()
    }

    /// Whether the KVzip teacher can score a context of `n` tokens ending at position
    /// `ctx_end`: the context must lie within the model's training context. Its
    /// repeat passes (instruction, header and one chunk of at most [`KVZIP_CHUNK`]
    /// tokens, run after the context and then dropped) may reach past it by that
    /// much, so that a context that fills the model's context can be scored too;
    /// RoPE then extrapolates a little, for a pass whose only output is the scores.
    pub fn check_teacher_fits(&self, ctx_end: usize, n: usize) -> Result<(), SessionError> {
        self.teacher_end(ctx_end, n).map(drop)
    }

    /// The position after the teacher's longest repeat pass, once it is checked.
    fn teacher_end(&self, ctx_end: usize, n: usize) -> Result<usize, SessionError> {
        let t = self.teacher.as_ref().ok_or(SessionError::NoTeacherPrompt)?;
        let n_ctx_train = self.model.config.n_ctx_train;
        if ctx_end > n_ctx_train {
            return Err(SessionError::TeacherTooLong {
                needed: ctx_end,
                n_ctx_train,
            });
        }
        // The longest repeat input: instruction, header and one chunk.
        let longest = t.header.len()
            + if n > KVZIP_CHUNK {
                t.first.len().max(t.next.len() + KVZIP_QUOTE) + KVZIP_CHUNK
            } else {
                t.first.len() + n
            };
        Ok(ctx_end + longest)
    }

    /// Score every context pair with the KVzip teacher: for each chunk of the context
    /// `ctx_start..ctx_end`, run the repeat prompt and that chunk after the context,
    /// take each pair's largest attention probability, then drop the repeat's KV.
    pub fn run_teacher(&mut self, ctx_start: usize, ctx_end: usize) -> Result<(), SessionError> {
        let positions = self.teacher_end(self.cache.n_seen(), ctx_end - ctx_start)?;
        let t = self.teacher.clone().ok_or(SessionError::NoTeacherPrompt)?;
        for h in self.cache.evictable_heads_mut() {
            let from = h.pos.partition_point(|&p| (p as usize) < ctx_start);
            let to = h.pos.partition_point(|&p| (p as usize) < ctx_end);
            h.score[from..to].fill(0.0);
        }
        let own_from = self.cache.n_seen() as u32;
        for chunk_start in (ctx_start..ctx_end).step_by(KVZIP_CHUNK) {
            let chunk_end = (chunk_start + KVZIP_CHUNK).min(ctx_end);
            let mut input = if chunk_start == ctx_start {
                t.first.clone()
            } else {
                let mut v = t.next.clone();
                v.extend_from_slice(&self.tokens[chunk_start - KVZIP_QUOTE..chunk_start]);
                v
            };
            input.extend_from_slice(&t.header);
            input.extend_from_slice(&self.tokens[chunk_start..chunk_end]);
            let probe = Probe {
                first_row: 0,
                reduce: Reduce::Max,
                keys: KeyFilter::Chunk {
                    prefix_end: ctx_start as u32,
                    chunk_start: chunk_start as u32,
                    chunk_end: chunk_end as u32,
                    own_from,
                },
            };
            let checkpoint = self.cache.checkpoint();
            let mut result = Ok(());
            for sub in input.chunks(self.prefill_chunk) {
                result = self
                    .model
                    .forward_observed(
                        sub,
                        &mut self.cache,
                        Logits::None,
                        positions,
                        Some(&probe),
                        None,
                    )
                    .map(drop);
                self.peak_kv_bytes = self.peak_kv_bytes.max(self.cache.bytes());
                if result.is_err() {
                    break;
                }
            }
            self.cache.rollback(checkpoint);
            result?;
        }
        Ok(())
    }

    /// Judge the pairs of positions `judged_below..to` in evictable lists: keep the
    /// best `keep` fraction of them (at the configured level), evict the rest.
    fn judge(&mut self, to: usize, keep: f64) {
        let from = self.judged_below;
        if to <= from {
            return;
        }
        self.flush_gates();
        let cands = self.candidates(|p| (from..to).contains(&p));
        self.evict_unselected(&cands, keep);
        self.judged_below = to;
    }

    /// Pairs of evictable lists whose position passes `admit` and that are not
    /// already masked.
    fn candidates(&self, admit: impl Fn(usize) -> bool) -> Vec<Candidate> {
        let mut out = Vec::new();
        for (il, l) in self.cache.layers.iter().enumerate() {
            if !l.is_evictable() {
                continue;
            }
            for (h, head) in l.heads.iter().enumerate() {
                for (j, (&pos, &score)) in head.pos.iter().zip(&head.score).enumerate() {
                    if admit(pos as usize) && !head.is_masked(j) {
                        out.push(Candidate {
                            layer: il,
                            head: h,
                            index: j,
                            pos,
                            score,
                        });
                    }
                }
            }
        }
        out
    }

    /// Keep the best `keep` fraction of `cands` and evict the others.
    fn evict_unselected(&mut self, cands: &[Candidate], keep: f64) {
        let flags = select(cands, keep, self.eviction.level);
        if flags.iter().all(|&k| k) {
            return;
        }
        let mode = self.eviction.mode;
        let mut i = 0;
        while i < cands.len() {
            let (il, h) = (cands[i].layer, cands[i].head);
            let mut keep_list = vec![true; self.cache.layers[il].heads[h].len()];
            while i < cands.len() && (cands[i].layer, cands[i].head) == (il, h) {
                keep_list[cands[i].index] = flags[i];
                i += 1;
            }
            self.cache.evict(il, h, &keep_list, mode);
        }
    }

    /// Set the scores of evictable entries at positions `from..` to 0 (SnapKV starts
    /// every observation afresh).
    fn reset_scores(&mut self, from: usize) {
        for h in self.cache.evictable_heads_mut() {
            let j = h.pos.partition_point(|&p| (p as usize) < from);
            h.score[j..].fill(0.0);
        }
    }

    /// SnapKV's max-pooling of the scores of entries at positions `from..` in every
    /// evictable list. Pooling needs neighbours in position: below `from` lists may
    /// have been compacted, from there on they hold every token.
    fn pool_scores(&mut self, from: usize) {
        for h in self.cache.evictable_heads_mut() {
            let j = h.pos.partition_point(|&p| (p as usize) < from);
            max_pool(&mut h.score[j..], SNAPKV_KERNEL);
        }
    }

    /// Arrival scores for the entries from position `start` on (streaming: recency;
    /// random: a seeded draw). Policies that observe attention set their own.
    pub(super) fn score_arrivals(&mut self, start: usize) {
        let policy = self.eviction.policy;
        if !self.eviction.is_active() || !matches!(policy, Policy::Streaming | Policy::Random) {
            return;
        }
        self.set_arrival_scores(policy, start);
    }

    /// Give the entries from position `start` on `policy`'s arrival scores.
    fn set_arrival_scores(&mut self, policy: Policy, start: usize) {
        let seed = self.eviction.seed;
        for (il, l) in self.cache.layers.iter_mut().enumerate() {
            if !l.is_evictable() {
                continue;
            }
            for (h, head) in l.heads.iter_mut().enumerate() {
                let j0 = head.pos.partition_point(|&p| (p as usize) < start);
                for j in j0..head.len() {
                    head.score[j] = policy.arrival_score(seed, il, h, head.pos[j]);
                }
            }
        }
    }

    /// The attention to observe while feeding `n` tokens outside context compression:
    /// H2O always (it accumulates), SnapKV over the last 32 tokens before the decode
    /// budget is next enforced (its observation window; scores restart there).
    pub(super) fn budget_probe(&mut self, n: usize) -> Option<Probe> {
        let policy = self.eviction.policy;
        if !self.eviction.is_active() || self.eviction.budget.is_none() {
            return None;
        }
        match policy {
            Policy::H2o => policy.probe(n),
            Policy::SnapKv => {
                let (s, end) = (self.since_budget, self.since_budget + n);
                let window_start = if end >= BUDGET_PERIOD {
                    end - SNAPKV_WINDOW
                } else {
                    BUDGET_PERIOD - SNAPKV_WINDOW
                };
                if end <= window_start {
                    return None;
                }
                if window_start >= s {
                    self.reset_scores(0);
                }
                Some(Probe {
                    first_row: window_start.saturating_sub(s),
                    reduce: Reduce::Sum,
                    keys: KeyFilter::Visible,
                })
            }
            _ => None,
        }
    }

    /// Count fed tokens and enforce the decode budget every 128 of them.
    pub(super) fn after_feed(&mut self, n: usize) {
        let Some(budget) = self.eviction.budget.filter(|_| self.eviction.is_active()) else {
            return;
        };
        self.since_budget += n;
        if self.since_budget < BUDGET_PERIOD {
            return;
        }
        self.since_budget = 0;
        if self.eviction.policy == Policy::SnapKv {
            self.pool_scores(0);
        }
        self.flush_gates();
        let n_seen = self.cache.n_seen();
        let recent_from = n_seen.saturating_sub(BUDGET_RECENT);
        let cands = self.candidates(|p| p >= SINK_TOKENS && p < recent_from);
        let n_lists = self.cache.evictable_heads().count();
        let live: usize = self
            .cache
            .evictable_heads()
            .map(|h| (0..h.len()).filter(|&j| !h.is_masked(j)).count())
            .sum();
        let protected = live - cands.len();
        let allowed = (budget * n_lists).saturating_sub(protected);
        if cands.len() > allowed {
            self.evict_unselected(&cands, allowed as f64 / cands.len() as f64);
            if self.eviction.mode == EvictMode::Compact {
                self.cache.shrink_to_fit();
                release_freed_memory();
            }
        }
    }

    /// Save the context (tokens, compressed cache, eviction progress) to `path`.
    pub fn save_context(&mut self, path: &Path) -> Result<(), SessionError> {
        self.flush_gates();
        SavedContext::save(
            path,
            self.model.file().fingerprint(),
            &self.tokens,
            &self.cache,
            self.judged_below as u32,
        )?;
        Ok(())
    }

    /// Replace this session's context by one saved with [`Session::save_context`] for
    /// the same model.
    pub fn load_context(&mut self, path: &Path) -> Result<(), SessionError> {
        let saved = SavedContext::load(
            path,
            self.model.file().fingerprint(),
            &self.model.kv_shape(),
        )?;
        let n_vocab = self.model.config.n_vocab;
        if let Some(&bad) = saved.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::BadToken(bad).into());
        }
        if saved.tokens.len() >= self.n_ctx {
            return Err(SessionError::SavedTooLong {
                n: saved.tokens.len(),
                n_ctx: self.n_ctx,
            });
        }
        self.tokens = saved.tokens;
        self.cache = saved.cache;
        self.judged_below = saved.judged_below as usize;
        self.since_budget = 0;
        self.reset_gates();
        self.peak_kv_bytes = self.peak_kv_bytes.max(self.cache.bytes());
        Ok(())
    }
}

/// Logits only for the last of `n` chunks.
fn last_logits(i: usize, n: usize) -> Logits {
    if i + 1 == n {
        Logits::Last
    } else {
        Logits::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recent window: 4096 tokens from 16000 on (the Fast KVzip reference), below
    /// that 2% of the context or a quarter of what is kept, never more than what is
    /// kept; the ratio outside it leaves r*n pairs in all.
    #[test]
    fn window_plan() {
        let cfg = |keep| EvictionConfig::new(Policy::Gated, keep);
        assert_eq!(cfg(0.3).window_plan(1000).0, 75);
        assert_eq!(cfg(0.3).window_plan(8192).0, 614);
        assert_eq!(cfg(0.02).window_plan(15_000).0, 300);
        let (w, r) = cfg(0.3).window_plan(32_768);
        assert_eq!(w, 4096);
        let kept = w as f64 + r * (32_768 - w) as f64;
        assert!((kept - 0.3 * 32_768.0).abs() < 1e-6, "{kept}");
        // A window larger than what is kept is cut to it.
        assert_eq!(cfg(0.1).window_plan(20_000), (2000, 0.0));
        // Given, it is used as is; StreamingLLM keeps one window of r*n.
        let given = EvictionConfig {
            window: Some(100),
            ..cfg(0.5)
        };
        assert_eq!(given.window_plan(1000).0, 100);
        assert_eq!(
            EvictionConfig::new(Policy::Streaming, 0.3).window_plan(20_000),
            (6000, 0.0)
        );
    }
}
