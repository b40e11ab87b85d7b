//! Counters the engine and the handlers update, shown by `GET /metrics` in the
//! Prometheus text format (named as llama-server's, with a `fastkv_` prefix).
use std::fmt::Write;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Counters {
    /// Requests admitted and not yet finished (queued or in a slot).
    pub in_flight: AtomicUsize,
    /// Slots generating now.
    pub processing: AtomicUsize,
    /// Requests waiting for a slot (in the engine's queue).
    pub deferred: AtomicUsize,
    /// Requests answered 503 because the queue was full.
    pub rejected: AtomicUsize,
    /// Bytes the slots' KV caches hold.
    pub kv_bytes: AtomicUsize,
    /// Bytes eviction keeps out of them (what they would hold in full, less that).
    pub kv_bytes_saved: AtomicUsize,
    totals: Mutex<Totals>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    prompt_tokens: usize,
    prompt_ms: f64,
    predicted_tokens: usize,
    decode_ms: f64,
}

impl Counters {
    /// `n` prompt tokens were run in `ms`.
    pub fn add_prompt(&self, n: usize, ms: f64) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.prompt_tokens += n;
        t.prompt_ms += ms;
    }

    /// One decode step produced `n` tokens (one per slot) in `ms`.
    pub fn add_decode(&self, n: usize, ms: f64) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.predicted_tokens += n;
        t.decode_ms += ms;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let t = *self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
        let metrics: [(&str, &str, &str, f64); 9] = [
            (
                "prompt_tokens_total",
                "counter",
                "Prompt tokens run through the model (reused ones not counted).",
                t.prompt_tokens as f64,
            ),
            (
                "tokens_predicted_total",
                "counter",
                "Tokens generated.",
                t.predicted_tokens as f64,
            ),
            (
                "prompt_tokens_seconds",
                "gauge",
                "Average prompt throughput in tokens/s.",
                per_s(t.prompt_tokens, t.prompt_ms),
            ),
            (
                "predicted_tokens_seconds",
                "gauge",
                "Average generation throughput in tokens/s (all slots together).",
                per_s(t.predicted_tokens, t.decode_ms),
            ),
            (
                "requests_processing",
                "gauge",
                "Requests being generated.",
                self.processing.load(Relaxed) as f64,
            ),
            (
                "requests_deferred",
                "gauge",
                "Requests waiting for a free slot.",
                self.deferred.load(Relaxed) as f64,
            ),
            (
                "requests_rejected_total",
                "counter",
                "Requests refused with 503 because the queue was full.",
                self.rejected.load(Relaxed) as f64,
            ),
            (
                "kv_bytes",
                "gauge",
                "Bytes the slots' KV caches hold.",
                self.kv_bytes.load(Relaxed) as f64,
            ),
            (
                "kv_bytes_saved",
                "gauge",
                "Bytes KV eviction keeps out of the slots' caches.",
                self.kv_bytes_saved.load(Relaxed) as f64,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in metrics {
            let _ = writeln!(out, "# HELP fastkv_{name} {help}");
            let _ = writeln!(out, "# TYPE fastkv_{name} {kind}");
            let _ = writeln!(out, "fastkv_{name} {value}");
        }
        out
    }
}
