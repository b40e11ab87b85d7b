//! Where each policy's kept KV pairs lie in the context. WikiText-style documents are
//! cut evenly from TEXT (as `fastkv eval kld` cuts them), each 1024-token context is
//! prefilled once and scored by every policy, and each policy compresses a copy of the
//! cache as the runtime does (window, sinks, selection level). Printed: the share of
//! each eighth of the context's evictable pairs that survives, and the share of pairs
//! the KVzip teacher scores >= 0.05 in each evicted layer (the gates' agreement
//! threshold).
//!
//! cargo run --release --example kept_positions -- MODEL.gguf TEXT [KEEP] [DOCS]
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use fastkv::gate::{find_gates, Gates};
use fastkv::kv::Policy;
use fastkv::model::Model;
use fastkv::session::{EvictionConfig, Session, TeacherPrompt};
use fastkv::tokenizer::{ChatTemplate, Tokenizer};

const CONTEXT: usize = 1024;
const BINS: usize = 8;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!("usage: kept_positions MODEL.gguf TEXT [KEEP] [DOCS]");
    }
    let keep: f64 = args.get(2).map_or(Ok(0.3), |k| k.parse())?;
    let docs: usize = args.get(3).map_or(Ok(8), |d| d.parse())?;
    let model = Model::load(&args[0])?;
    let tokenizer = Tokenizer::from_gguf(model.file())?;
    let template =
        ChatTemplate::from_gguf(model.file(), &tokenizer).unwrap_or_else(ChatTemplate::plain);
    let text =
        std::fs::read_to_string(&args[1]).with_context(|| format!("cannot read {}", args[1]))?;
    let tokens = tokenizer.encode(&text, false, false);
    let stride = tokens.len() / docs.max(1);
    if docs == 0 || stride < CONTEXT {
        bail!(
            "{} is too short for {docs} documents of {CONTEXT} tokens",
            args[1]
        );
    }
    let gates = match find_gates(&model, Path::new(&args[0])).and_then(|p| Gates::load(&p, &model))
    {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            eprintln!("the gated policy is left out: {e}");
            None
        }
    };
    let mut policies = vec![
        Policy::Streaming,
        Policy::H2o,
        Policy::SnapKv,
        Policy::KvZip,
    ];
    if gates.is_some() {
        policies.push(Policy::Gated);
    }
    policies.push(Policy::Random);

    // Per policy and bin: pairs kept, and pairs there were.
    let mut kept = vec![[0usize; BINS]; policies.len()];
    let mut total = [0usize; BINS];
    // Per evicted layer: teacher scores >= 0.05, and pairs.
    let mut high: Vec<(usize, usize)> = Vec::new();
    let prefix = tokenizer.encode("", true, false);
    let bin = |pos: u32| (pos as usize - prefix.len()) * BINS / CONTEXT;
    for d in 0..docs {
        let context = &tokens[d * stride..d * stride + CONTEXT];
        let mut base = Session::new(&model, 2 * CONTEXT + 256);
        base.set_teacher_prompt(TeacherPrompt::new(&tokenizer, &template)?);
        if let Some(g) = &gates {
            base.set_gates(g.clone());
        }
        let (_, scores) = base.feed_context_scored(&prefix, context, &policies)?;
        let in_context = |p: u32| p as usize >= prefix.len();
        for h in base.cache().evictable_heads() {
            for &p in h.pos.iter().filter(|&&p| in_context(p)) {
                total[bin(p)] += 1;
            }
        }
        let teacher = scores.of(Policy::KvZip).context("no teacher scores")?;
        let per_layer = model.config.n_head_kv;
        high.resize(teacher.len() / per_layer, (0, 0));
        for (l, lists) in teacher.chunks(per_layer).enumerate() {
            for s in lists.iter().flatten() {
                high[l].0 += usize::from(*s >= 0.05);
                high[l].1 += 1;
            }
        }
        for (i, &policy) in policies.iter().enumerate() {
            let mut s = base.clone();
            s.compress_scored(&scores, EvictionConfig::new(policy, keep))?;
            for h in s.cache().evictable_heads() {
                for &p in h.pos.iter().filter(|&&p| in_context(p)) {
                    kept[i][bin(p)] += 1;
                }
            }
        }
        eprintln!("document {}/{docs}", d + 1);
    }

    println!("Share of each eighth of the context kept at keep {keep} ({docs} documents of {CONTEXT} tokens)\n");
    println!(
        "| policy | {} |",
        (1..=BINS)
            .map(|b| format!("{b}/8"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(BINS));
    for (i, policy) in policies.iter().enumerate() {
        let cells: Vec<String> = (0..BINS)
            .map(|b| format!("{:.2}", kept[i][b] as f64 / total[b].max(1) as f64))
            .collect();
        println!("| {policy} | {} |", cells.join(" | "));
    }
    let shares: Vec<String> = high
        .iter()
        .map(|&(h, n)| format!("{:.2}", h as f64 / n.max(1) as f64))
        .collect();
    println!(
        "\nShare of pairs the KVzip teacher scores >= 0.05, per evicted layer: {}",
        shares.join(", ")
    );
    Ok(())
}
