//! Fast KVzip gates (`fast-kvzip.md`, section 2): a tiny side branch per gated
//! layer that predicts, from the layer's attention input alone, the score the KVzip
//! teacher would give each new KV pair. Scoring then costs a few small products per
//! token and runs while the context streams in, in prefill and in decode.
//!
//! The gate ("low-rank sink attention"), for one token `x` and KV head `h`:
//! ```text
//! k     = rmsnorm(wk x)[h]           * gk
//! q_g   = rmsnorm((wq x + bq)[h, g]) * gq          g = 0..G-1
//! z_g   = <k, q_g> / sqrt(d) + b[h, g]             (bias added once)
//! lse_g = logsumexp_s <sink[h, s], q_g> / sqrt(d)
//! score = mean_g sigmoid(z_g - lse_g)
//! ```
//! Everything is f32. The backward pass used by training ([`train`]) lives next to
//! the forward so that the two can never drift apart.
mod file;
pub mod train;

pub use file::{find_gates, GateMeta, TrainingInfo, GATE_SUFFIX};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rayon::prelude::*;

use crate::gguf::GgufError;
use crate::kernels::{gemm, softmax_exp, softmax_exp8, Mat};
use crate::model::Config;

/// Width of the gate's low-rank queries and keys (the spec's d).
pub const GATE_DIM: usize = 16;
/// Learned sink keys per KV head (the spec's S).
pub const GATE_SINKS: usize = 16;
/// RMSNorm epsilon of the gate's query and key norms.
const NORM_EPS: f32 = 1e-6;
/// Tokens per task when scoring a batch in parallel. Each task's matrix product packs
/// the whole projection matrix again, so tasks are large: a 512-token prefill is 4.
const ROW_BLOCK: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: not a fastkv gate file ({why})")]
    NotGates { path: String, why: String },
    #[error(
        "{path} holds gates for another model ({gates_for}), not {model}: \
         train gates for this model with `fastkv train-gates`"
    )]
    WrongModel {
        path: String,
        gates_for: String,
        model: String,
    },
    #[error(
        "no gate file for {model} in {searched}: pass --gates FILE, or train gates with \
         `fastkv train-gates -m MODEL --corpus DIR --out FILE`"
    )]
    NotFound { model: String, searched: String },
    #[error("cannot write gate file {path}: {why}")]
    Write { path: String, why: String },
    #[error("gate training: {0}")]
    Training(String),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Sizes of one layer's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GateShape {
    /// The model's hidden size D (the gate input's width).
    pub n_embd: usize,
    /// KV heads H: one score per KV head and token.
    pub n_head_kv: usize,
    /// Query heads per KV head G.
    pub group: usize,
    /// d
    pub dim: usize,
    /// S
    pub sinks: usize,
}

impl GateShape {
    /// The spec's gate for a model: d = 16, S = 16, G = its query heads per KV head.
    pub fn for_model(c: &Config) -> Self {
        Self {
            n_embd: c.n_embd,
            n_head_kv: c.n_head_kv,
            group: c.n_head / c.n_head_kv,
            dim: GATE_DIM,
            sinks: GATE_SINKS,
        }
    }

    /// Rows of `wq` (H*G*d).
    pub fn q_rows(&self) -> usize {
        self.n_head_kv * self.group * self.dim
    }

    /// Rows of `wk` (H*d).
    pub fn k_rows(&self) -> usize {
        self.n_head_kv * self.dim
    }

    /// Values one token's projections take: the queries, then the keys.
    fn proj(&self) -> usize {
        self.q_rows() + self.k_rows()
    }

    /// Parameters of one layer's gate.
    pub fn n_params(&self) -> usize {
        self.proj() * self.n_embd
            + self.q_rows()
            + 2 * self.dim
            + self.n_head_kv * self.sinks * self.dim
            + self.n_head_kv * self.group
    }
}

/// One layer's gate parameters, named as in the spec. `w` stacks `wq` over `wk`
/// (one product for both).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGate {
    /// `[wq; wk]`: H*G*d + H*d rows of D values.
    pub w: Vec<f32>,
    /// H*G*d
    pub bq: Vec<f32>,
    /// d
    pub gq: Vec<f32>,
    /// d
    pub gk: Vec<f32>,
    /// H x S x d, not normalised.
    pub sink: Vec<f32>,
    /// H x G, the bias on the self logit.
    pub bias: Vec<f32>,
}

