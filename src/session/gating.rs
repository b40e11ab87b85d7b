//! Fast KVzip gate scoring in the session (`fast-kvzip.md`, section 5). The model
//! hands each layer's attention input to the session while it runs; the gates turn
//! it into one score per new KV pair, which lands in the cache's scores for the
//! eviction schedule to use like any other policy's.
//!
//! A forward call of at least [`GATE_DIRECT`] tokens (a prefill chunk) is scored at
//! once, inside the forward pass, while its inputs are in cache. Smaller calls
//! (decode: one token) buffer their inputs and are scored [`GATE_BATCH`] at a time,
//! so the gate weights are read once per batch rather than once per token. Before
//! anything is judged the buffer is flushed, so no pair is ever judged unscored.
use std::sync::Arc;

use rayon::prelude::*;

use super::Session;
use crate::gate::Gates;
use crate::kv::{KvCache, Policy};
use crate::model::AttnInput;

/// Tokens scored together (the spec's decode buffer of 128).
pub const GATE_BATCH: usize = 128;

/// A forward call of this many tokens or more is scored directly rather than
/// buffered: the gate weights are still read only once per 32 tokens at most, and
/// the buffer (n_embd floats per token and gated layer: 7 MiB for 100 SmolLM2
/// tokens) never holds the short last chunk of a long prefill.
const GATE_DIRECT: usize = 32;

impl AttnInput for GateScorer {
    fn attn_input(&mut self, layer: usize, x: &[f32]) {
        self.push(layer, x);
    }
}

/// Gates and the attention inputs waiting for them.
#[derive(Clone)]
pub(super) struct GateScorer {
    gates: Arc<Gates>,
    /// Per model layer, the buffered inputs (rows of n_embd) of the tokens from
    /// position `pending_from` on; empty for layers without a gate.
    pending: Vec<Vec<f32>>,
    pending_from: usize,
    /// Whether the current forward call's inputs are scored at once.
    direct: Option<usize>,
    /// Scores computed but not yet written to the cache: (layer, first position,
    /// n x H scores).
    ready: Vec<(usize, usize, Vec<f32>)>,
    /// Keep computed scores in `ready` instead of writing them to the cache (one-shot
    /// scoring keeps the gates' scores apart from the attention policies').
    pub(super) aside: bool,
}

impl GateScorer {
    pub(super) fn new(gates: Arc<Gates>) -> Self {
        let n_layer = gates.meta.n_layer;
        Self {
            gates,
            pending: vec![Vec::new(); n_layer],
            pending_from: 0,
            direct: None,
            ready: Vec::new(),
            aside: false,
        }
    }

    pub(super) fn gates(&self) -> &Arc<Gates> {
        &self.gates
    }

    /// Tokens whose inputs wait in the buffer (every gated layer holds the same).
    fn n_pending(&self) -> usize {
        let s = self.gates.shape();
        self.gates
            .gated()
            .next()
            .map_or(0, |(il, _)| self.pending[il].len() / s.n_embd)
    }

    /// A forward call of `n` tokens from position `start` begins.
    fn begin(&mut self, start: usize, n: usize) {
        let empty = self.n_pending() == 0;
        self.direct = (empty && n >= GATE_DIRECT).then_some(start);
        if empty {
            self.pending_from = start;
        }
    }

    /// Layer `il`'s attention inputs for the tokens of the current call.
    fn push(&mut self, il: usize, x: &[f32]) {
        let Some(gate) = self.gates.layer(il) else {
            return;
        };
        match self.direct {
            Some(start) => {
                let s = self.gates.shape();
                let mut scores = vec![0f32; x.len() / s.n_embd * s.n_head_kv];
                gate.score(s, x, &mut scores);
                self.ready.push((il, start, scores));
            }
            None => self.pending[il].extend_from_slice(x),
        }
    }

    /// Score every buffered token, all gated layers in parallel.
    fn flush(&mut self) {
        if self.n_pending() == 0 {
            return;
        }
        let gates = &self.gates;
        let s = gates.shape();
        let from = self.pending_from;
        let mut scored: Vec<(usize, usize, Vec<f32>)> = self
            .pending
            .par_iter_mut()
            .enumerate()
            .filter_map(|(il, x)| {
                let gate = gates.layer(il)?;
                let mut scores = vec![0f32; x.len() / s.n_embd * s.n_head_kv];
                gate.score(s, x, &mut scores);
                // Give the buffer back (decode refills it slowly; a prefill may have
                // filled it with a whole chunk).
                *x = Vec::new();
                Some((il, from, scores))
            })
            .collect();
        self.ready.append(&mut scored);
    }

