//! Training the gates with forward passes of the model only (`fast-kvzip.md`,
//! section 4).
//!
//! - **Stage A** ([`collect`]): each training document is prefilled with the full
//!   cache after the prompt prefix, every gated layer's attention input is recorded
//!   for the context tokens, and the KVzip teacher scores every pair. Features are
//!   stored as f16 rows in a work directory and read back memory-mapped, so a large
//!   corpus does not need its features in RAM; every `sample_every`-th token is kept
//!   when they would not fit the disk budget. Stage A resumes after the last
//!   finished document.
//! - **Stage B** ([`train`]): each layer's gate is fitted to its (input, teacher
//!   score) pairs with binary cross-entropy against the soft target, SGD with
//!   momentum and the reference schedule; every 100th token is held out and the
//!   validation loss and agreement (`pred >= 0.05` vs `target >= 0.05`) reported.
//!
//! Both stages are deterministic for a seed, whatever the thread count: layers are
//! trained independently, each on one thread.
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rayon::prelude::*;

use super::{bce, gated_layers, loss_and_grad, GateError, GateShape, LayerGate};
use crate::model::Model;
use crate::session::{Session, TeacherPrompt};
use crate::tokenizer::Tokenizer;

/// Every this many kept tokens, one is held out for validation.
pub const VAL_EVERY: usize = 100;
/// The score threshold of the agreement metric.
pub const AGREE_AT: f32 = 0.05;

const FEATURES: &str = "features.f16";
const TARGETS: &str = "targets.f32";
const PROGRESS: &str = "stage_a.json";

/// Split the text files at `path` (a file, or every file under a directory, in name
/// order) into documents of `doc_tokens` tokens; a file's last piece is kept when it
/// holds at least a quarter of that. With `max_tokens`, documents are taken evenly
/// from the whole corpus (not just its first files) until that many tokens.
pub fn corpus_documents(
    path: &Path,
    tokenizer: &Tokenizer,
    doc_tokens: usize,
    max_tokens: Option<usize>,
) -> Result<Vec<Vec<u32>>, GateError> {
    let files = text_files(path)?;
    if files.is_empty() {
        return Err(GateError::Training(format!(
            "no files in the corpus {}",
            path.display()
        )));
    }
    let mut docs = Vec::new();
    for f in files {
        let text = String::from_utf8_lossy(&std::fs::read(&f)?).into_owned();
        let ids = tokenizer.encode(&text, false, false);
        docs.extend(
            ids.chunks(doc_tokens)
                .filter(|p| p.len() * 4 >= doc_tokens)
                .map(<[u32]>::to_vec),
        );
    }
    let total: usize = docs.iter().map(Vec::len).sum();
    let Some(budget) = max_tokens.filter(|&b| b < total) else {
        return Ok(docs);
    };
    // Every (total / budget)-th document, spread over the corpus.
    let n = docs.len();
    let m = (n * budget).div_ceil(total).clamp(1, n);
    let mut out: Vec<Vec<u32>> = (0..m)
        .map(|i| std::mem::take(&mut docs[i * n / m]))
        .collect();
    let mut taken = 0;
    out.retain_mut(|d| {
        let room = budget.saturating_sub(taken);
        d.truncate(room);
        taken += d.len();
        !d.is_empty()
    });
    Ok(out)
}

fn text_files(path: &Path) -> Result<Vec<PathBuf>, GateError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// How stage A runs.
#[derive(Debug, Clone)]
pub struct StageA {
    /// Tokens fed before every document, never judged (template, system message).
    pub prefix: Vec<u32>,
    pub teacher: TeacherPrompt,
    /// Keep the features of every this many context tokens.
    pub sample_every: usize,
    /// What the corpus is (recorded; a different one restarts stage A).
    pub corpus: String,
    pub doc_tokens: usize,
}

/// What stage A has done, saved after every document so that it can resume.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageAProgress {
    pub fingerprint: String,
    pub corpus: String,
    pub doc_tokens: usize,
    pub sample_every: usize,
    pub n_docs: usize,
    pub docs_done: usize,
    /// Context tokens prefilled and scored so far.
    pub corpus_tokens: usize,
    /// Tokens whose features were kept.
    pub kept: usize,
    /// Model layers with gates, and the shape of their inputs and targets.
    pub layers: Vec<usize>,
    pub n_embd: usize,
    pub n_head_kv: usize,
}

