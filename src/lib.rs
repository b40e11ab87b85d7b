//! fastkv: a llama.cpp-style CPU inference runtime for quantized GGUF models.
//!
//! Rooms (one concern each): [`gguf`] reads files, [`kernels`] does the math,
//! [`model`] runs the decoder, [`kv`] holds the cache, [`tokenizer`] turns text
//! into ids and back, [`sampling`] picks tokens, [`session`] drives prefill and
//! decode, [`gate`] holds the Fast KVzip gates (scoring and training). Front ends sit on top: the command line
//! ([`cli`], `main.rs`) and the OpenAI-compatible HTTP server ([`server`]).
pub mod cli;
pub mod durable;
pub mod eval;
pub mod gate;
pub mod gguf;
pub mod kernels;
pub mod kv;
pub mod model;
pub mod sampling;
pub mod server;
pub mod session;
pub mod tokenizer;
