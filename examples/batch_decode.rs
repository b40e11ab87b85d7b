//! Decode speed of the server's batched step: N sessions (each with a 100-token
//! prompt) decode one token each per forward pass; prints ms per step and tokens/s.
//!
//! cargo run --release --example batch_decode -- models/SmolLM2-135M-Instruct.Q4_1.gguf [THREADS]
use std::time::Instant;

use fastkv::model::Model;
use fastkv::session::Session;

const STEPS: usize = 64;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: batch_decode MODEL.gguf [THREADS]"))?;
    let threads: usize = args.next().map_or(Ok(2), |t| t.parse())?;
    let model = Model::load(&path)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    // On a pool thread, as the server's engine runs.
    rayon::scope(|_| -> anyhow::Result<()> {
        println!("| sessions | ms per step | tokens/s |\n|---:|---:|---:|");
        for n in [1usize, 2, 4, 8] {
            let mut sessions = Vec::with_capacity(n);
            for i in 0..n as u32 {
                let mut s = Session::new(&model, 2048);
                let prompt: Vec<u32> = (0..100).map(|t| 300 + t * 3 + i).collect();
                s.feed(&prompt)?;
                sessions.push(s);
            }
            let t0 = Instant::now();
            for k in 0..STEPS as u32 {
                let tokens: Vec<u32> = (0..n as u32).map(|i| 500 + k * 7 + i).collect();
                let mut batch: Vec<(&mut Session, &[u32])> = sessions
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(s, t)| (s, std::slice::from_ref(t)))
                    .collect();
                Session::feed_batch(&mut batch)?;
            }
            let ms = t0.elapsed().as_secs_f64() * 1e3 / STEPS as f64;
            println!("| {n} | {ms:.2} | {:.1} |", n as f64 * 1e3 / ms);
        }
        Ok(())
    })
}