impl StageAProgress {
    /// The progress saved in `work`, if any.
    pub fn load(work: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(work.join(PROGRESS)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self, work: &Path) -> Result<(), GateError> {
        let text = serde_json::to_string_pretty(self).expect("plain struct");
        crate::durable::write_with(&work.join(PROGRESS), |f| {
            std::io::Write::write_all(f, text.as_bytes())
        })?;
        Ok(())
    }

    pub fn complete(&self) -> bool {
        self.docs_done == self.n_docs
    }
}

/// Stage A over `docs` into the work directory `work`, resuming where a previous run
/// with the same settings stopped. `on_doc(done, progress)` is called after each
/// document.
pub fn collect(
    model: &Model,
    docs: &[Vec<u32>],
    work: &Path,
    cfg: &StageA,
    mut on_doc: impl FnMut(&StageAProgress),
) -> Result<StageAProgress, GateError> {
    std::fs::create_dir_all(work)?;
    let c = &model.config;
    let layers = gated_layers(model);
    let fresh = StageAProgress {
        fingerprint: format!("{:016x}", model.file().fingerprint()),
        corpus: cfg.corpus.clone(),
        doc_tokens: cfg.doc_tokens,
        sample_every: cfg.sample_every.max(1),
        n_docs: docs.len(),
        docs_done: 0,
        corpus_tokens: 0,
        kept: 0,
        layers: layers.clone(),
        n_embd: c.n_embd,
        n_head_kv: c.n_head_kv,
    };
    let mut prog = match StageAProgress::load(work) {
        Some(p) if p.docs_done <= p.n_docs && same_run(&p, &fresh) => p,
        _ => fresh,
    };
    let (x_row, y_row) = (layers.len() * c.n_embd, layers.len() * c.n_head_kv);
    // Drop whatever a crash left after the last finished document.
    let open = |name: &str, rows: usize, row_bytes: usize| -> Result<File, GateError> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(work.join(name))?;
        f.set_len((rows * row_bytes) as u64)?;
        Ok(f)
    };
    let mut xf = BufWriter::new(open(FEATURES, prog.kept, x_row * 2)?);
    let mut yf = BufWriter::new(open(TARGETS, prog.kept, y_row * 4)?);
    let every = prog.sample_every;
    let slot: Vec<Option<usize>> = (0..c.n_layer)
        .map(|il| layers.iter().position(|&l| l == il))
        .collect();
    for (di, doc) in docs.iter().enumerate().skip(prog.docs_done) {
        let mut s = Session::new(model, c.n_ctx_train);
        s.set_teacher_prompt(cfg.teacher.clone());
        s.feed(&cfg.prefix)?;
        let ctx_start = s.cache().n_seen();
        // Kept context tokens: every `every`-th, from an offset that moves per document.
        let kept: Vec<usize> = (0..doc.len())
            .filter(|t| (t + di * 7919) % every == 0)
            .collect();
        let mut x = vec![0f32; kept.len() * x_row];
        s.feed_observing(doc, &mut |il, start, rows| {
            let Some(li) = slot[il] else {
                return;
            };
            let n = rows.len() / c.n_embd;
            let first = start - ctx_start;
            let a = kept.partition_point(|&t| t < first);
            let b = kept.partition_point(|&t| t < first + n);
            for (k, &t) in kept[a..b].iter().enumerate() {
                let src = &rows[(t - first) * c.n_embd..(t - first + 1) * c.n_embd];
                let at = (a + k) * x_row + li * c.n_embd;
                x[at..at + c.n_embd].copy_from_slice(src);
            }
        })?;
        s.run_teacher(ctx_start, ctx_start + doc.len())
            .map_err(|e| GateError::Training(format!("teacher on document {di}: {e}")))?;
        let mut y = vec![0f32; kept.len() * y_row];
        for (li, &il) in layers.iter().enumerate() {
            for (h, head) in s.cache().layers[il].heads.iter().enumerate() {
                for (k, &t) in kept.iter().enumerate() {
                    let pos = (ctx_start + t) as u32;
                    let j = head.pos.partition_point(|&p| p < pos);
                    y[k * y_row + li * c.n_head_kv + h] = head.score[j];
                }
            }
        }
        let mut bytes = Vec::with_capacity(x.len() * 2);
        for v in &x {
            bytes.extend_from_slice(&f16::from_f32(*v).to_le_bytes());
        }
        xf.write_all(&bytes)?;
        for v in &y {
            yf.write_all(&v.to_le_bytes())?;
        }
        xf.flush()?;
        yf.flush()?;
        prog.docs_done = di + 1;
        prog.corpus_tokens += doc.len();
        prog.kept += kept.len();
        prog.save(work)?;
        on_doc(&prog);
    }
    prog.save(work)?;
    Ok(prog)
}

