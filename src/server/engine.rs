//! The scheduler: slots (conversations, each with its KV cache), the queue of
//! requests waiting for one, and the step that runs every active slot in one batched
//! forward pass (a token for each slot that generates, a chunk of prompt for each that
//! is prefilled). It runs on one thread, which owns the sessions; the HTTP handlers
//! talk to it through channels.
use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::api::{ApiError, GenParams, Timings, Usage};
use super::metrics::Counters;
use crate::sampling::Sampler;
use crate::session::Session;
use crate::tokenizer::{Detokenizer, Tokenizer};

/// Most prompt tokens run in one step (with every generating slot's next token):
/// a long prompt is prefilled over several steps, so the other streams do not stall
/// for its whole length.
pub const PREFILL_STEP: usize = 256;

/// A request for the engine: prompt tokens and what to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    /// Prompt tokens that form a document to compress with the eviction policy (a
    /// long system message), once per slot; later requests that start with the same
    /// tokens reuse it.
    pub document: Option<Range<usize>>,
    pub params: GenParams,
    /// Where the engine reports; closed when the client has gone.
    pub events: UnboundedSender<Event>,
    /// Counts the job in flight until it is dropped, however it ends.
    pub permit: Permit,
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// Generated text, in order.
    Piece(String),
    /// Generation ended.
    Done(Finish),
    Error(ApiError),
}

#[derive(Debug, Clone)]
pub struct Finish {
    /// "stop" (end of generation or a stop sequence) or "length".
    pub reason: &'static str,
    pub usage: Usage,
    pub timings: Timings,
}

/// One admitted request: held while it is queued or in a slot; dropping it frees
/// its place in the bound on requests in flight.
pub struct Permit(Arc<Counters>);