impl LayerGate {
    /// All parameters zero (a gradient accumulator).
    pub fn zeros(s: &GateShape) -> Self {
        Self {
            w: vec![0.0; s.proj() * s.n_embd],
            bq: vec![0.0; s.q_rows()],
            gq: vec![0.0; s.dim],
            gk: vec![0.0; s.dim],
            sink: vec![0.0; s.n_head_kv * s.sinks * s.dim],
            bias: vec![0.0; s.n_head_kv * s.group],
        }
    }

    /// The spec's initialisation: projections uniform in +-1/sqrt(D) (a linear
    /// layer's default), norm weights 1, sinks and bias 0.
    pub fn init(s: &GateShape, seed: u64) -> Self {
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        let bound = 1.0 / (s.n_embd as f32).sqrt();
        let mut g = Self::zeros(s);
        g.w.iter_mut()
            .chain(g.bq.iter_mut())
            .for_each(|v| *v = rng.random_range(-bound..bound));
        g.gq.fill(1.0);
        g.gk.fill(1.0);
        g
    }

    /// Every parameter tensor, in a fixed order (for the optimiser and tests).
    pub fn tensors_mut(&mut self) -> [&mut Vec<f32>; 6] {
        [
            &mut self.w,
            &mut self.bq,
            &mut self.gq,
            &mut self.gk,
            &mut self.sink,
            &mut self.bias,
        ]
    }

    /// The projections of `n` tokens (rows of D): per token the H*G*d query values
    /// (bias added) then the H*d key values, before their norms.
    fn project(&self, s: &GateShape, x: &[f32], n: usize) -> Vec<f32> {
        let mut p = vec![0f32; n * s.proj()];
        gemm(
            Mat::new(x, n, s.n_embd),
            Mat::t(&self.w, s.n_embd, s.proj()),
            &mut p,
            false,
        );
        for row in p.chunks_exact_mut(s.proj()) {
            row[..s.q_rows()]
                .iter_mut()
                .zip(&self.bq)
                .for_each(|(v, b)| *v += b);
        }
        p
    }

    /// Scores of `n = x.len() / D` tokens into `out` (n x H, token-major), in
    /// parallel over blocks of tokens. A token's score does not depend on the others
    /// nor on the thread count.
    pub fn score(&self, s: &GateShape, x: &[f32], out: &mut [f32]) {
        let n = x.len() / s.n_embd;
        assert_eq!(out.len(), n * s.n_head_kv, "gate scores: wrong output size");
        x.par_chunks(ROW_BLOCK * s.n_embd)
            .zip(out.par_chunks_mut(ROW_BLOCK * s.n_head_kv))
            .for_each(|(xb, ob)| {
                let m = xb.len() / s.n_embd;
                let p = self.project(s, xb, m);
                let mut f = HeadFwd::new(s);
                for (row, o) in p
                    .chunks_exact(s.proj())
                    .zip(ob.chunks_exact_mut(s.n_head_kv))
                {
                    for (h, oh) in o.iter_mut().enumerate() {
                        self.head_forward(s, h, row, &mut f);
                        // A score that overflowed to NaN (only extreme weights or
                        // activations get there) keeps the pair: never evict on a
                        // number that means nothing.
                        *oh = match f.score() {
                            p if p.is_nan() => 1.0,
                            p => p,
                        };
                    }
                }
            });
    }

    /// The gate of one token (its projections `row`) for KV head `h`, keeping in `f`
    /// what the backward pass needs. (Index loops: each runs over the d = 16 values
    /// of several arrays at once, which reads clearer than nested zips.)
    #[allow(clippy::needless_range_loop)]
    fn head_forward(&self, s: &GateShape, h: usize, row: &[f32], f: &mut HeadFwd) {
        let (d, g_n, n_s) = (s.dim, s.group, s.sinks);
        let inv = 1.0 / (d as f32).sqrt();
        let c = &row[s.q_rows() + h * d..s.q_rows() + (h + 1) * d];
        f.rk = rms_inv(c);
        for i in 0..d {
            f.khat[i] = c[i] * f.rk;
            f.k[i] = f.khat[i] * self.gk[i];
        }
        for g in 0..g_n {
            let a = &row[(h * g_n + g) * d..(h * g_n + g + 1) * d];
            f.rq[g] = rms_inv(a);
            let (qhat, q) = (
                &mut f.qhat[g * d..(g + 1) * d],
                &mut f.q[g * d..(g + 1) * d],
            );
            for i in 0..d {
                qhat[i] = a[i] * f.rq[g];
                q[i] = qhat[i] * self.gq[i];
            }
            let z = dot(&f.k, q) * inv + self.bias[h * g_n + g];
            let pi = &mut f.pi[g * n_s..(g + 1) * n_s];
            let mut max = f32::NEG_INFINITY;
            for (si, e) in pi.iter_mut().enumerate() {
                let key = &self.sink[(h * n_s + si) * d..(h * n_s + si + 1) * d];
                *e = dot(key, q) * inv;
                max = max.max(*e);
            }
            // Eight lanes at a time (S = 16), with the exp approximation attention uses.
            let mut blocks = pi.chunks_exact_mut(8);
            let mut sum: f32 = blocks
                .by_ref()
                .map(|b| softmax_exp8(b.try_into().expect("8 values"), max))
                .sum();
            for e in blocks.into_remainder() {
                *e = softmax_exp(*e - max);
                sum += *e;
            }
            pi.iter_mut().for_each(|e| *e /= sum);
            f.u[g] = z - (max + sum.ln());
        }
    }

