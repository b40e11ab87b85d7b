//! Where the needles of a retrieval sample rank under each policy's scores, list by
//! list: prefill once, score with every policy, and print for each evictable list
//! the needles' mean percentile and the share of their pairs a keep ratio keeps with
//! one global threshold and with one threshold per list.
//!
//! cargo run --release --example needle_ranks -- MODEL.gguf TASK LENGTH [KEEP] [QUERIES] [HAYSTACK|-] [GATES]
use std::path::Path;
use std::sync::Arc;

use anyhow::bail;
use fastkv::eval::tasks::{Generator, TaskKind};
use fastkv::gate::{find_gates, Gates};
use fastkv::kv::Policy;
use fastkv::model::Model;
use fastkv::session::{Session, TeacherPrompt};
use fastkv::tokenizer::{ChatTemplate, Tokenizer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: needle_ranks MODEL.gguf TASK LENGTH [KEEP] [QUERIES] [HAYSTACK|-] [GATES]");
    }
    let task: TaskKind = args[1].parse()?;
    let length: usize = args[2].parse()?;
    let keep: f64 = args.get(3).map_or(Ok(0.3), |k| k.parse())?;
    let queries: usize = args.get(4).map_or(Ok(8), |k| k.parse())?;
    let haystack = args
        .get(5)
        .filter(|h| *h != "-")
        .map(std::fs::read_to_string)
        .transpose()?;
    let model = Model::load(&args[0])?;
    let tok = Tokenizer::from_gguf(model.file())?;
    let template = ChatTemplate::from_gguf(model.file(), &tok).unwrap_or_else(ChatTemplate::plain);
    let gates_path = match args.get(6) {
        Some(p) => p.into(),
        None => find_gates(&model, Path::new(&args[0]))?,
    };
    eprintln!("gates: {}", gates_path.display());
    let gates = Arc::new(Gates::load(&gates_path, &model)?);
    let count = |s: &str| tok.encode(s, false, false).len();
    let mut g = Generator::new(&count, haystack.as_deref(), 42);
    let sample = g.sample(task, length - 160, 0, 1, queries)?;
    let context = tok.encode(&sample.context, false, false);
    let prefix = tok.encode("", true, false);
    let mut spans = Vec::new();
    for q in &sample.queries {
        for e in &q.evidence {
            if let Some(at) = sample.context.find(e.as_str()) {
                let to = |i: usize| prefix.len() + count(&sample.context[..i]);
                spans.push((to(at), to(at + e.len())));
            }
        }
    }
    let mut s = Session::new(&model, model.config.n_ctx_train);
    s.set_teacher_prompt(TeacherPrompt::new(&tok, &template)?);
    s.set_gates(gates);
    let policies = [Policy::Gated, Policy::KvZip, Policy::SnapKv, Policy::H2o];
    let t = std::time::Instant::now();
    let (_, scores) = s.feed_context_scored(&prefix, &context, &policies)?;
    eprintln!(
        "{} tokens, {} needle spans, scored in {:.1} s",
        context.len(),
        spans.len(),
        t.elapsed().as_secs_f64()
    );
    let inside = |p: u32| spans.iter().any(|&(a, b)| (a..b).contains(&(p as usize)));
    let lists: Vec<Vec<u32>> = s.cache().evictable_heads().map(|h| h.pos.clone()).collect();
    let layers: Vec<usize> = (0..model.config.n_layer)
        .filter(|&il| s.cache().layers[il].is_evictable())
        .flat_map(|il| std::iter::repeat_n(il, model.config.n_head_kv))
        .collect();
    for policy in policies {
        let sc = scores.of(policy).expect("scored");
        // One global threshold over every list's pairs.
        let mut all: Vec<f32> = sc.iter().flatten().copied().collect();
        all.sort_by(|a, b| b.total_cmp(a));
        let global = all[((keep * all.len() as f64) as usize).min(all.len() - 1)];
        println!("{policy}: global threshold {global:.4}");
        for (i, (list, pos)) in sc.iter().zip(&lists).enumerate() {
            let mut sorted = list.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let own = sorted[((keep * sorted.len() as f64) as usize).min(sorted.len() - 1)];
            let rank = |x: f32| sorted.partition_point(|&y| y > x) as f64 / sorted.len() as f64;
            let needle: Vec<f32> = list
                .iter()
                .zip(pos)
                .filter(|(_, &p)| inside(p))
                .map(|(&x, _)| x)
                .collect();
            let mean_rank = needle.iter().map(|&x| rank(x)).sum::<f64>() / needle.len() as f64;
            let kept_global =
                needle.iter().filter(|&&x| x > global).count() as f64 / needle.len() as f64;
            let kept_own = needle.iter().filter(|&&x| x > own).count() as f64 / needle.len() as f64;
            let share = list.iter().filter(|&&x| x > global).count() as f64 / list.len() as f64;
            let mean = list.iter().sum::<f32>() / list.len() as f32;
            let high = list.iter().filter(|&&x| x >= 0.05).count() as f64 / list.len() as f64;
            println!(
                "  layer {:>2} head {}: list kept globally {share:.2}, mean score {mean:.4}, >=0.05 {high:.2}; \
                 needles: mean rank {mean_rank:.2}, kept global {kept_global:.2}, per list {kept_own:.2}",
                layers[i],
                i % model.config.n_head_kv
            );
        }
    }
    Ok(())
}