fn same_run(a: &StageAProgress, b: &StageAProgress) -> bool {
    (
        &a.fingerprint,
        &a.corpus,
        a.doc_tokens,
        a.sample_every,
        a.n_docs,
        &a.layers,
    ) == (
        &b.fingerprint,
        &b.corpus,
        b.doc_tokens,
        b.sample_every,
        b.n_docs,
        &b.layers,
    )
}

/// Stage A's output, memory-mapped.
pub struct FeatureFiles {
    pub progress: StageAProgress,
    x: Mmap,
    y: Mmap,
}

impl FeatureFiles {
    /// Open a finished stage A in `work`.
    pub fn open(work: &Path) -> Result<Self, GateError> {
        let progress = StageAProgress::load(work).ok_or_else(|| {
            GateError::Training(format!("no stage A results in {}", work.display()))
        })?;
        if !progress.complete() {
            return Err(GateError::Training(format!(
                "stage A in {} stopped after {} of {} documents: run train-gates again to resume",
                work.display(),
                progress.docs_done,
                progress.n_docs
            )));
        }
        let map = |name: &str, row_bytes: usize| -> Result<Mmap, GateError> {
            let f = File::open(work.join(name))?;
            if f.metadata()?.len() != (progress.kept * row_bytes) as u64 {
                return Err(GateError::Training(format!(
                    "{} in {} has the wrong size: delete the directory and run stage A again",
                    name,
                    work.display()
                )));
            }
            // SAFETY: the file is private to this work directory and not modified
            // while mapped (stage A has finished; nothing else writes it).
            Ok(unsafe { Mmap::map(&f)? })
        };
        let n_l = progress.layers.len();
        let x = map(FEATURES, n_l * progress.n_embd * 2)?;
        let y = map(TARGETS, n_l * progress.n_head_kv * 4)?;
        Ok(Self { progress, x, y })
    }

    /// The features and targets as slices.
    pub fn view(&self) -> Features<'_> {
        Features {
            x: cast_f16(&self.x),
            y: cast_f32(&self.y),
            n_tokens: self.progress.kept,
            n_embd: self.progress.n_embd,
            n_head_kv: self.progress.n_head_kv,
            n_layers: self.progress.layers.len(),
        }
    }
}

fn cast_f16(b: &[u8]) -> &[f16] {
    assert!(b.as_ptr().align_offset(2) == 0 && b.len().is_multiple_of(2));
    // SAFETY: aligned and sized as checked; every bit pattern is a valid f16; the
    // files are written little-endian on little-endian targets (x86-64, aarch64).
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast(), b.len() / 2) }
}

fn cast_f32(b: &[u8]) -> &[f32] {
    assert!(b.as_ptr().align_offset(4) == 0 && b.len().is_multiple_of(4));
    // SAFETY: as for `cast_f16`; every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast(), b.len() / 4) }
}

/// Training data: per token, every gated layer's input (f16) and teacher scores.
#[derive(Debug, Clone, Copy)]
pub struct Features<'a> {
    /// n_tokens x n_layers x n_embd
    pub x: &'a [f16],
    /// n_tokens x n_layers x n_head_kv
    pub y: &'a [f32],
    pub n_tokens: usize,
    pub n_embd: usize,
    pub n_head_kv: usize,
    pub n_layers: usize,
}