    /// Backward of [`LayerGate::head_forward`]: with `du[g]` = dLoss/du_g, add the
    /// parameter gradients to `grad` and write dLoss/d(projections of head h) into
    /// `drow` (same layout as the projections).
    #[allow(clippy::needless_range_loop)]
    fn head_backward(
        &self,
        s: &GateShape,
        h: usize,
        f: &HeadFwd,
        du: &[f32],
        grad: &mut LayerGate,
        drow: &mut [f32],
    ) {
        let (d, g_n, n_s) = (s.dim, s.group, s.sinks);
        let inv = 1.0 / (d as f32).sqrt();
        let mut dk = vec![0f32; d];
        let mut dq = vec![0f32; d];
        for g in 0..g_n {
            let dug = du[g];
            let (qhat, q) = (&f.qhat[g * d..(g + 1) * d], &f.q[g * d..(g + 1) * d]);
            let pi = &f.pi[g * n_s..(g + 1) * n_s];
            grad.bias[h * g_n + g] += dug;
            // u = z - lse: z pulls q towards k, lse pushes it from the sinks.
            for i in 0..d {
                dq[i] = dug * f.k[i] * inv;
                dk[i] += dug * q[i] * inv;
            }
            for (si, &p) in pi.iter().enumerate() {
                let at = (h * n_s + si) * d;
                for i in 0..d {
                    dq[i] -= dug * p * self.sink[at + i] * inv;
                    grad.sink[at + i] -= dug * p * q[i] * inv;
                }
            }
            let da = &mut drow[(h * g_n + g) * d..(h * g_n + g + 1) * d];
            norm_backward(&dq, qhat, f.rq[g], &self.gq, &mut grad.gq, da);
        }
        let dc = &mut drow[s.q_rows() + h * d..s.q_rows() + (h + 1) * d];
        norm_backward(&dk, &f.khat, f.rk, &self.gk, &mut grad.gk, dc);
    }
}

/// What one (token, KV head) gate computes, kept for the backward pass.
struct HeadFwd {
    khat: Vec<f32>,
    rk: f32,
    k: Vec<f32>,
    qhat: Vec<f32>,
    rq: Vec<f32>,
    q: Vec<f32>,
    /// Per group, the softmax over the sinks.
    pi: Vec<f32>,
    /// Per group, z_g - lse_g.
    u: Vec<f32>,
}

impl HeadFwd {
    fn new(s: &GateShape) -> Self {
        Self {
            khat: vec![0.0; s.dim],
            rk: 0.0,
            k: vec![0.0; s.dim],
            qhat: vec![0.0; s.group * s.dim],
            rq: vec![0.0; s.group],
            q: vec![0.0; s.group * s.dim],
            pi: vec![0.0; s.group * s.sinks],
            u: vec![0.0; s.group],
        }
    }

    /// mean_g sigmoid(u_g)
    fn score(&self) -> f32 {
        self.u.iter().map(|&u| sigmoid(u)).sum::<f32>() / self.u.len() as f32
    }
}

/// y = (x * r) * w with r = 1/rms(x): given dy, add dL/dw to `dw` and write dL/dx.
#[allow(clippy::needless_range_loop)]
fn norm_backward(dy: &[f32], xhat: &[f32], r: f32, w: &[f32], dw: &mut [f32], dx: &mut [f32]) {
    let d = dy.len();
    let mut m = 0f32;
    for i in 0..d {
        dw[i] += dy[i] * xhat[i];
        m += dy[i] * w[i] * xhat[i];
    }
    m /= d as f32;
    for i in 0..d {
        dx[i] = r * (dy[i] * w[i] - xhat[i] * m);
    }
}