    /// Write the computed scores into the entries of `cache` they belong to (found by
    /// position; entries already gone are skipped).
    fn apply(&mut self, cache: &mut KvCache) {
        let h_n = self.gates.shape().n_head_kv;
        for (il, from, scores) in self.ready.drain(..) {
            let n = scores.len() / h_n;
            for (h, head) in cache.layers[il].heads.iter_mut().enumerate() {
                let j0 = head.pos.partition_point(|&p| (p as usize) < from);
                for j in j0..head.len() {
                    let t = head.pos[j] as usize - from;
                    if t >= n {
                        break;
                    }
                    head.score[j] = scores[t * h_n + h];
                }
            }
        }
    }

    /// Forget buffered inputs and unwritten scores (the cache was cleared or replaced).
    fn reset(&mut self) {
        self.pending.iter_mut().for_each(Vec::clear);
        self.ready.clear();
    }
}

impl Session<'_> {
    /// Use these gates for the `gated` policy (they must belong to this model: see
    /// [`Gates::load`]).
    pub fn set_gates(&mut self, gates: Arc<Gates>) {
        self.gate = Some(GateScorer::new(gates));
    }

    /// The gates in use, if any.
    pub fn gates(&self) -> Option<&Arc<Gates>> {
        self.gate.as_ref().map(GateScorer::gates)
    }

    /// Whether the current forward calls are gate-scored: under the gated policy
    /// (at any keep ratio: its scores are what later eviction uses), or while
    /// one-shot scoring collects them.
    pub(super) fn gating(&self) -> bool {
        self.gate
            .as_ref()
            .is_some_and(|g| g.aside || self.eviction.policy == Policy::Gated)
    }

    /// A forward call of `n` tokens from position `start` begins; returns what
    /// receives the attention inputs (the gates, when gating).
    pub(super) fn gate_begin(&mut self, start: usize, n: usize) -> Option<&mut GateScorer> {
        if !self.gating() {
            return None;
        }
        let g = self.gate.as_mut().expect("gating implies gates");
        g.begin(start, n);
        Some(g)
    }

    /// The forward call that [`Session::gate_begin`] announced is done: score a full
    /// buffer and write what is scored to the cache.
    pub(super) fn gate_end(&mut self) {
        if !self.gating() {
            return;
        }
        let g = self.gate.as_mut().expect("gating implies gates");
        if g.n_pending() >= GATE_BATCH {
            g.flush();
        }
        if !g.aside {
            g.apply(&mut self.cache);
        }
    }

    /// Score every buffered token now and write the scores to the cache (before
    /// pairs are judged, saved or cut).
    pub(super) fn flush_gates(&mut self) {
        if let Some(g) = self.gate.as_mut() {
            g.flush();
            if !g.aside {
                g.apply(&mut self.cache);
            }
        }
    }

    /// Forget what the gates hold for the cache's tokens (cleared or replaced).
    pub(super) fn reset_gates(&mut self) {
        if let Some(g) = self.gate.as_mut() {
            g.reset();
        }
    }

    /// One-shot scoring: gate scores are kept apart from the others while
    /// `on`; when turned off, the scores collected are returned per evictable list
    /// (in [`KvCache::evictable_heads`] order), all other scores left as they were.
    pub(super) fn gates_aside(&mut self, on: bool) -> Option<Vec<Vec<f32>>> {
        let g = self.gate.as_mut()?;
        if on {
            g.aside = true;
            return None;
        }
        g.flush();
        g.aside = false;
        let saved: Vec<Vec<f32>> = self
            .cache
            .evictable_heads()
            .map(|h| h.score.clone())
            .collect();
        for h in self.cache.evictable_heads_mut() {
            h.score.fill(0.0);
        }
        self.gate.as_mut()?.apply(&mut self.cache);
        let mut gated = Vec::with_capacity(saved.len());
        for (h, s) in self.cache.evictable_heads_mut().zip(saved) {
            gated.push(std::mem::replace(&mut h.score, s));
        }
        Some(gated)
    }
}
