//! Attention probabilities for eviction policies. H2O, SnapKV and the KVzip teacher
//! score a cached pair by the attention it receives; the attention kernels never
//! form probabilities (they use an online softmax), so a policy that needs them asks
//! for a [`Probe`] and this pass computes them after the layer's attention, writing
//! into the score of each entry.
use rayon::prelude::*;

use super::attention::visible;
use super::{KvShape, LayerKv};
use crate::kernels::{gemm, softmax_exp8, Mat};

/// How the probabilities a pair receives from several queries combine into its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Added to the score (H2O's accumulated attention, SnapKV's window sum).
    Sum,
    /// The score becomes the largest probability seen (KVzip).
    Max,
}

/// Which keys enter the softmax whose probabilities are observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFilter {
    /// Every key the query attends to.
    Visible,
    /// The KVzip teacher's view: the prompt prefix (positions below `prefix_end`),
    /// one chunk of the context (`chunk_start..chunk_end`) and the repeat input's own
    /// keys (positions from `own_from`); other chunks are left out of the softmax.
    Chunk {
        prefix_end: u32,
        chunk_start: u32,
        chunk_end: u32,
        own_from: u32,
    },
}

impl KeyFilter {
    fn admits(&self, pos: u32) -> bool {
        match *self {
            KeyFilter::Visible => true,
            KeyFilter::Chunk {
                prefix_end,
                chunk_start,
                chunk_end,
                own_from,
            } => pos < prefix_end || (chunk_start..chunk_end).contains(&pos) || pos >= own_from,
        }
    }
}

/// What to observe during one forward call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Rows of the batch (0 = its first token) from which queries are observed.
    pub first_row: usize,
    pub reduce: Reduce,
    pub keys: KeyFilter,
}

/// Rows of the batch whose queries one task observes (with a KV head's group of query
/// heads, the rows of one matrix product).
const ROW_BLOCK: usize = 16;

/// Score the entries of an evictable `layer` by the attention probabilities that the
/// queries of rows `probe.first_row..` give them, over all query heads of each KV
/// head's group. `q` and `q_pos` are as for [`super::attention`]. Probabilities are
/// computed in f32 (ggml's exp approximation) with a softmax over the keys the filter
/// admits. Work is split into (KV head, block of rows) tasks whose partial results
/// are combined in a fixed order, so results do not depend on the thread count.
pub fn observe(
    layer: &mut LayerKv,
    shape: &KvShape,
    n_head: usize,
    q: &[f32],
    q_pos: &[u32],
    kq_scale: f32,
    probe: &Probe,
) {
    let dk = shape.head_dim;
    let gqa = n_head / shape.n_head_kv;
    let window = layer.window;
    let rows = probe.first_row.min(q_pos.len())..q_pos.len();
    if rows.is_empty() {
        return;
    }
    // Per KV head: the admitted keys, gathered as f32 rows, and their list indices.
    let admitted: Vec<(Vec<f32>, Vec<usize>)> = layer
        .heads
        .par_iter()
        .map(|head| {
            let idx: Vec<usize> = (0..head.len())
                .filter(|&j| !head.is_masked(j) && probe.keys.admits(head.pos[j]))
                .collect();
            let keys = idx
                .iter()
                .flat_map(|&j| head.k[j * dk..(j + 1) * dk].iter().map(|x| x.to_f32()))
                .collect();
            (keys, idx)
        })
        .collect();
    let n_blocks = rows.len().div_ceil(ROW_BLOCK);
    let heads = &layer.heads;
    let partials: Vec<Vec<f32>> = (0..shape.n_head_kv * n_blocks)
        .into_par_iter()
        .map(|task| {
            let (hk, b) = (task / n_blocks, task % n_blocks);
            let (keys, idx) = &admitted[hk];
            let mut acc = vec![0f32; idx.len()];
            let first = rows.start + b * ROW_BLOCK;
            let block = first..(first + ROW_BLOCK).min(rows.end);
            // Each row's admitted keys, as a range of `idx`.
            let ranges: Vec<(usize, usize)> = block
                .clone()
                .map(|t| {
                    let (start, end) = visible(&heads[hk], window, q_pos[t]);
                    (
                        idx.partition_point(|&j| j < start),
                        idx.partition_point(|&j| j < end),
                    )
                })
                .collect();
            let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
            let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
            if lo >= hi {
                return acc;
            }
            // The logits of the block's queries (row-major, one row per (token, query
            // head of the group)) against the keys lo..hi, in one matrix product.
            let qs: Vec<f32> = block
                .clone()
                .flat_map(|t| &q[(t * n_head + hk * gqa) * dk..(t * n_head + (hk + 1) * gqa) * dk])
                .copied()
                .collect();
            let n = hi - lo;
            let mut logits = vec![0f32; qs.len() / dk * n];
            gemm(
                Mat::new(&qs, qs.len() / dk, dk),
                Mat::t(&keys[lo * dk..hi * dk], dk, n),
                &mut logits,
                false,
            );
            let mut p = vec![0f32; n.next_multiple_of(8)];
            for (r, row) in logits.chunks_exact(n).enumerate() {
                let (a, e) = ranges[r / gqa];
                if a == e {
                    continue;
                }
                let (a, e) = (a - lo, e - lo);
                probabilities(&row[a..e], kq_scale, &mut p[..(e - a).next_multiple_of(8)]);
                for (s, &pj) in acc[lo + a..lo + e].iter_mut().zip(&p) {
                    *s = match probe.reduce {
                        Reduce::Sum => *s + pj,
                        Reduce::Max => s.max(pj),
                    };
                }
            }
            acc
        })
        .collect();
    for (task, part) in partials.iter().enumerate() {
        let head = &mut layer.heads[task / n_blocks];
        let idx = &admitted[task / n_blocks].1;
        for (&j, &x) in idx.iter().zip(part) {
            let s = &mut head.score[j];
            *s = match probe.reduce {
                Reduce::Sum => *s + x,
                Reduce::Max => s.max(x),
            };
        }
    }
}

