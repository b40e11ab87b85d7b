//! Quality measurement. Perplexity the way llama.cpp's `llama-perplexity` computes
//! it, so figures compare with what llama.cpp users report; and the harness that
//! measures what eviction costs against the full cache on the same model:
//! fidelity of next-token distributions ([`fidelity`]) and RULER-style retrieval
//! tasks ([`tasks`]), run by [`harness`] and reported by [`report`].
pub mod budget;
pub mod fidelity;
pub mod harness;
mod perplexity;
pub mod report;
pub mod tasks;

pub use harness::{EvalError, Harness, Schedule, Variant};
pub use perplexity::{log_softmax_at, perplexity, perplexity_reporting, Perplexity};
