//! The harness that measures what eviction costs: a context is compressed under
//! every variant (policy and keep ratio), then each variant is compared with the
//! full cache on the same model, either on a teacher-forced continuation
//! ([`Harness::fidelity`]) or on questions asked after the context
//! ([`Harness::answer`]). Compression is query-agnostic: nothing after the context
//! is seen before it is compressed.
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rayon::prelude::*;

use super::fidelity::{compare, log_softmax, TokenFidelity};
use super::tasks::{Sample, TaskError};
use crate::gate::Gates;
use crate::kernels::argmax;
use crate::kv::{Level, Policy};
use crate::model::{Model, ModelError};
use crate::session::{CompressReport, EvictionConfig, Session, SessionError, TeacherPrompt};
use crate::tokenizer::{ChatMessage, ChatTemplate, Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error("unknown schedule '{0}' (choose oneshot or chunked)")]
    UnknownSchedule(String),
    #[error("{0}")]
    BadInput(String),
}

/// When a context is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Prefill the whole context with the full cache, score it, evict once: the
    /// protocol of the method papers' tables (and of KVzip in the runtime). One
    /// prefill serves every variant.
    OneShot,
    /// The runtime's chunked prefill ([`Session::feed_context`]): eviction after each
    /// chunk, so later tokens see the compressed cache. One prefill per variant.
    Chunked,
}

impl FromStr for Schedule {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "oneshot" => Ok(Schedule::OneShot),
            "chunked" => Ok(Schedule::Chunked),
            _ => Err(EvalError::UnknownSchedule(s.to_string())),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::OneShot => "oneshot",
            Schedule::Chunked => "chunked",
        })
    }
}

/// A policy at a keep ratio.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    pub policy: Policy,
    pub keep: f64,
    /// Selection level (None: the harness's, else the policy's default).
    pub level: Option<Level>,
    /// Recent window kept whole (None: the harness's, else the runtime's default).
    pub window: Option<usize>,
}

impl Variant {
    /// The full cache: the reference every variant is compared with.
    pub const FULL: Variant = Variant::new(Policy::Full, 1.0);

    /// A policy at a keep ratio, with the harness's level and window.
    pub const fn new(policy: Policy, keep: f64) -> Self {
        Self {
            policy,
            keep,
            level: None,
            window: None,
        }
    }

    /// The policy's name, with the level and window where this variant sets them
    /// (`gated`, `gated/layer`, `gated/w1024`): a line of the report's tables.
    pub fn label(&self) -> String {
        let mut s = self.policy.to_string();
        if let Some(l) = self.level {
            s += &format!("/{l}");
        }
        if let Some(w) = self.window {
            s += &format!("/w{w}");
        }
        s
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.label(), self.keep)
    }
}

/// How questions are framed: inside the model's chat template (the context opens
/// the user message, the question ends it, the answer prefix opens the reply), or
/// as plain text for a model without one.
#[derive(Debug, Clone)]
pub struct PromptFormat {
    /// Tokens before the context (BOS, system message, user turn opening).
    head: Vec<u32>,
    /// Text between the question and the answer prefix.
    tail: String,
    pub chat: bool,
}

impl PromptFormat {
    /// With `template` (the plain fallback means: no template), and a system
    /// message for chat models (None: the template's default).
    pub fn new(
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
        system: Option<&str>,
    ) -> Result<Self, EvalError> {
        if template.is_fallback() {
            return Ok(Self::plain(tokenizer));
        }
        const MARK: &str = "\u{1}";
        let mut msgs: Vec<ChatMessage> = system.map(ChatMessage::system).into_iter().collect();
        msgs.push(ChatMessage::user(MARK));
        let rendered = template.render(&msgs, true)?;
        let (head, tail) = rendered.split_once(MARK).ok_or_else(|| {
            EvalError::BadInput("the chat template drops the user message".into())
        })?;
        let bos_text = tokenizer.bos().and_then(|b| tokenizer.token_text(b));
        let add_bos = !bos_text.is_some_and(|b| head.starts_with(b));
        Ok(Self {
            head: tokenizer.encode(head, add_bos, true),
            tail: tail.to_string(),
            chat: true,
        })
    }

    /// Plain text: BOS (if the model uses one), the context, the question on its own
    /// line, the answer prefix on the next.
    pub fn plain(tokenizer: &Tokenizer) -> Self {
        Self {
            head: tokenizer.encode("", true, false),
            tail: "\n".to_string(),
            chat: false,
        }
    }

    /// The tokens before the context.
    pub fn head(&self) -> &[u32] {
        &self.head
    }

