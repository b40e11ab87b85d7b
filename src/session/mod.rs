//! A conversation with a model: the cache, the tokens it holds, the prefill/decode
//! loop and the eviction schedule (see [`eviction`]). Front ends (CLI, server) drive
//! a `Session`; the model never sees more than one call of `forward` at a time.
mod eviction;
mod gating;

pub use eviction::{
    CompressReport, ContextScores, EvictionConfig, SessionError, TeacherPrompt, KVZIP_CHUNK,
};
pub use gating::GATE_BATCH;

use gating::GateScorer;

use crate::kv::{KvCache, Probe};
use crate::model::{Logits, Model, ModelError, Sequence};

/// Default number of tokens per prefill call: large enough to amortise reading the
/// weights, small enough to bound scratch memory.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Told, after each prefill chunk, how many of the tokens being fed are in and how
/// many there are (a front end draws a progress bar with it).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// A model together with a KV cache and the token ids the cache holds. Cloning one
/// copies its cache (the eval harness compresses copies of one prefilled context).
#[derive(Clone)]
pub struct Session<'m> {
    model: &'m Model,
    cache: KvCache,
    tokens: Vec<u32>,
    n_ctx: usize,
    prefill_chunk: usize,
    peak_kv_bytes: usize,
    eviction: EvictionConfig,
    teacher: Option<TeacherPrompt>,
    /// Positions below this were judged by prefill eviction (or are a protected prefix).
    judged_below: usize,
    /// Tokens fed since the decode budget was last enforced.
    since_budget: usize,
    /// Fast KVzip gates, for the gated policy.
    gate: Option<GateScorer>,
}

impl<'m> Session<'m> {
    /// A session with room for `n_ctx` tokens (capped at the model's training context).
    pub fn new(model: &'m Model, n_ctx: usize) -> Self {
        Self {
            model,
            cache: model.new_cache(),
            tokens: Vec::new(),
            n_ctx: n_ctx.clamp(1, model.config.n_ctx_train),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            peak_kv_bytes: 0,
            eviction: EvictionConfig::default(),
            teacher: None,
            judged_below: 0,
            since_budget: 0,
            gate: None,
        }
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    /// Tokens in the cache, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }
    /// Bytes the KV cache holds now.
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }
    /// The most bytes the KV cache has held.
    pub fn peak_kv_bytes(&self) -> usize {
        self.peak_kv_bytes
    }

    pub fn set_prefill_chunk(&mut self, n: usize) {
        self.prefill_chunk = n.max(1);
    }