impl Permit {
    /// A place among `limit` requests in flight, or None when all are taken.
    pub fn acquire(counters: &Arc<Counters>, limit: usize) -> Option<Permit> {
        counters
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Permit(counters.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A slot: a session that keeps its cache between requests, and the request it
/// serves now, if any.
struct Slot<'m, 't> {
    session: Session<'m>,
    active: Option<Active<'t>>,
    /// When it last served (for choosing among slots that share nothing).
    last_used: u64,
}

/// A request in a slot: prefilling while `pending` holds prompt tokens, then
/// generating.
struct Active<'t> {
    job: Job,
    /// Prompt tokens not yet run (they go through the batched steps in chunks).
    pending: Vec<u32>,
    /// When the request entered the slot.
    admitted: Instant,
    sampler: Sampler,
    /// The logits to sample from next; empty while prefilling or in a step.
    logits: Vec<f32>,
    detok: Detokenizer<'t>,
    n_generated: usize,
    /// Text generated but not yet sent: it could be the start of a stop sequence.
    held: String,
    /// The token to run in the next decode step.
    next: Option<u32>,
    usage: Usage,
    timings: Timings,
    decode_start: Instant,
}

pub struct Engine<'m, 't> {
    tokenizer: &'t Tokenizer,
    slots: Vec<Slot<'m, 't>>,
    queue: VecDeque<Job>,
    counters: Arc<Counters>,
    /// A fresh session configured as the server's (a slot whose state a panic may
    /// have broken is replaced by one).
    new_session: Box<dyn Fn() -> Session<'m> + 'm>,
    /// Default for requests that set no max_tokens.
    n_predict: Option<usize>,
    clock: u64,
    /// Whether responses say how much of the prompt was reused from a slot's cache
    /// (see [`Engine::report_cache_hits`]).
    report_cached: bool,
}

impl<'m, 't> Engine<'m, 't> {
    pub fn new(
        tokenizer: &'t Tokenizer,
        n_slots: usize,
        new_session: Box<dyn Fn() -> Session<'m> + 'm>,
        n_predict: Option<usize>,
        counters: Arc<Counters>,
    ) -> Self {
        let slots = (0..n_slots)
            .map(|_| Slot {
                session: new_session(),
                active: None,
                last_used: 0,
            })
            .collect();
        Self {
            tokenizer,
            slots,
            queue: VecDeque::new(),
            counters,
            new_session,
            n_predict,
            clock: 0,
            report_cached: false,
        }
    }

    /// Report prompt tokens reused from a slot's cache in `usage` and `timings`. Off
    /// by default: slots are shared, so the count tells a client how much of its
    /// prompt matched what another client sent before (responses then read as if
    /// nothing was reused; the time a prefill takes still shows it, more noisily).
    pub fn report_cache_hits(&mut self, on: bool) {
        self.report_cached = on;
    }

    /// Serve jobs until every sender of `jobs` is gone.
    pub fn run(&mut self, jobs: Receiver<Job>) {
        loop {
            let busy = !self.queue.is_empty() || self.slots.iter().any(|s| s.active.is_some());
            if !busy {
                match jobs.recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(_) => return,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if busy => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            // Clients that left while waiting.
            self.queue.retain(|j| !j.events.is_closed());
            self.admit();
            self.publish();
            self.step();
            self.publish();
        }
    }

    /// Give queued jobs (in arrival order) the free slot that shares the longest
    /// prefix with their prompt.
    fn admit(&mut self) {
        while !self.queue.is_empty() {
            let Some(i) = self.free_slot(&self.queue[0].prompt) else {
                return;
            };
            let job = self.queue.pop_front().expect("queue is not empty");
            self.clock += 1;
            self.slots[i].last_used = self.clock;
            if catch_unwind(AssertUnwindSafe(|| self.start(i, job))).is_err() {
                // The job went down with the panic (its sender dropped: the handler
                // answers 500); the slot's state is suspect.
                self.slots[i].session = (self.new_session)();
                self.slots[i].active = None;
            }
        }
    }

    /// The free slot to serve `prompt`: the longest common prefix with what it holds,
    /// then the least recently used.
    fn free_slot(&self, prompt: &[u32]) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .max_by_key(|(_, s)| {
                let common = s.session.shared_prefix(prompt);
                (common, std::cmp::Reverse(s.last_used))
            })
            .map(|(i, _)| i)
    }

    /// Put `job` in slot `i`: keep what the slot holds of its prompt, and leave the
    /// rest for the batched steps, except a document the slot does not hold yet,
    /// which is compressed here (once; later requests reuse it). A failure is reported
    /// to the job's client.
    fn start(&mut self, i: usize, job: Job) {
        let admitted = Instant::now();
        let session = &mut self.slots[i].session;
        let prompt = &job.prompt;
        let compress = job.document.clone().filter(|d| {
            let held = session
                .tokens()
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b);
            session.eviction().is_active() && held.count() < d.end
        });
        // Tokens left in the cache, and how many of those were there before.
        let (kept, cached) = match compress {
            None => {
                let kept = session.keep_prefix_of(prompt);
                (kept, kept)
            }
            Some(doc) => {
                session.clear();
                let t0 = Instant::now();
                if let Err(e) = session.feed_context(&prompt[..doc.start], &prompt[doc.clone()]) {
                    session.clear();
                    let e = ApiError::internal(format!("prefill failed: {e}"));
                    let _ = job.events.send(Event::Error(e));
                    return;
                }
                self.counters
                    .add_prompt(doc.end, t0.elapsed().as_secs_f64() * 1e3);
                // The last document token runs again if nothing follows it, for logits.
                (session.keep_prefix_of(prompt), 0)
            }
        };
        let mut sampler = Sampler::new(job.params.sampler);
        for &t in prompt {
            sampler.accept(t);
        }
        let shown = if self.report_cached { cached } else { 0 };
        let usage = Usage {
            prompt_tokens: prompt.len(),
            prompt_tokens_details: super::api::PromptDetails {
                cached_tokens: shown,
            },
            ..Usage::default()
        };
        let timings = Timings {
            prompt_n: prompt.len() - shown,
            cache_n: shown,
            ..Timings::default()
        };
        self.slots[i].active = Some(Active {
            pending: prompt[kept..].to_vec(),
            job,
            admitted,
            sampler,
            logits: Vec::new(),
            detok: Detokenizer::new(self.tokenizer, false),
            n_generated: 0,
            held: String::new(),
            next: None,
            usage,
            timings,
            decode_start: admitted,
        });
    }

    /// One step: sample a token in every generating slot (sending its text, finishing
    /// the requests that are done), then run one forward pass over the others' tokens
    /// and a chunk of each prefilling slot's prompt (at most [`PREFILL_STEP`] prompt
    /// tokens in all, so the streams of the others keep flowing).
    fn step(&mut self) {
        for i in 0..self.slots.len() {
            let sampled = catch_unwind(AssertUnwindSafe(|| self.sample(i)));
            if sampled.is_err() {
                self.reset_slot(i);
            }
        }
        // What each slot runs: (slot, tokens), in slot order.
        let mut plan: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut prefill_left = PREFILL_STEP;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(a) = s.active.as_mut() else { continue };
            if let Some(t) = a.next.take() {
                plan.push((i, vec![t]));
            } else if !a.pending.is_empty() && prefill_left > 0 {
                let n = a.pending.len().min(prefill_left);
                prefill_left -= n;
                plan.push((i, a.pending[..n].to_vec()));
            }
        }
        if plan.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let mut batch: Vec<(&mut Session<'m>, &[u32])> = Vec::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some((_, tokens)) = planned.next_if(|(j, _)| *j == i) {
                batch.push((&mut s.session, tokens));
            }
        }
        let out = catch_unwind(AssertUnwindSafe(|| Session::feed_batch(&mut batch)));
        drop(batch);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let rows = match out {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                self.fail_batch(&plan, &ApiError::internal(format!("decoding failed: {e}")));
                return;
            }
            Err(_) => {
                self.fail_batch(
                    &plan,
                    &ApiError::internal("decoding failed (internal error)"),
                );
                return;
            }
        };
        // Step time is shared out by tokens between the prompt and generation figures.
        let n_prompt: usize = plan
            .iter()
            .filter(|(i, _)| {
                self.slots[*i]
                    .active
                    .as_ref()
                    .is_some_and(|a| !a.pending.is_empty())
            })
            .map(|(_, t)| t.len())
            .sum();
        let n_all: usize = plan.iter().map(|(_, t)| t.len()).sum();
        let prompt_ms = ms * n_prompt as f64 / n_all as f64;
        self.counters.add_prompt(n_prompt, prompt_ms);
        self.counters.add_decode(n_all - n_prompt, ms - prompt_ms);
        for ((i, tokens), row) in plan.iter().zip(rows) {
            let Some(a) = self.slots[*i].active.as_mut() else {
                continue;
            };
            if a.pending.is_empty() {
                a.logits = row;
                continue;
            }
            a.pending.drain(..tokens.len());
            if a.pending.is_empty() {
                // Prefill done: the reply starts from these logits.
                a.logits = row;
                let ms = a.admitted.elapsed().as_secs_f64() * 1e3;
                a.timings.prompt_ms = ms;
                a.timings.prompt_per_second = rate(a.timings.prompt_n, ms);
                a.decode_start = Instant::now();
            }
        }
    }

    /// Sample slot `i`'s next token; finish its request when it is done.
    fn sample(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(a) = slot.active.as_mut() else {
            return;
        };
        if a.job.events.is_closed() {
            // The client went away: free the slot now.
            slot.active = None;
            return;
        }
        if a.logits.is_empty() {
            return; // still prefilling
        }
        let tok = a.sampler.sample(&mut a.logits);
        if self.tokenizer.is_eog(tok) {
            let tail = a.detok.finish();
            a.held.push_str(&tail);
            self.finish(i, "stop");
            return;
        }
        a.sampler.accept(tok);
        a.n_generated += 1;
        let piece = a.detok.push(tok);
        a.held.push_str(&piece);
        if let Some(at) = find_stop(&a.held, &a.job.params.stop) {
            a.held.truncate(at);
            self.finish(i, "stop");
            return;
        }
        let keep = stop_prefix_len(&a.held, &a.job.params.stop);
        let send: String = a.held.drain(..a.held.len() - keep).collect();
        if !send.is_empty() {
            let _ = a.job.events.send(Event::Piece(send));
        }
        let limit = a.job.params.max_tokens.or(self.n_predict);
        let session = &slot.session;
        if limit.is_some_and(|n| a.n_generated >= n) || session.tokens().len() >= session.n_ctx() {
            self.finish(i, "length");
            return;
        }
        a.next = Some(tok);
        a.logits.clear();
    }

    /// End slot `i`'s request: the rest of its text, then the summary.
    fn finish(&mut self, i: usize, reason: &'static str) {
        let slot = &mut self.slots[i];
        let Some(mut a) = slot.active.take() else {
            return;
        };
        let mut rest = std::mem::take(&mut a.held);
        if reason == "length" {
            rest.push_str(&a.detok.finish());
        }
        if !rest.is_empty() {
            let _ = a.job.events.send(Event::Piece(rest));
        }
        let decode_ms = a.decode_start.elapsed().as_secs_f64() * 1e3;
        a.usage.completion_tokens = a.n_generated;
        a.usage.total_tokens = a.usage.prompt_tokens + a.n_generated;
        a.timings.predicted_n = a.n_generated;
        a.timings.predicted_ms = decode_ms;
        a.timings.predicted_per_second = rate(a.n_generated, decode_ms);
        a.timings.kv_bytes = slot.session.kv_bytes();
        a.timings.kv_bytes_full = slot.session.cache().full_bytes();
        let _ = a.job.events.send(Event::Done(Finish {
            reason,
            usage: a.usage,
            timings: a.timings,
        }));
    }

    /// A failed step: every request in it ends with `e`, and their slots start
    /// afresh (their caches may hold half a step).
    fn fail_batch(&mut self, plan: &[(usize, Vec<u32>)], e: &ApiError) {
        for &(i, _) in plan {
            if let Some(a) = self.slots[i].active.take() {
                let _ = a.job.events.send(Event::Error(e.clone()));
            }
            self.slots[i].session = (self.new_session)();
        }
    }

    /// End slot `i`'s request (if any) with an internal error and give the slot a
    /// fresh session (after a panic its state is suspect).
    fn reset_slot(&mut self, i: usize) {
        if let Some(a) = self.slots[i].active.take() {
            let e = ApiError::internal("generation failed (internal error)");
            let _ = a.job.events.send(Event::Error(e));
        }
        self.slots[i].session = (self.new_session)();
    }

    /// Update the gauges `/metrics` shows.
    fn publish(&self) {
        let c = &self.counters;
        let processing = self.slots.iter().filter(|s| s.active.is_some()).count();
        c.processing.store(processing, Relaxed);
        c.deferred.store(self.queue.len(), Relaxed);
        let held: usize = self.slots.iter().map(|s| s.session.kv_bytes()).sum();
        let full: usize = self
            .slots
            .iter()
            .map(|s| s.session.cache().full_bytes())
            .sum();
        c.kv_bytes.store(held, Relaxed);
        c.kv_bytes_saved.store(full.saturating_sub(held), Relaxed);
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1e3 / ms
    } else {
        0.0
    }
}

/// Where the earliest stop sequence starts in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// The length of the longest end of `text` that begins some stop sequence (it must
/// be held back until the next tokens show whether the sequence completes).
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
                .max()
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_are_found_and_their_starts_held_back() {
        let stops = vec!["\n\nUser:".to_string(), "END".to_string()];
        assert_eq!(find_stop("hello END there", &stops), Some(6));
        assert_eq!(find_stop("a\n\nUser: b", &stops), Some(1));
        assert_eq!(find_stop("nothing here", &stops), None);
        assert_eq!(stop_prefix_len("the E", &stops), 1);
        assert_eq!(stop_prefix_len("the EN", &stops), 2);
        assert_eq!(stop_prefix_len("line\n\nUs", &stops), 4);
        assert_eq!(stop_prefix_len("plain", &stops), 0);
        assert_eq!(stop_prefix_len("é", &["éa".to_string()]), 2);
    }
}