    /// The text that follows the context: the question, the end of the user turn,
    /// the answer prefix.
    pub fn question(&self, question: &str, answer_prefix: &str) -> String {
        format!("\n\n{question}{}{answer_prefix}", self.tail)
    }
}

/// One question's result under one variant.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub variant: Variant,
    /// Index of the question in its sample.
    pub query: usize,
    /// Fraction of the expected strings found in the answer.
    pub score: f64,
    pub text: String,
    /// Fraction of the pairs of the question's evidence (the needles' tokens, in
    /// evictable lists) that compression kept: why an answer was lost.
    pub evidence_kept: f64,
    pub compression: CompressReport,
}

/// One document's continuation under one variant, position by position.
#[derive(Debug, Clone, PartialEq)]
pub struct Continuation {
    pub variant: Variant,
    pub tokens: Vec<TokenFidelity>,
    pub compression: CompressReport,
}

/// Runs variants on one model.
pub struct Harness<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    format: PromptFormat,
    teacher: TeacherPrompt,
    pub schedule: Schedule,
    /// Selection level for every policy (None: each policy's default).
    pub level: Option<Level>,
    /// Recent window of every policy (None: the runtime's default, see
    /// [`crate::session::EvictionConfig::window`]).
    pub window: Option<usize>,
    /// Seed of the random policy.
    pub seed: u64,
    /// Context size of the sessions.
    pub n_ctx: usize,
    /// Fast KVzip gates, for the gated policy.
    pub gates: Option<Arc<Gates>>,
    /// Decode a question's answers under all variants in one batch (the default);
    /// else one variant after the other. Both give the same answers.
    pub batch_decode: bool,
}

impl<'m> Harness<'m> {
    pub fn new(
        model: &'m Model,
        tokenizer: &'m Tokenizer,
        template: &ChatTemplate,
        system: Option<&str>,
    ) -> Result<Self, EvalError> {
        Ok(Self {
            model,
            tokenizer,
            format: PromptFormat::new(tokenizer, template, system)?,
            teacher: TeacherPrompt::new(tokenizer, template)?,
            schedule: Schedule::OneShot,
            level: None,
            window: None,
            seed: 0,
            n_ctx: model.config.n_ctx_train,
            gates: None,
            batch_decode: true,
        })
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    pub fn tokenizer(&self) -> &'m Tokenizer {
        self.tokenizer
    }

    /// Whether questions are framed with the model's chat template (else plain text).
    pub fn uses_chat_template(&self) -> bool {
        self.format.chat
    }

    /// Whether `variant` can run on a context of `n` tokens after `n_prefix`: the
    /// KVzip teacher needs room for its repeat passes. Err says why not.
    pub fn check(&self, variant: Variant, n_prefix: usize, n: usize) -> Result<(), EvalError> {
        if variant.policy == Policy::KvZip && variant.keep < 1.0 {
            self.session()?.check_teacher_fits(n_prefix + n, n)?;
        }
        if variant.policy == Policy::Gated && self.gates.is_none() {
            return Err(SessionError::NoGates.into());
        }
        Ok(())
    }

