//! What a decode budget costs over a long generation: the full cache generates
//! greedily after a prompt, and sessions under `--kv-budget` (one per policy and
//! budget) are teacher-forced the same tokens, all of them stepping together in one
//! batched forward pass per token. At every step each budgeted session's next-token
//! distribution is compared with the full cache's (KL divergence, top-1 agreement),
//! and the KV bytes every session holds are recorded: a budget keeps them flat while
//! the full cache grows.
use rayon::prelude::*;

use super::fidelity::{compare, log_softmax, TokenFidelity};
use super::harness::{EvalError, Harness};
use crate::kernels::argmax;
use crate::kv::Policy;
use crate::session::{EvictionConfig, Session};

/// A policy under a decode budget of pairs per (layer, KV head) list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetVariant {
    pub policy: Policy,
    pub budget: usize,
}

impl std::fmt::Display for BudgetVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} budget {}", self.policy, self.budget)
    }
}

/// One session's generation, step by step.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetTrace {
    /// None for the full cache.
    pub variant: Option<BudgetVariant>,
    /// Per generated token: the comparison with the full cache (the full cache's
    /// own trace compares it with itself).
    pub tokens: Vec<TokenFidelity>,
    /// KV bytes held after each generated token.
    pub kv_bytes: Vec<usize>,
}

impl Harness<'_> {
    /// Feed `prompt`, then generate `n_gen` tokens greedily with the full cache (an
    /// end-of-generation token is passed over for the next best, so that the run
    /// has its length) while every variant, fed the same tokens, runs under its
    /// budget. The full cache's trace comes first.
    pub fn budget_fidelity(
        &self,
        prompt: &[u32],
        n_gen: usize,
        variants: &[BudgetVariant],
    ) -> Result<Vec<BudgetTrace>, EvalError> {
        let model = self.model();
        if prompt.is_empty() || prompt.len() + n_gen > self.n_ctx {
            return Err(EvalError::BadInput(format!(
                "a prompt of {} tokens and {n_gen} generated need {} positions; the context \
                 holds {}",
                prompt.len(),
                prompt.len() + n_gen,
                self.n_ctx
            )));
        }
        let mut sessions = vec![Session::new(model, self.n_ctx)];
        for v in variants {
            let mut s = Session::new(model, self.n_ctx);
            if v.policy == Policy::Gated {
                let gates = self
                    .gates
                    .clone()
                    .ok_or(crate::session::SessionError::NoGates)?;
                s.set_gates(gates);
            }
            let mut cfg = EvictionConfig::new(v.policy, 1.0);
            cfg.budget = Some(v.budget);
            cfg.seed = self.seed;
            s.set_eviction(cfg)?;
            sessions.push(s);
        }
        let mut logits = Vec::with_capacity(sessions.len());
        for s in &mut sessions {
            logits.push(s.feed(prompt)?);
        }
        let mut traces: Vec<BudgetTrace> = std::iter::once(None)
            .chain(variants.iter().copied().map(Some))
            .map(|variant| BudgetTrace {
                variant,
                tokens: Vec::with_capacity(n_gen),
                kv_bytes: Vec::with_capacity(n_gen),
            })
            .collect();
        let tokenizer = self.tokenizer();
        for _ in 0..n_gen {
            let reference = log_softmax(&logits[0]);
            let mut next = argmax(&logits[0]) as u32;
            if tokenizer.is_eog(next) {
                next = best_non_eog(&logits[0], |t| tokenizer.is_eog(t));
            }
            let compared: Vec<TokenFidelity> = logits
                .par_iter()
                .map(|l| compare(&reference, l, next))
                .collect();
            for (t, c) in traces.iter_mut().zip(compared) {
                t.tokens.push(c);
            }
            let ids = [next];
            let mut batch: Vec<(&mut Session, &[u32])> =
                sessions.iter_mut().map(|s| (s, &ids[..])).collect();
            logits = Session::feed_batch(&mut batch)?;
            for (t, s) in traces.iter_mut().zip(&sessions) {
                t.kv_bytes.push(s.kv_bytes());
            }
        }
        Ok(traces)
    }
}

/// The most likely token that is not an end of generation.
fn best_non_eog(logits: &[f32], is_eog: impl Fn(u32) -> bool) -> u32 {
    let mut best: Option<(u32, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if !is_eog(i as u32) && best.is_none_or(|(_, b)| x > b) {
            best = Some((i as u32, x));
        }
    }
    best.map_or(0, |(i, _)| i)
}