impl Features<'_> {
    /// Layer `li`'s inputs and targets for `tokens`, as f32.
    fn gather(&self, li: usize, tokens: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let (d, h) = (self.n_embd, self.n_head_kv);
        let mut x = vec![0f32; tokens.len() * d];
        let mut y = vec![0f32; tokens.len() * h];
        for (k, &t) in tokens.iter().enumerate() {
            let at = (t * self.n_layers + li) * d;
            for (o, v) in x[k * d..(k + 1) * d].iter_mut().zip(&self.x[at..at + d]) {
                *o = v.to_f32();
            }
            let at = (t * self.n_layers + li) * h;
            y[k * h..(k + 1) * h].copy_from_slice(&self.y[at..at + h]);
        }
        (x, y)
    }
}

/// Stage B's settings: the reference recipe by default.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub steps: usize,
    /// Token positions per step.
    pub batch: usize,
    pub lr: f32,
    pub momentum: f32,
    pub warmup: usize,
    pub seed: u64,
    /// Validate every this many steps (and at the end).
    pub eval_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 5000,
            batch: 1000,
            lr: 0.2,
            momentum: 0.9,
            warmup: 50,
            seed: 0,
            eval_every: 250,
        }
    }
}

impl TrainConfig {
    /// The reference schedule scaled to the data: 5000 steps of 1000 tokens are
    /// five passes over a million tokens; with fewer tokens, five passes, and never
    /// fewer than 300 steps.
    pub fn steps_for(n_train: usize, batch: usize) -> usize {
        (5 * n_train / batch.max(1)).clamp(300, 5000)
    }

    /// The learning rate at `step`: linear warm-up, then x0.5 from half of the
    /// steps and x0.25 from three quarters.
    pub fn lr_at(&self, step: usize) -> f32 {
        let warm = ((step + 1) as f32 / self.warmup.max(1) as f32).min(1.0);
        let decay = if step * 4 >= self.steps * 3 {
            0.25
        } else if step * 2 >= self.steps {
            0.5
        } else {
            1.0
        };
        self.lr * warm * decay
    }
}

/// Loss and agreement on a set of tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Metrics {
    /// Mean binary cross-entropy per (token, head).
    pub loss: f64,
    /// Share of (token, head) where `pred >= 0.05` equals `target >= 0.05`.
    pub agreement: f64,
}

/// A report during training.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainProgress {
    pub step: usize,
    pub steps: usize,
    pub lr: f32,
    /// Mean training loss per (token, layer, head) since the last report.
    pub train_loss: f64,
    /// Validation over all layers, when this step validated.
    pub val: Option<Metrics>,
}

/// What training produced.
#[derive(Debug, Clone)]
pub struct Trained {
    /// (model layer, gate)
    pub gates: Vec<(usize, LayerGate)>,
    /// Final validation, over all layers and per layer.
    pub val: Metrics,
    pub per_layer: Vec<(usize, Metrics)>,
    pub n_train: usize,
    pub n_val: usize,
}