    /// Feed `tokens` after what the cache holds, in chunks; returns the logits of the
    /// last token (empty if `tokens` is empty). Under a decode budget, eviction runs
    /// as the tokens arrive.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.feed_with_progress(tokens, &mut |_, _| {})
    }

    /// [`Session::feed`], telling `progress` after each chunk.
    pub fn feed_with_progress(
        &mut self,
        tokens: &[u32],
        progress: Progress,
    ) -> Result<Vec<f32>, ModelError> {
        let mut last = Vec::new();
        let n_chunks = tokens.len().div_ceil(self.prefill_chunk);
        for (i, chunk) in tokens.chunks(self.prefill_chunk).enumerate() {
            let want = if i + 1 == n_chunks {
                Logits::Last
            } else {
                Logits::None
            };
            let probe = self.budget_probe(chunk.len());
            last = self.forward(chunk, want, probe)?;
            self.after_feed(chunk.len());
            progress(
                (i * self.prefill_chunk + chunk.len()).min(tokens.len()),
                tokens.len(),
            );
        }
        Ok(last)
    }

    /// Feed `tokens` with the full cache, handing every layer's attention input to
    /// `tap` as (layer, position of the chunk's first token, rows of n_embd). Gate
    /// training records its features this way; no eviction runs.
    pub fn feed_observing(
        &mut self,
        tokens: &[u32],
        tap: &mut dyn FnMut(usize, usize, &[f32]),
    ) -> Result<(), ModelError> {
        for chunk in tokens.chunks(self.prefill_chunk) {
            let start = self.cache.n_seen();
            let mut at = |il: usize, x: &[f32]| tap(il, start, x);
            self.model.forward_observed(
                chunk,
                &mut self.cache,
                Logits::None,
                self.n_ctx,
                None,
                Some(&mut at),
            )?;
            self.tokens.extend_from_slice(chunk);
            self.peak_kv_bytes = self.peak_kv_bytes.max(self.cache.bytes());
        }
        Ok(())
    }

    /// Feed `tokens` and return the logits of every one of them (n x n_vocab).
    pub fn feed_all_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut all = Vec::with_capacity(tokens.len() * self.model.config.n_vocab);
        for chunk in tokens.chunks(self.prefill_chunk) {
            let probe = self.budget_probe(chunk.len());
            all.extend(self.forward(chunk, Logits::All, probe)?);
            self.after_feed(chunk.len());
        }
        Ok(all)
    }

    /// One forward call, then the scores new entries get on arrival.
    fn forward(
        &mut self,
        chunk: &[u32],
        logits: Logits,
        probe: Option<Probe>,
    ) -> Result<Vec<f32>, ModelError> {
        let start = self.cache.n_seen();
        self.gate_begin(start, chunk.len());
        let model = self.model;
        let out = model.forward_batch(&mut [self.sequence(chunk, logits, probe.as_ref())]);
        self.forward_done(start, chunk);
        Ok(out?.pop().unwrap_or_default())
    }

    /// Feed several sessions of one model their next tokens in a single forward
    /// pass, so the weights are read once for all of them (a server's step: one token
    /// for each conversation that generates, a chunk of prompt for each that is being
    /// prefilled). Returns each session's logits after its last token. Each session
    /// ends exactly as `feed(tokens)` would leave it, with the same logits, when its
    /// tokens fit in one prefill chunk.
    pub fn feed_batch(
        batch: &mut [(&mut Session<'m>, &[u32])],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(model) = batch.first().map(|(s, _)| s.model) else {
            return Ok(Vec::new());
        };
        assert!(
            batch.iter().all(|(s, _)| std::ptr::eq(s.model, model)),
            "sessions of one batch must share their model"
        );
        let mut probes = Vec::with_capacity(batch.len());
        let mut starts = Vec::with_capacity(batch.len());
        for (s, tokens) in batch.iter_mut() {
            probes.push(s.budget_probe(tokens.len()));
            starts.push(s.cache.n_seen());
            s.gate_begin(s.cache.n_seen(), tokens.len());
        }
        let mut seqs: Vec<Sequence> = batch
            .iter_mut()
            .zip(&probes)
            .map(|((s, t), p)| s.sequence(t, Logits::Last, p.as_ref()))
            .collect();
        let out = model.forward_batch(&mut seqs);
        drop(seqs);
        for ((s, t), start) in batch.iter_mut().zip(starts) {
            s.forward_done(start, t);
        }
        let out = out?;
        for (s, t) in batch.iter_mut() {
            s.after_feed(t.len());
        }
        Ok(out)
    }

    /// This session's part of a forward call: `tokens` after its cache, with the gates
    /// receiving the attention inputs when gating (see [`Session::gate_begin`]).
    fn sequence<'a>(
        &'a mut self,
        tokens: &'a [u32],
        logits: Logits,
        probe: Option<&'a Probe>,
    ) -> Sequence<'a> {
        let gating = self.gating();
        Sequence {
            tokens,
            cache: &mut self.cache,
            logits,
            n_ctx: self.n_ctx,
            probe,
            attn_input: match self.gate.as_mut() {
                Some(g) if gating => Some(g),
                _ => None,
            },
        }
    }

    /// After a forward call of `chunk` from position `start`: gate scores and arrival
    /// scores for the new entries, the token list, the peak size. (A failed call
    /// changed no cache, and `chunk` is then not recorded.)
    fn forward_done(&mut self, start: usize, chunk: &[u32]) {
        self.gate_end();
        if self.cache.n_seen() == start + chunk.len() {
            self.score_arrivals(start);
            self.tokens.extend_from_slice(chunk);
        }
        self.peak_kv_bytes = self.peak_kv_bytes.max(self.cache.bytes());
    }

    /// Make the cache hold exactly `prompt`, reusing the longest common prefix with
    /// what it holds already; returns the logits after `prompt` and how many tokens
    /// had to be run. This is how chat avoids re-reading its history every turn.
    pub fn feed_reusing_prefix(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize), ModelError> {
        self.feed_reusing_prefix_with_progress(prompt, &mut |_, _| {})
    }

    /// [`Session::feed_reusing_prefix`], telling `progress` after each chunk of the
    /// tokens that run.
    pub fn feed_reusing_prefix_with_progress(
        &mut self,
        prompt: &[u32],
        progress: Progress,
    ) -> Result<(Vec<f32>, usize), ModelError> {
        let common = self.keep_prefix_of(prompt);
        let logits = self.feed_with_progress(&prompt[common..], progress)?;
        Ok((logits, prompt.len() - common))
    }

    /// How many tokens the cache holds that `prompt` begins with.
    pub fn shared_prefix(&self, prompt: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Cut the cache back to the longest prefix it shares with `prompt`, leaving at
    /// least the last prompt token to run (it gives the logits); returns the number
    /// of tokens kept. Feeding `prompt[kept..]` next makes the cache hold `prompt`.
    pub fn keep_prefix_of(&mut self, prompt: &[u32]) -> usize {
        let mut common = self.shared_prefix(prompt);
        if common == prompt.len() {
            common = common.saturating_sub(1);
        }
        // Buffered gate inputs must become scores before their tokens may be cut.
        self.flush_gates();
        if !self.cache.truncate(common) {
            self.cache.clear();
            common = 0;
        }
        self.tokens.truncate(common);
        self.judged_below = self.judged_below.min(common);
        common
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.tokens.clear();
        self.judged_below = 0;
        self.since_budget = 0;
        self.reset_gates();
    }
}