/// Softmax of one query's `logits` (before `kq_scale`) into `p` (padded to a
/// multiple of 8; the padding gets 0).
fn probabilities(logits: &[f32], kq_scale: f32, p: &mut [f32]) {
    let n = logits.len();
    let mut max = f32::NEG_INFINITY;
    for (pj, &l) in p.iter_mut().zip(logits) {
        *pj = l * kq_scale;
        max = max.max(*pj);
    }
    p[n..].fill(f32::NEG_INFINITY);
    let mut sum = 0f32;
    for block in p.chunks_exact_mut(8) {
        sum += softmax_exp8(block.try_into().expect("8 values"), max);
    }
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvCache, KvShape};

    fn shape(n_head_kv: usize) -> KvShape {
        KvShape {
            n_layer: 1,
            n_head_kv,
            head_dim: 2,
            head_dim_v: 2,
            windows: vec![None],
        }
    }

    /// Softmax of plain scores, in f64.
    fn softmax(s: &[f64]) -> Vec<f64> {
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    /// A cache with one KV head whose keys are (j, 1) for tokens j = 0..n.
    fn cache(n: usize) -> KvCache {
        let mut c = KvCache::new(shape(1));
        let k: Vec<f32> = (0..n).flat_map(|j| [j as f32 * 0.25, 1.0]).collect();
        c.append(0, n, &k, &vec![0.0; 2 * n]);
        c.advance(n);
        c
    }

    #[test]
    fn sum_accumulates_attention_received_like_h2o() {
        let n = 5;
        let mut c = cache(n);
        // Two query heads sharing the KV head; queries at positions 2 and 4.
        let q = [1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 1.0, 1.0];
        let probe = Probe {
            first_row: 0,
            reduce: Reduce::Sum,
            keys: KeyFilter::Visible,
        };
        let s = c.shape.clone();
        observe(&mut c.layers[0], &s, 2, &q, &[2, 4], 1.0, &probe);
        let mut want = [0f64; 5];
        for (t, &p) in [2usize, 4].iter().enumerate() {
            for h in 0..2 {
                let (qa, qb) = (q[(t * 2 + h) * 2] as f64, q[(t * 2 + h) * 2 + 1] as f64);
                let scores: Vec<f64> = (0..=p).map(|j| qa * j as f64 * 0.25 + qb).collect();
                for (j, pr) in softmax(&scores).iter().enumerate() {
                    want[j] += pr;
                }
            }
        }
        for (got, want) in c.layers[0].heads[0].score.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
        // Every query distributes a probability mass of 1.
        let total: f32 = c.layers[0].heads[0].score.iter().sum();
        assert!((total - 4.0).abs() < 1e-4);
    }

    #[test]
    fn max_over_chunk_view_like_kvzip() {
        // Tokens 0..2 prefix, 2..6 chunk A, 6..10 chunk B, 10..12 the repeat input.
        let n = 12;
        let mut c = cache(n);
        let q = [1.0, 0.5, 0.3, 1.0];
        let probe = Probe {
            first_row: 0,
            reduce: Reduce::Max,
            keys: KeyFilter::Chunk {
                prefix_end: 2,
                chunk_start: 6,
                chunk_end: 10,
                own_from: 10,
            },
        };
        let s = c.shape.clone();
        observe(&mut c.layers[0], &s, 1, &q, &[10, 11], 1.0, &probe);
        let score = &c.layers[0].heads[0].score;
        // Chunk A is outside the softmax: no score.
        assert!(score[2..6].iter().all(|&x| x == 0.0));
        let mut want = [0f64; 12];
        for (t, &p) in [10usize, 11].iter().enumerate() {
            let keys: Vec<usize> = (0..=p).filter(|j| !(2..6).contains(j)).collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| q[t * 2] as f64 * j as f64 * 0.25 + q[t * 2 + 1] as f64)
                .collect();
            for (&j, pr) in keys.iter().zip(softmax(&scores)) {
                want[j] = want[j].max(pr);
            }
        }
        for (got, want) in score.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn blocks_of_rows_and_groups_match_a_direct_softmax() {
        // 40 causal queries (three row blocks) in 4 query heads over 2 KV heads.
        let (n, n_head, hk, dk) = (40, 4, 2, 2);
        let mut c = KvCache::new(shape(hk));
        let k: Vec<f32> = (0..n * hk * dk).map(|i| (i as f32 * 0.61).sin()).collect();
        c.append(0, n, &k, &vec![0.0; n * hk * dk]);
        c.advance(n);
        let q: Vec<f32> = (0..n * n_head * dk)
            .map(|i| (i as f32 * 0.37).cos() * 2.0)
            .collect();
        let pos: Vec<u32> = (0..n as u32).collect();
        for reduce in [Reduce::Sum, Reduce::Max] {
            let mut c = c.clone();
            let probe = Probe {
                first_row: 3,
                reduce,
                keys: KeyFilter::Visible,
            };
            let s = c.shape.clone();
            observe(&mut c.layers[0], &s, n_head, &q, &pos, 0.7, &probe);
            for h in 0..hk {
                // The cache holds keys in f16.
                let f16 = |x: f32| half::f16::from_f32(x).to_f64();
                let key = |j: usize| {
                    let at = (j * hk + h) * dk;
                    (f16(k[at]), f16(k[at + 1]))
                };
                let mut want = vec![0f64; n];
                for t in 3..n {
                    for qh in h * 2..h * 2 + 2 {
                        let at = (t * n_head + qh) * dk;
                        let (qa, qb) = (q[at] as f64, q[at + 1] as f64);
                        let scores: Vec<f64> = (0..=t)
                            .map(|j| 0.7 * (qa * key(j).0 + qb * key(j).1))
                            .collect();
                        for (j, pr) in softmax(&scores).into_iter().enumerate() {
                            want[j] = match reduce {
                                Reduce::Sum => want[j] + pr,
                                Reduce::Max => want[j].max(pr),
                            };
                        }
                    }
                }
                for (got, want) in c.layers[0].heads[h].score.iter().zip(&want) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-5,
                        "{reduce:?}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn first_row_limits_the_observed_queries() {
        let mut c = cache(4);
        let q = [1.0, 0.0, 1.0, 0.0];
        let probe = Probe {
            first_row: 1,
            reduce: Reduce::Sum,
            keys: KeyFilter::Visible,
        };
        let s = c.shape.clone();
        observe(&mut c.layers[0], &s, 1, &q, &[1, 3], 1.0, &probe);
        // Only the query at position 3 counts: one unit of mass over 4 keys.
        let total: f32 = c.layers[0].heads[0].score.iter().sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}
