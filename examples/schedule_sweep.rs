//! Selection settings compared on one prefill per sample: for a retrieval task (or
//! `kld` for WikiText continuations) at one length, every policy at keep 0.3 under
//! each selection level and recent window, scored against the full cache. What
//! `docs/quality.md` reports on the schedule at length comes from this.
//!
//! cargo run --release --example schedule_sweep -- MODEL.gguf TASK|kld LENGTH SAMPLES \
//!     [GATES|-] [TEXT|-] [KEEP] [POLICIES] [WINDOWS]
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use fastkv::eval::harness::Variant;
use fastkv::eval::report::{markdown, Results};
use fastkv::eval::tasks::{Generator, TaskKind};
use fastkv::eval::Harness;
use fastkv::gate::{find_gates, Gates};
use fastkv::kv::{Level, Policy};
use fastkv::model::Model;
use fastkv::tokenizer::{ChatTemplate, Tokenizer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        bail!(
            "usage: schedule_sweep MODEL.gguf TASK|kld LENGTH SAMPLES [GATES|-] [TEXT] [KEEP] \
             [POLICIES] [WINDOWS]"
        );
    }
    let length: usize = args[2].parse()?;
    let samples: usize = args[3].parse()?;
    let text = args
        .get(5)
        .filter(|p| *p != "-")
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {p}")))
        .transpose()?;
    let keep: f64 = args.get(6).map_or(Ok(0.3), |k| k.parse())?;
    let policies: Vec<Policy> = args
        .get(7)
        .map_or("gated,kvzip,snapkv,h2o,streaming", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let windows: Vec<Option<usize>> = args
        .get(8)
        .map_or("default", String::as_str)
        .split(',')
        .map(|w| {
            if w == "default" {
                Ok(None)
            } else {
                w.parse().map(Some)
            }
        })
        .collect::<Result<_, _>>()?;
    let model = Model::load(&args[0])?;
    let tok = Tokenizer::from_gguf(model.file())?;
    let template = ChatTemplate::from_gguf(model.file(), &tok).unwrap_or_else(ChatTemplate::plain);
    let system = (!template.is_fallback()).then_some("You are a helpful assistant.");
    let mut h = Harness::new(&model, &tok, &template, system)?;
    let gates_path = match args.get(4).filter(|g| *g != "-") {
        Some(p) => p.into(),
        None => find_gates(&model, Path::new(&args[0]))?,
    };
    h.gates = Some(Arc::new(Gates::load(&gates_path, &model)?));
    let mut variants = Vec::new();
    for &policy in &policies {
        for level in [Level::Global, Level::Layer] {
            for &window in &windows {
                variants.push(Variant {
                    level: Some(level),
                    window,
                    ..Variant::new(policy, keep)
                });
            }
        }
    }
    let mut results = Results::default();
    let t = std::time::Instant::now();
    if args[1] == "kld" {
        let text = text.context("kld needs TEXT")?;
        let tokens = tok.encode(&text, false, false);
        let stride = tokens.len() / samples.max(1);
        for d in 0..samples {
            let doc = &tokens[d * stride..(d * stride + length + 65).min(tokens.len())];
            results.add_continuations(length, h.fidelity(doc, length, &variants)?);
            eprintln!(
                "doc {}/{samples}: {:.0} s",
                d + 1,
                t.elapsed().as_secs_f64()
            );
        }
    } else {
        let task: TaskKind = args[1].parse()?;
        let count = |s: &str| tok.encode(s, false, false).len();
        let mut g = Generator::new(&count, text.as_deref(), 42);
        for i in 0..samples {
            let sample = g.sample(task, length - 160, i, samples, 1)?;
            results.add_answers(task, length, h.answer(&sample, &variants)?);
            eprintln!(
                "sample {}/{samples}: {:.0} s",
                i + 1,
                t.elapsed().as_secs_f64()
            );
        }
    }
    println!("{}", markdown(&results.rows()));
    Ok(())
}