    /// A fresh session with the full cache (and this harness's seed, which the random
    /// policy's one-shot scores use).
    fn session(&self) -> Result<Session<'m>, EvalError> {
        let mut s = Session::new(self.model, self.n_ctx);
        s.set_teacher_prompt(self.teacher.clone());
        if let Some(g) = &self.gates {
            s.set_gates(g.clone());
        }
        s.set_eviction(self.config(Variant::FULL))?;
        Ok(s)
    }

    fn config(&self, v: Variant) -> EvictionConfig {
        let mut cfg = EvictionConfig::new(v.policy, v.keep);
        if let Some(level) = v.level.or(self.level) {
            cfg.level = level;
        }
        cfg.window = v.window.or(self.window);
        cfg.seed = self.seed;
        cfg
    }

    /// Compress `context` (after the uncompressed `prefix`) under the full cache and
    /// then every variant, calling `each` with a session holding the result.
    /// Variants that cannot run (see [`Harness::check`]) are skipped.
    pub fn for_each_variant(
        &self,
        prefix: &[u32],
        context: &[u32],
        variants: &[Variant],
        mut each: impl FnMut(Variant, Session<'m>, CompressReport) -> Result<(), EvalError>,
    ) -> Result<(), EvalError> {
        let runnable: Vec<Variant> = variants
            .iter()
            .copied()
            .filter(|&v| self.check(v, prefix.len(), context.len()).is_ok())
            .collect();
        match self.schedule {
            Schedule::OneShot => {
                let mut policies: Vec<Policy> = Vec::new();
                for v in runnable.iter().filter(|v| v.keep < 1.0) {
                    if !policies.contains(&v.policy) {
                        policies.push(v.policy);
                    }
                }
                let mut base = self.session()?;
                let (_, scores) = base.feed_context_scored(prefix, context, &policies)?;
                let report = base.compress_scored(&scores, self.config(Variant::FULL))?;
                each(Variant::FULL, base.clone(), report)?;
                for v in runnable {
                    let mut s = base.clone();
                    let report = s.compress_scored(&scores, self.config(v))?;
                    each(v, s, report)?;
                }
            }
            Schedule::Chunked => {
                for v in std::iter::once(Variant::FULL).chain(runnable) {
                    let mut s = self.session()?;
                    s.set_eviction(self.config(v))?;
                    let (_, report) = s.feed_context(prefix, context)?;
                    each(v, s, report)?;
                }
            }
        }
        Ok(())
    }

    /// Compress the first `n_ctx` tokens of `doc` (after BOS, if the model uses one)
    /// and teacher-force the rest: every variant's next-token distributions against
    /// the full cache's. The first result is the full cache's own.
    pub fn fidelity(
        &self,
        doc: &[u32],
        n_ctx: usize,
        variants: &[Variant],
    ) -> Result<Vec<Continuation>, EvalError> {
        if doc.len() < n_ctx + 2 {
            return Err(EvalError::BadInput(format!(
                "a document of {} tokens has no continuation after {n_ctx}",
                doc.len()
            )));
        }
        // BOS alone: plain text documents are not chat turns.
        let prefix = self.tokenizer.encode("", true, false);
        let (context, rest) = doc.split_at(n_ctx);
        let (cont, targets) = (&rest[..rest.len() - 1], &rest[1..]);
        let n_vocab = self.model.config.n_vocab;
        let mut reference: Vec<Vec<f64>> = Vec::new();
        let mut out = Vec::new();
        self.for_each_variant(&prefix, context, variants, |v, mut s, report| {
            let logits = s.feed_all_logits(cont)?;
            if reference.is_empty() {
                reference = logits.par_chunks(n_vocab).map(log_softmax).collect();
            }
            let tokens = logits
                .par_chunks(n_vocab)
                .zip(&reference)
                .zip(targets)
                .map(|((row, r), &t)| compare(r, row, t))
                .collect();
            out.push(Continuation {
                variant: v,
                tokens,
                compression: report,
            });
            Ok(())
        })?;
        Ok(out)
    }

    /// Compress `sample`'s context, then ask each of its questions (in a copy of the
    /// compressed session) and score the greedy answers. Results for the full cache
    /// come first.
    pub fn answer(&self, sample: &Sample, variants: &[Variant]) -> Result<Vec<Answer>, EvalError> {
        let context = self.tokenizer.encode(&sample.context, false, false);
        let queries: Vec<Vec<u32>> = sample
            .queries
            .iter()
            .map(|q| {
                let text = self.format.question(&q.question, &q.answer_prefix);
                self.tokenizer.encode(&text, false, true)
            })
            .collect();
        let longest = queries.iter().map(Vec::len).max().unwrap_or(0);
        let needed = self.format.head.len() + context.len() + longest + 64;
        if needed > self.n_ctx {
            return Err(EvalError::BadInput(format!(
                "a {} prompt needs {needed} tokens but the context is {} (use a shorter length)",
                sample.task, self.n_ctx
            )));
        }
        // Cache positions of each question's evidence.
        let start = self.format.head.len();
        let spans: Vec<Vec<(usize, usize)>> = sample
            .queries
            .iter()
            .map(|q| {
                q.evidence
                    .iter()
                    .filter_map(|e| sample.context.find(e.as_str()).map(|at| (at, at + e.len())))
                    .map(|(a, b)| {
                        let tokens_to = |i: usize| {
                            start
                                + self
                                    .tokenizer
                                    .encode(&sample.context[..i], false, false)
                                    .len()
                        };
                        (tokens_to(a), tokens_to(b))
                    })
                    .collect()
            })
            .collect();
        // Per question: the answers to look for, and how many tokens to decode at most.
        let expected: Vec<(Vec<String>, usize)> = sample
            .queries
            .iter()
            .map(|q| {
                let n: usize = q
                    .answers
                    .iter()
                    .map(|a| self.tokenizer.encode(a, false, false).len() + 1)
                    .sum();
                (
                    q.answers.iter().map(|a| a.to_lowercase()).collect(),
                    2 * n + 8,
                )
            })
            .collect();
        // Every variant's compressed session (one prefill for all of them under the
        // one-shot schedule), then each question under all variants at once.
        let mut compressed: Vec<(Variant, Session<'m>, CompressReport)> = Vec::new();
        self.for_each_variant(&self.format.head, &context, variants, |v, s, report| {
            compressed.push((v, s, report));
            Ok(())
        })?;
        let mut texts: Vec<Vec<String>> = vec![Vec::new(); compressed.len()];
        for (i, tokens) in queries.iter().enumerate() {
            let (answers, max) = &expected[i];
            let done = |text: &str| found(answers, text) == answers.len();
            let mut sessions: Vec<Session<'m>> =
                compressed.iter().map(|(_, s, _)| s.clone()).collect();
            let replies = if self.batch_decode {
                self.greedy_batch(&mut sessions, tokens, *max, done)?
            } else {
                let mut out = Vec::with_capacity(sessions.len());
                for s in &mut sessions {
                    out.push(self.greedy_batch(std::slice::from_mut(s), tokens, *max, done)?);
                }
                out.into_iter().flatten().collect()
            };
            for (t, reply) in texts.iter_mut().zip(replies) {
                t.push(reply);
            }
        }
        let mut out = Vec::new();
        for ((v, s, report), replies) in compressed.iter().zip(texts) {
            for (i, text) in replies.into_iter().enumerate() {
                let answers = &expected[i].0;
                out.push(Answer {
                    variant: *v,
                    query: i,
                    score: found(answers, &text) as f64 / answers.len() as f64,
                    text,
                    evidence_kept: kept_fraction(s, &spans[i]),
                    compression: report.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Feed `prompt` to every session of `sessions` and decode each greedily, all
    /// of them in one forward pass per step (the weights are read once a step for
    /// every session; each session's logits are those it would get alone). A
    /// session stops after at most `max` tokens, at an end of generation, a blank
    /// line after some content, or when `done` says its text so far is enough.
    /// Returns each session's answer.
    fn greedy_batch(
        &self,
        sessions: &mut [Session<'m>],
        prompt: &[u32],
        max: usize,
        done: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, EvalError> {
        let n = sessions.len();
        let mut logits = {
            let mut batch: Vec<(&mut Session<'m>, &[u32])> =
                sessions.iter_mut().map(|s| (s, prompt)).collect();
            Session::feed_batch(&mut batch)?
        };
        let mut ids: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut active = vec![true; n];
        // A blank line ends the answer once it has said something (a list may
        // follow "are:" and a blank line).
        let said = |s: &str| s.chars().any(char::is_alphanumeric);
        for _ in 0..max {
            let mut next: Vec<Option<[u32; 1]>> = vec![None; n];
            for i in 0..n {
                if !active[i] {
                    continue;
                }
                let t = argmax(&logits[i]) as u32;
                let s = &sessions[i];
                if self.tokenizer.is_eog(t) || s.tokens().len() + 1 >= s.n_ctx() {
                    active[i] = false;
                    continue;
                }
                ids[i].push(t);
                let text = self.tokenizer.decode(&ids[i], false);
                if done(&text)
                    || text
                        .rsplit_once("\n\n")
                        .is_some_and(|(before, _)| said(before))
                {
                    active[i] = false;
                    continue;
                }
                next[i] = Some([t]);
            }
            let mut batch: Vec<(&mut Session<'m>, &[u32])> = sessions
                .iter_mut()
                .zip(&next)
                .filter_map(|(s, t)| t.as_ref().map(|t| (s, t.as_slice())))
                .collect();
            if batch.is_empty() {
                break;
            }
            let fed: Vec<usize> = (0..n).filter(|&i| next[i].is_some()).collect();
            for (i, l) in fed.into_iter().zip(Session::feed_batch(&mut batch)?) {
                logits[i] = l;
            }
        }
        Ok(ids
            .iter()
            .map(|ids| self.tokenizer.decode(ids, false).trim().to_string())
            .collect())
    }
}

/// How many of the expected (lower-case) `answers` the text contains.
fn found(answers: &[String], text: &str) -> usize {
    let lower = text.to_lowercase();
    answers
        .iter()
        .filter(|a| lower.contains(a.as_str()))
        .count()
}

/// The fraction of the pairs at positions in `spans` that `s`'s evictable lists
/// still hold (1 when there are none).
fn kept_fraction(s: &Session, spans: &[(usize, usize)]) -> f64 {
    let inside = |p: u32| spans.iter().any(|&(a, b)| (a..b).contains(&(p as usize)));
    let (mut kept, mut lists) = (0usize, 0usize);
    for h in s.cache().evictable_heads() {
        lists += 1;
        kept += h.pos.iter().filter(|&&p| inside(p)).count();
    }
    let total = lists * spans.iter().map(|(a, b)| b - a).sum::<usize>();
    if total == 0 {
        1.0
    } else {
        kept as f64 / total as f64
    }
}