/// Stage B: fit one gate per layer of `layers` (the model layers, in the order of
/// the features) to `data`.
pub fn train(
    data: Features,
    layers: &[usize],
    shape: GateShape,
    cfg: &TrainConfig,
    mut report: impl FnMut(&TrainProgress),
) -> Result<Trained, GateError> {
    if data.n_layers != layers.len() || data.n_embd != shape.n_embd {
        return Err(GateError::Training(
            "the features do not match the model's gates".into(),
        ));
    }
    let (train_idx, val_idx): (Vec<usize>, Vec<usize>) =
        (0..data.n_tokens).partition(|&t| t % VAL_EVERY != VAL_EVERY - 1);
    if data.n_tokens < 2 * VAL_EVERY {
        return Err(GateError::Training(format!(
            "{} feature tokens are too few to train on (at least {} are needed)",
            data.n_tokens,
            VAL_EVERY * 2
        )));
    }
    let batch = cfg.batch.min(train_idx.len());
    let mut state: Vec<(LayerGate, LayerGate)> = layers
        .iter()
        .map(|&il| {
            let g = LayerGate::init(&shape, cfg.seed ^ ((il as u64 + 1) * 0x9E37_79B9));
            (g, LayerGate::zeros(&shape))
        })
        .collect();
    let mut rng = ChaCha12Rng::seed_from_u64(cfg.seed);
    let mut order = train_idx.clone();
    let mut cursor = order.len();
    let (mut loss_sum, mut loss_n) = (0f64, 0usize);
    let per_token = (layers.len() * shape.n_head_kv) as f64;
    for step in 0..cfg.steps {
        let mut tokens = Vec::with_capacity(batch);
        while tokens.len() < batch {
            if cursor == order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            let take = (batch - tokens.len()).min(order.len() - cursor);
            tokens.extend_from_slice(&order[cursor..cursor + take]);
            cursor += take;
        }
        let lr = cfg.lr_at(step);
        let losses: Vec<f64> = state
            .par_iter_mut()
            .enumerate()
            .map(|(li, (gate, velocity))| {
                let (x, y) = data.gather(li, &tokens);
                let mut grad = LayerGate::zeros(&shape);
                let (loss, _) = loss_and_grad(gate, &shape, &x, &y, &mut grad);
                let params = gate.tensors_mut();
                for ((p, v), g) in params
                    .into_iter()
                    .zip(velocity.tensors_mut())
                    .zip(grad.tensors_mut())
                {
                    for ((pi, vi), gi) in p.iter_mut().zip(v.iter_mut()).zip(g.iter()) {
                        *vi = cfg.momentum * *vi + gi;
                        *pi -= lr * *vi;
                    }
                }
                loss
            })
            .collect();
        let loss: f64 = losses.iter().sum();
        if !loss.is_finite() {
            return Err(GateError::Training(format!(
                "the loss diverged at step {step} (lower --lr)"
            )));
        }
        loss_sum += loss / per_token;
        loss_n += 1;
        let last = step + 1 == cfg.steps;
        if (step + 1) % cfg.eval_every.max(1) == 0 || last {
            let val = evaluate(&data, &state, &shape, &val_idx).0;
            report(&TrainProgress {
                step: step + 1,
                steps: cfg.steps,
                lr,
                train_loss: loss_sum / loss_n as f64,
                val: Some(val),
            });
            (loss_sum, loss_n) = (0.0, 0);
        }
    }
    let (val, per_layer) = evaluate(&data, &state, &shape, &val_idx);
    Ok(Trained {
        gates: layers
            .iter()
            .copied()
            .zip(state.into_iter().map(|(g, _)| g))
            .collect(),
        val,
        per_layer: layers.iter().copied().zip(per_layer).collect(),
        n_train: train_idx.len(),
        n_val: val_idx.len(),
    })
}

/// How well `gates` predict the teacher on `data` (features of the layers
/// `layers`, e.g. from [`collect`] on held-out text): over all layers, and per layer.
pub fn score_against_teacher(
    gates: &super::Gates,
    data: Features,
    layers: &[usize],
) -> Result<(Metrics, Vec<Metrics>), GateError> {
    let state: Vec<(LayerGate, LayerGate)> = layers
        .iter()
        .map(|&il| {
            let g = gates.layer(il).ok_or_else(|| {
                GateError::Training(format!("the gates have no gate for layer {il}"))
            })?;
            Ok((g.clone(), LayerGate::zeros(gates.shape())))
        })
        .collect::<Result<_, GateError>>()?;
    let all: Vec<usize> = (0..data.n_tokens).collect();
    Ok(evaluate(&data, &state, gates.shape(), &all))
}

/// Validation metrics over all layers, and per layer.
fn evaluate(
    data: &Features,
    state: &[(LayerGate, LayerGate)],
    shape: &GateShape,
    tokens: &[usize],
) -> (Metrics, Vec<Metrics>) {
    let per_layer: Vec<Metrics> = state
        .par_iter()
        .enumerate()
        .map(|(li, (gate, _))| {
            let (x, y) = data.gather(li, tokens);
            let mut pred = vec![0f32; y.len()];
            gate.score(shape, &x, &mut pred);
            metrics(&pred, &y)
        })
        .collect();
    let n = per_layer.len().max(1) as f64;
    let all = Metrics {
        loss: per_layer.iter().map(|m| m.loss).sum::<f64>() / n,
        agreement: per_layer.iter().map(|m| m.agreement).sum::<f64>() / n,
    };
    (all, per_layer)
}