fn rms_inv(x: &[f32]) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + NORM_EPS).sqrt()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(u: f32) -> f32 {
    1.0 / (1.0 + (-u).exp())
}

/// The layers a model's gates cover: those whose KV the runtime evicts (all of them
/// for llama and qwen; gemma3's global layers, not its sliding-window ones).
pub fn gated_layers(model: &crate::model::Model) -> Vec<usize> {
    let windows = model.kv_shape().windows;
    (0..windows.len())
        .filter(|&il| windows[il].is_none())
        .collect()
}

/// A model's gates: one per gated layer (the layers whose KV is evicted: all of them
/// for llama and qwen, the global ones for gemma3), with what they were trained for.
#[derive(Debug, Clone)]
pub struct Gates {
    pub meta: GateMeta,
    /// Indexed by model layer; None for layers without a gate.
    layers: Vec<Option<LayerGate>>,
}

impl Gates {
    /// Gates for the layers `gated` of a model with `n_layer` layers.
    pub fn new(meta: GateMeta, n_layer: usize, gated: Vec<(usize, LayerGate)>) -> Self {
        let mut layers = vec![None; n_layer];
        for (il, g) in gated {
            layers[il] = Some(g);
        }
        Self { meta, layers }
    }

    pub fn shape(&self) -> &GateShape {
        &self.meta.shape
    }

    /// The gate of model layer `il`, if it has one.
    pub fn layer(&self, il: usize) -> Option<&LayerGate> {
        self.layers.get(il).and_then(Option::as_ref)
    }

    /// The gated layers, in order.
    pub fn gated(&self) -> impl Iterator<Item = (usize, &LayerGate)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(il, g)| g.as_ref().map(|g| (il, g)))
    }
}

/// Binary cross-entropy of a prediction `p` against a soft target `y`.
pub fn bce(p: f64, y: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
}

