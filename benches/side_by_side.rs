//! fastkv next to llama.cpp (built from the same ggml) on the same prompt, 2 threads:
//! prompt and generation tokens per second, alternating runs, medians.
//!
//!     cargo bench --bench side_by_side [-- MODEL.gguf [PROMPT_TOKENS [GEN_TOKENS [REPS]]]]
//!
//! The full llama-bench-style harness is `fastkv bench` (to come); this is the quick
//! check the foundation reports against.
use std::path::PathBuf;
use std::time::Instant;

use fastkv::kernels::argmax;
use fastkv::model::Model;
use fastkv::session::Session;
use ggml_sys::reference::{RefContext, RefContextParams, RefModel};

const THREADS: usize = 2;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let path = args.first().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let n_prompt: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(512);
    let n_gen: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(128);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build_global()
        .unwrap();

    let model = Model::load(&path).expect("model loads");
    let reference = RefModel::load(&path, false).expect("llama.cpp loads the model");
    // A fixed, tokenizer-independent prompt: token ids cycling through the vocabulary.
    let prompt: Vec<u32> = (0..n_prompt).map(|i| (100 + i * 7 % 1000) as u32).collect();
    let prompt_i32: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let n_ctx = n_prompt + n_gen + 16;

    let (mut ours_pp, mut ours_tg, mut ref_pp, mut ref_tg) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let mut s = Session::new(&model, n_ctx);
        let t = Instant::now();
        let mut logits = s.feed(&prompt).unwrap();
        ours_pp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..n_gen {
            let next = argmax(&logits) as u32;
            logits = s.feed(&[next]).unwrap();
        }
        ours_tg.push(n_gen as f64 / t.elapsed().as_secs_f64());

        let params = RefContextParams {
            n_ctx: n_ctx as u32,
            n_threads: THREADS as i32,
            ..Default::default()
        };
        let mut ctx = RefContext::new(&reference, params).unwrap();
        let t = Instant::now();
        let mut logits = ctx.eval(&prompt_i32, false).unwrap();
        ref_pp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..n_gen {
            let next = argmax(&logits) as i32;
            logits = ctx.eval(&[next], false).unwrap();
        }
        ref_tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
    }
    let (op, ot, rp, rt) = (
        median(ours_pp),
        median(ours_tg),
        median(ref_pp),
        median(ref_tg),
    );
    println!(
        "model: {}  ({THREADS} threads, median of {reps})",
        path.display()
    );
    println!("| test | fastkv t/s | llama.cpp t/s | ratio |");
    println!("|---|---|---|---|");
    println!("| pp{n_prompt} | {op:.1} | {rp:.1} | {:.2} |", op / rp);
    println!("| tg{n_gen} | {ot:.1} | {rt:.1} | {:.2} |", ot / rt);
}