/// Mean BCE and threshold agreement of predictions against targets.
pub fn metrics(pred: &[f32], target: &[f32]) -> Metrics {
    let n = pred.len().max(1) as f64;
    let loss = pred
        .iter()
        .zip(target)
        .map(|(&p, &y)| bce(p as f64, y as f64))
        .sum::<f64>()
        / n;
    let agree = pred
        .iter()
        .zip(target)
        .filter(|(&p, &y)| (p >= AGREE_AT) == (y >= AGREE_AT))
        .count() as f64
        / n;
    Metrics {
        loss,
        agreement: agree,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// A gate learns targets that another gate of the same shape produced: a known
    /// function of the input. Its validation loss approaches the floor (the targets'
    /// own entropy) and the thresholded decisions agree.
    #[test]
    fn learns_a_known_function_of_the_input() {
        let shape = GateShape {
            n_embd: 32,
            n_head_kv: 2,
            group: 2,
            dim: 16,
            sinks: 16,
        };
        let mut teacher = LayerGate::init(&shape, 77);
        let mut rng = ChaCha12Rng::seed_from_u64(5);
        teacher.w.iter_mut().for_each(|v| *v *= 4.0);
        teacher
            .sink
            .iter_mut()
            .for_each(|v| *v = rng.random_range(-1.0..1.0));
        // Sharper norms spread the scores over (0, 1).
        teacher.gq.fill(2.0);
        teacher.gk.fill(2.0);
        let n = 6000;
        let x: Vec<f32> = (0..n * shape.n_embd)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut y = vec![0f32; n * shape.n_head_kv];
        teacher.score(&shape, &x, &mut y);
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let data = Features {
            x: &xh,
            y: &y,
            n_tokens: n,
            n_embd: shape.n_embd,
            n_head_kv: shape.n_head_kv,
            n_layers: 1,
        };
        let cfg = TrainConfig {
            steps: 1500,
            batch: 200,
            eval_every: 500,
            ..TrainConfig::default()
        };
        let mut reports = Vec::new();
        let t = train(data, &[0], shape, &cfg, |p| reports.push(p.clone())).unwrap();
        let floor = y.iter().map(|&p| bce(p as f64, p as f64)).sum::<f64>() / y.len() as f64;
        // The untrained gate's loss (train() initialises layer 0 with this seed).
        let init = LayerGate::init(&shape, cfg.seed ^ 0x9E37_79B9);
        let mut pred = vec![0f32; y.len()];
        init.score(&shape, &x, &mut pred);
        let start = metrics(&pred, &y).loss;
        assert!(
            t.val.loss - floor < 0.1 * (start - floor),
            "loss {} did not approach the floor {floor} (untrained: {start})",
            t.val.loss
        );
        assert!(reports
            .windows(2)
            .all(|w| w[1].train_loss <= w[0].train_loss));
        assert!(t.val.agreement > 0.9, "agreement {}", t.val.agreement);
        assert_eq!(t.n_val, n / VAL_EVERY);
        // The same seed gives the same gate.
        let again = train(data, &[0], shape, &cfg, |_| {}).unwrap();
        assert_eq!(again.gates[0].1, t.gates[0].1);
    }

    #[test]
    fn schedule_warms_up_and_decays() {
        let cfg = TrainConfig {
            steps: 1000,
            ..TrainConfig::default()
        };
        assert!((cfg.lr_at(0) - 0.2 / 50.0).abs() < 1e-7);
        assert_eq!(cfg.lr_at(49), 0.2);
        assert_eq!(cfg.lr_at(499), 0.2);
        assert_eq!(cfg.lr_at(500), 0.1);
        assert_eq!(cfg.lr_at(750), 0.05);
        assert_eq!(TrainConfig::steps_for(1_000_000, 1000), 5000);
        assert_eq!(TrainConfig::steps_for(300_000, 1000), 1500);
        assert_eq!(TrainConfig::steps_for(1000, 1000), 300);
    }

    #[test]
    fn metrics_count_agreement_at_the_threshold() {
        let m = metrics(&[0.01, 0.2, 0.06, 0.0], &[0.0, 0.5, 0.01, 0.07]);
        assert_eq!(m.agreement, 0.5);
        assert!(m.loss > 0.0);
    }
}