/// Loss and gradient of one layer's gate on a batch: `x` holds `n` tokens (rows of
/// D), `y` their targets (n x H). The loss is the binary cross-entropy, mean over
/// tokens, summed over heads. Adds the gradient to `grad`; returns the loss and the
/// predictions (n x H).
pub fn loss_and_grad(
    gate: &LayerGate,
    s: &GateShape,
    x: &[f32],
    y: &[f32],
    grad: &mut LayerGate,
) -> (f64, Vec<f32>) {
    let n = x.len() / s.n_embd;
    let p = gate.project(s, x, n);
    let mut dp = vec![0f32; p.len()];
    let mut f = HeadFwd::new(s);
    let mut du = vec![0f32; s.group];
    let mut loss = 0f64;
    let mut pred = vec![0f32; n * s.n_head_kv];
    let g_n = s.group as f64;
    for t in 0..n {
        let row = &p[t * s.proj()..(t + 1) * s.proj()];
        for h in 0..s.n_head_kv {
            gate.head_forward(s, h, row, &mut f);
            let sg: Vec<f64> =
                f.u.iter()
                    .map(|&u| 1.0 / (1.0 + (-u as f64).exp()))
                    .collect();
            let pr = sg.iter().sum::<f64>() / g_n;
            let target = y[t * s.n_head_kv + h] as f64;
            pred[t * s.n_head_kv + h] = pr as f32;
            loss += bce(pr, target) / n as f64;
            // dL/du_g = dL/dp * dp/du_g = (p - y) / (p (1 - p)) * s_g (1 - s_g) / G.
            let denom = (pr * (1.0 - pr)).max(1e-300);
            for (dug, &sv) in du.iter_mut().zip(&sg) {
                *dug = ((pr - target) / denom * sv * (1.0 - sv) / g_n / n as f64) as f32;
            }
            let drow = &mut dp[t * s.proj()..(t + 1) * s.proj()];
            gate.head_backward(s, h, &f, &du, grad, drow);
        }
    }
    // Projections p = x w^T (+ bq): dw += dp^T x, dbq += sum of dp's query part.
    gemm(
        Mat::t(&dp, s.proj(), n),
        Mat::new(x, n, s.n_embd),
        &mut grad.w,
        true,
    );
    for row in dp.chunks_exact(s.proj()) {
        grad.bq
            .iter_mut()
            .zip(&row[..s.q_rows()])
            .for_each(|(g, v)| *g += v);
    }
    (loss, pred)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> GateShape {
        GateShape {
            n_embd: 6,
            n_head_kv: 2,
            group: 2,
            dim: 4,
            sinks: 3,
        }
    }

    /// A gate with every parameter away from its initial value, so that each one's
    /// gradient is exercised.
    fn perturbed(s: &GateShape) -> LayerGate {
        let mut g = LayerGate::init(s, 3);
        let mut rng = ChaCha12Rng::seed_from_u64(9);
        for t in g.tensors_mut().into_iter().skip(1) {
            t.iter_mut().for_each(|v| *v += rng.random_range(-0.8..0.8));
        }
        g
    }

    fn data(s: &GateShape, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        let x = (0..n * s.n_embd)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let y = (0..n * s.n_head_kv)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        (x, y)
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let s = shape();
        let gate = perturbed(&s);
        let (x, y) = data(&s, 5, 1);
        let mut grad = LayerGate::zeros(&s);
        loss_and_grad(&gate, &s, &x, &y, &mut grad);
        let loss_at = |g: &LayerGate| loss_and_grad(g, &s, &x, &y, &mut LayerGate::zeros(&s)).0;
        let names = ["w", "bq", "gq", "gk", "sink", "bias"];
        for (ti, name) in names.iter().enumerate() {
            let analytic = grad.tensors_mut()[ti].clone();
            for (i, &a) in analytic.iter().enumerate() {
                let eps = 1e-2f32;
                let mut plus = gate.clone();
                plus.tensors_mut()[ti][i] += eps;
                let mut minus = gate.clone();
                minus.tensors_mut()[ti][i] -= eps;
                let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps as f64);
                assert!(
                    (numeric - a as f64).abs() <= 2e-3 + 2e-2 * numeric.abs(),
                    "d loss / d {name}[{i}]: finite differences {numeric}, backward {a}"
                );
            }
        }
    }

    #[test]
    fn forward_matches_the_spec_formula_and_training_predictions() {
        let s = shape();
        let gate = perturbed(&s);
        let (x, y) = data(&s, 70, 2);
        let mut out = vec![0f32; 70 * s.n_head_kv];
        gate.score(&s, &x, &mut out);
        // The spec's formula written out directly, in f64, for token 3 and head 1.
        let (t, h, d) = (3usize, 1usize, s.dim);
        let xt = &x[t * s.n_embd..(t + 1) * s.n_embd];
        let lin = |r: usize| -> f64 {
            (0..s.n_embd)
                .map(|i| gate.w[r * s.n_embd + i] as f64 * xt[i] as f64)
                .sum()
        };
        let norm = |v: Vec<f64>, w: &[f32]| -> Vec<f64> {
            let r = 1.0 / (v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64 + 1e-6).sqrt();
            v.iter().zip(w).map(|(a, &g)| a * r * g as f64).collect()
        };
        let k = norm(
            (0..d).map(|i| lin(s.q_rows() + h * d + i)).collect(),
            &gate.gk,
        );
        let mut want = 0f64;
        for g in 0..s.group {
            let r0 = (h * s.group + g) * d;
            let q = norm(
                (0..d)
                    .map(|i| lin(r0 + i) + gate.bq[r0 + i] as f64)
                    .collect(),
                &gate.gq,
            );
            let dotv = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
            let z = dotv(&k, &q) / (d as f64).sqrt() + gate.bias[h * s.group + g] as f64;
            let e: Vec<f64> = (0..s.sinks)
                .map(|si| {
                    let sk: Vec<f64> = gate.sink
                        [(h * s.sinks + si) * d..(h * s.sinks + si + 1) * d]
                        .iter()
                        .map(|&v| v as f64)
                        .collect();
                    dotv(&sk, &q) / (d as f64).sqrt()
                })
                .collect();
            let lse = e.iter().map(|v| v.exp()).sum::<f64>().ln();
            want += 1.0 / (1.0 + (lse - z).exp()) / s.group as f64;
        }
        let got = out[t * s.n_head_kv + h] as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert!(out.iter().all(|&p| p > 0.0 && p < 1.0));
        // Training sees the same predictions as inference.
        let (_, pred) = loss_and_grad(&gate, &s, &x, &y, &mut LayerGate::zeros(&s));
        for (a, b) in pred.iter().zip(&out) {
            assert!((a - b).abs() < 1e-6);
        }
        // Scoring in one batch or token by token gives the same values.
        let mut one = vec![0f32; s.n_head_kv];
        gate.score(&s, &x[t * s.n_embd..(t + 1) * s.n_embd], &mut one);
        assert_eq!(one[..], out[t * s.n_head_kv..(t + 1) * s.n_head_kv]);
    }
}
