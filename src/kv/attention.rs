//! Causal attention over the ragged cache.
use rayon::prelude::*;

use half::{f16, slice::HalfFloatSliceExt};

use super::{HeadKv, KvShape, LayerKv};
use crate::kernels::{
    attend_one, softmax_exp8, tile_accumulate, tile_accumulate2, tile_scores, to_f16,
    TILE as KV_TILE,
};
/// Tokens whose queries share one pass over the keys.
const Q_BLOCK: usize = 16;
/// Batches of fewer tokens use the one-query kernel, as llama.cpp's do (its tiled
/// kernel needs a tile of 64 query rows).
const MIN_TILED_BATCH: usize = 64;

/// Causal attention of `n` query tokens (positions `q_pos[t]`) over one layer.
/// `q` is n x n_head x head_dim; `out` is n x n_head x head_dim_v.
///
/// Each query head reads the list of its KV head (`n_head / n_head_kv` query heads
/// share one); a key is visible when its position is at most the query's and, in
/// sliding-window layers, within the window.
///
/// Two kernels, each with the arithmetic of llama.cpp's CPU flash attention for the
/// same case, so that fastkv and llama.cpp compute the same numbers (they are
/// bit-identical on the reference models where the matrix products agree too):
/// - batches of 64 tokens or more: a tiled online softmax in f32 (tiles of 64 keys
///   aligned on list indices, fused multiply-adds in ggml's order, its exp
///   approximation and sum order). Work is split by blocks of tokens, and within one
///   by KV head, so each tile of keys and values is converted from f16 once for
///   every query of the block;
/// - fewer tokens (decoding, short prompts): one query at a time, see [`decode_one`].
pub fn attention(
    layer: &LayerKv,
    shape: &KvShape,
    n_head: usize,
    q: &[f32],
    q_pos: &[u32],
    kq_scale: f32,
    out: &mut [f32],
) {
    let (dk, dv) = (shape.head_dim, shape.head_dim_v);
    let n = q_pos.len();
    let gqa = n_head / shape.n_head_kv;
    if n < MIN_TILED_BATCH {
        out.par_chunks_mut(dv).enumerate().for_each_init(
            || (vec![f16::ZERO; dk], vec![f16::ZERO; dv]),
            |scratch, (i, o)| {
                let (t, h) = (i / n_head, i % n_head);
                let head = &layer.heads[h / gqa];
                let range = visible(head, layer.window, q_pos[t]);
                let qi = &q[i * dk..(i + 1) * dk];
                decode_one(head, qi, range, kq_scale, scratch, o);
            },
        );
        return;
    }
    for (hk, head) in layer.heads.iter().enumerate() {
        // Blocks of Q_BLOCK tokens: their queries of this KV head's group, the keys
        // each may see, and the online softmax state.
        let mut blocks: Vec<QueryBlock> = (0..n.div_ceil(Q_BLOCK))
            .map(|b| {
                let queries: Vec<(usize, usize)> = (b * Q_BLOCK..((b + 1) * Q_BLOCK).min(n))
                    .flat_map(|t| (hk * gqa..(hk + 1) * gqa).map(move |h| (t, h)))
                    .collect();
                let ranges = queries
                    .iter()
                    .map(|&(t, _)| visible(head, layer.window, q_pos[t]))
                    .collect();
                QueryBlock::new(queries, ranges, dv)
            })
            .collect();
        let lo = blocks.iter().map(|b| b.lo).min().unwrap_or(0);
        let hi = blocks.iter().map(|b| b.hi).max().unwrap_or(0);
        // Slabs of keys, converted from f16 once for every block.
        let mut slab = Slab::new(dk, dv);
        let mut s0 = lo / KV_TILE * KV_TILE;
        while s0 < hi {
            let s1 = (s0 + SLAB).min(hi);
            slab.load(head, s0, lo.max(s0)..s1);
            blocks.par_iter_mut().for_each(|b| {
                let qs: Vec<&[f32]> = b
                    .queries
                    .iter()
                    .map(|&(t, h)| &q[(t * n_head + h) * dk..(t * n_head + h + 1) * dk])
                    .collect();
                b.attend(head, &slab, s1, &qs, kq_scale);
            });
            s0 = s1;
        }
        for b in blocks {
            b.finish(out, n_head);
        }
    }
}

/// Keys converted from f16 at a time, for every block of queries to share; a
/// multiple of the tile, it bounds the f32 copy to SLAB x (dk + dv) x 4 bytes.
const SLAB: usize = 2048;

/// A slab of a list's keys and values in f32, from list index `start` (a multiple
/// of the tile): keys transposed tile by tile (`kt[tile][d][c]`), values as rows.
struct Slab {
    start: usize,
    dk: usize,
    dv: usize,
    kt: Vec<f32>,
    vt: Vec<f32>,
}

impl Slab {
    fn new(dk: usize, dv: usize) -> Self {
        Self {
            start: 0,
            dk,
            dv,
            kt: vec![0f32; SLAB * dk],
            vt: vec![0f32; SLAB * dv],
        }
    }

    /// Convert the entries `keys` of `head` into the slab that starts at `start`
    /// (entries of its tiles outside `keys` are left as they were: no query sees them).
    fn load(&mut self, head: &HeadKv, start: usize, keys: std::ops::Range<usize>) {
        let (dk, dv) = (self.dk, self.dv);
        self.start = start;
        self.kt
            .par_chunks_mut(dk * KV_TILE)
            .zip(self.vt.par_chunks_mut(dv * KV_TILE))
            .enumerate()
            .for_each_init(
                || vec![0f32; dk],
                |row, (i, (kt, vt))| {
                    let t0 = start + i * KV_TILE;
                    for j in keys.start.max(t0)..keys.end.min(t0 + KV_TILE) {
                        let c = j - t0;
                        head.k[j * dk..(j + 1) * dk].convert_to_f32_slice(row);
                        for (d, &x) in row.iter().enumerate() {
                            kt[d * KV_TILE + c] = x;
                        }
                        head.v[j * dv..(j + 1) * dv]
                            .convert_to_f32_slice(&mut vt[c * dv..(c + 1) * dv]);
                    }
                },
            );
    }
}

/// The queries of a block of tokens for one KV head, and their online softmax state.
struct QueryBlock {
    /// (token, query head) of each query.
    queries: Vec<(usize, usize)>,
    /// The list indices each query may see.
    ranges: Vec<(usize, usize)>,
    /// The union of the ranges.
    lo: usize,
    hi: usize,
    out: Vec<f32>,
    m: Vec<f32>,
    sum: Vec<f32>,
    /// Every query's scores against the current tile.
    scores: Vec<f32>,
}

impl QueryBlock {
    fn new(queries: Vec<(usize, usize)>, ranges: Vec<(usize, usize)>, dv: usize) -> Self {
        let nq = queries.len();
        Self {
            lo: ranges
                .iter()
                .map(|r: &(usize, usize)| r.0)
                .min()
                .unwrap_or(0),
            hi: ranges.iter().map(|r| r.1).max().unwrap_or(0),
            queries,
            ranges,
            out: vec![0f32; nq * dv],
            m: vec![f32::NEG_INFINITY; nq],
            sum: vec![0f32; nq],
            scores: vec![0f32; nq * KV_TILE],
        }
    }

    /// Attend over the tiles of `slab` (up to list index `end`) that the block's
    /// queries `qs` see.
    fn attend(&mut self, head: &HeadKv, slab: &Slab, end: usize, qs: &[&[f32]], kq_scale: f32) {
        let (dk, dv) = (slab.dk, slab.dv);
        let first = self.lo.max(slab.start) / KV_TILE * KV_TILE;
        for t0 in (first..end.min(self.hi)).step_by(KV_TILE) {
            let tile = (t0 - slab.start) / KV_TILE;
            let kt = &slab.kt[tile * dk * KV_TILE..(tile + 1) * dk * KV_TILE];
            let vt = &slab.vt[tile * dv * KV_TILE..(tile + 1) * dv * KV_TILE];
            self.attend_tile(head, t0, kt, vt, qs, kq_scale, dv);
        }
    }

    /// One tile of keys (list indices `t0..t0 + KV_TILE`, converted in `kt`, `vt`):
    /// the tiled online softmax of llama.cpp's CPU flash attention.
    #[allow(clippy::too_many_arguments)]
    fn attend_tile(
        &mut self,
        head: &HeadKv,
        t0: usize,
        kt: &[f32],
        vt: &[f32],
        qs: &[&[f32]],
        kq_scale: f32,
        dv: usize,
    ) {
        let dk = kt.len() / KV_TILE;
        // Queries that see nothing of this tile need no scores.
        let sees = |&(start, end): &(usize, usize)| t0.max(start) < (t0 + KV_TILE).min(end);
        let active: Vec<usize> = (0..qs.len()).filter(|&i| sees(&self.ranges[i])).collect();
        let aq: Vec<&[f32]> = active.iter().map(|&i| qs[i]).collect();
        tile_scores(&aq, kt, dk, &mut self.scores[..aq.len() * KV_TILE]);
        // The softmax step of every query that sees a key: (query, its row of
        // scores, the tile columns it sees). Then the values, two queries at a time
        // where they see the same columns (the heads of one token).
        let mut live: Vec<(usize, usize, (usize, usize))> = Vec::with_capacity(active.len());
        for (row, (&i, scores)) in active
            .iter()
            .zip(self.scores.chunks_exact_mut(KV_TILE))
            .enumerate()
        {
            let (start, end) = self.ranges[i];
            let (ca, cb) = (t0.max(start) - t0, (t0 + KV_TILE).min(end) - t0);
            let scores: &mut [f32; KV_TILE] = scores.try_into().expect("a tile of scores");
            for (c, x) in scores.iter_mut().enumerate() {
                *x = if (ca..cb).contains(&c) && !head.is_masked(t0 + c) {
                    *x * kq_scale
                } else {
                    f32::NEG_INFINITY
                };
            }
            let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if tile_max == f32::NEG_INFINITY {
                continue; // every visible key of the tile is masked
            }
            let m_new = self.m[i].max(tile_max);
            if m_new > self.m[i] {
                let ms = (self.m[i] - m_new).exp();
                self.out[i * dv..(i + 1) * dv]
                    .iter_mut()
                    .for_each(|v| *v *= ms);
                self.sum[i] *= ms;
            }
            self.m[i] = m_new;
            let mut tile_sum = 0f64;
            for block in scores.chunks_exact_mut(8) {
                let block: &mut [f32; 8] = block.try_into().expect("8 values");
                tile_sum += softmax_exp8(block, m_new) as f64;
            }
            self.sum[i] = (self.sum[i] as f64 + tile_sum) as f32;
            live.push((i, row, (ca, cb)));
        }
        let mut k = 0;
        while k < live.len() {
            let (i, row, (ca, cb)) = live[k];
            let w = &self.scores[row * KV_TILE..(row + 1) * KV_TILE];
            let v = &vt[ca * dv..cb * dv];
            match live.get(k + 1) {
                Some(&(j, row1, cols)) if cols == (ca, cb) => {
                    // i < j: the queries are in order.
                    let (a, b) = self.out.split_at_mut(j * dv);
                    let w1 = &self.scores[row1 * KV_TILE..(row1 + 1) * KV_TILE];
                    tile_accumulate2(
                        &mut a[i * dv..(i + 1) * dv],
                        &mut b[..dv],
                        &w[ca..cb],
                        &w1[ca..cb],
                        v,
                    );
                    k += 2;
                }
                _ => {
                    tile_accumulate(&mut self.out[i * dv..(i + 1) * dv], &w[ca..cb], v);
                    k += 1;
                }
            }
        }
    }

    /// Normalise the outputs and write them to their rows of `out`.
    fn finish(self, out: &mut [f32], n_head: usize) {
        let dv = self.out.len() / self.queries.len().max(1);
        for ((&(t, h), o), &s) in self
            .queries
            .iter()
            .zip(self.out.chunks_exact(dv))
            .zip(&self.sum)
        {
            let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
            let row = &mut out[(t * n_head + h) * dv..(t * n_head + h + 1) * dv];
            for (y, &x) in row.iter_mut().zip(o) {
                *y = x * inv;
            }
        }
    }
}

/// The list indices a query at position `p` may attend to.
pub(super) fn visible(head: &HeadKv, window: Option<usize>, p: u32) -> (usize, usize) {
    let p = p as u64;
    let end = head.pos.partition_point(|&kp| kp as u64 <= p);
    let start = match window {
        Some(w) => head.pos[..end].partition_point(|&kp| kp as u64 + w as u64 <= p),
        None => 0,
    };
    (start, end)
}

/// Attention of one query over keys `start..end`, as llama.cpp decodes a token
/// (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`): the query rounded to f16,
/// scores by ggml's f16 dot product, an online softmax key by key with `expf`, and
/// the weighted values accumulated in f16 (rounded after every key). The f16
/// accumulator costs a little precision; matching it keeps greedy generation token
/// for token identical to llama.cpp's, which users compare against.
/// `scratch` holds the f16 query and accumulator (head_dim and head_dim_v long),
/// reused between queries.
fn decode_one(
    head: &HeadKv,
    q: &[f32],
    (start, end): (usize, usize),
    kq_scale: f32,
    (q16, acc): &mut (Vec<f16>, Vec<f16>),
    out: &mut [f32],
) {
    to_f16(q, q16);
    attend_one(
        &head.k,
        &head.v,
        start..end,
        q16,
        kq_scale,
        |j| head.is_masked(j),
        acc,
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{EvictMode, KvCache};

    /// The tiled online softmax written plainly, one query at a time: tiles of 64
    /// list indices aligned on multiples of 64, scores as fused multiply-adds over
    /// the dimension from 0, ggml's exp and sum order, values added key by key.
    fn reference_one(
        head: &HeadKv,
        dk: usize,
        dv: usize,
        q: &[f32],
        (start, end): (usize, usize),
        scale: f32,
    ) -> Vec<f32> {
        let mut o = vec![0f32; dv];
        let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
        for t0 in (start / KV_TILE * KV_TILE..end).step_by(KV_TILE) {
            let mut scores = [f32::NEG_INFINITY; KV_TILE];
            for j in t0.max(start)..(t0 + KV_TILE).min(end) {
                if head.is_masked(j) {
                    continue;
                }
                let mut acc = 0f32;
                for (qd, kd) in q.iter().zip(&head.k[j * dk..(j + 1) * dk]) {
                    acc = qd.mul_add(kd.to_f32(), acc);
                }
                scores[j - t0] = acc * scale;
            }
            let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if tile_max == f32::NEG_INFINITY {
                continue;
            }
            let m_new = m.max(tile_max);
            if m_new > m {
                let ms = (m - m_new).exp();
                o.iter_mut().for_each(|v| *v *= ms);
                sum *= ms;
            }
            m = m_new;
            let mut tile_sum = 0f64;
            for block in scores.chunks_exact_mut(8) {
                tile_sum += softmax_exp8(block.try_into().unwrap(), m_new) as f64;
            }
            sum = (sum as f64 + tile_sum) as f32;
            for j in t0.max(start)..(t0 + KV_TILE).min(end) {
                let w = scores[j - t0];
                for (y, v) in o.iter_mut().zip(&head.v[j * dv..(j + 1) * dv]) {
                    *y = w.mul_add(v.to_f32(), *y);
                }
            }
        }
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        o.iter().map(|x| x * inv).collect()
    }

    /// The tiled kernel (query blocks, slabs of converted keys, register tiles) gives
    /// bit for bit what the plain loop gives: over more keys than a slab, with
    /// evicted (masked) entries, a sliding window and a query group.
    #[test]
    fn tiled_attention_equals_the_plain_loop() {
        let rnd = |i: usize| ((i as f32 * 12.9898).sin() * 43758.547).fract() * 2.0 - 1.0;
        for (window, dk, n_head) in [(None, 64, 6), (Some(700), 128, 2)] {
            let shape = KvShape {
                n_layer: 1,
                n_head_kv: 2,
                head_dim: dk,
                head_dim_v: dk,
                windows: vec![None],
            };
            let (n_ctx, n) = (SLAB + 900, 100);
            let mut cache = KvCache::new(shape.clone());
            let kv: Vec<f32> = (0..n_ctx * 2 * dk).map(rnd).collect();
            let vv: Vec<f32> = kv.iter().map(|x| x * 0.5 + 0.1).collect();
            cache.append(0, n_ctx, &kv, &vv);
            cache.advance(n_ctx);
            for h in 0..2 {
                let keep: Vec<bool> = (0..n_ctx).map(|j| rnd(j * 3 + h) > -0.6).collect();
                cache.evict(0, h, &keep, EvictMode::Mask);
            }
            let mut layer = cache.layers[0].clone();
            layer.window = window;
            let q: Vec<f32> = (0..n * n_head * dk).map(|i| rnd(i + 5) * 3.0).collect();
            let pos: Vec<u32> = (n_ctx - n..n_ctx).map(|p| p as u32).collect();
            let mut got = vec![0f32; n * n_head * dk];
            attention(&layer, &shape, n_head, &q, &pos, 0.1, &mut got);
            let gqa = n_head / 2;
            for (t, &p) in pos.iter().enumerate() {
                for h in 0..n_head {
                    let head = &layer.heads[h / gqa];
                    let i = t * n_head + h;
                    let range = visible(head, window, p);
                    let want = reference_one(head, dk, dk, &q[i * dk..(i + 1) * dk], range, 0.1);
                    assert_eq!(&got[i * dk..(i + 1) * dk], &want[..], "token {t}, head {h}");
                }
            }
        }
    }

    /// Attention over a cache whose evicted pairs are masked equals attention over
    /// the compacted cache, for both kernels (short batches exactly, tiled batches
    /// to float rounding).
    #[test]
    fn masked_equals_compacted() {
        let shape = KvShape {
            n_layer: 1,
            n_head_kv: 2,
            head_dim: 64,
            head_dim_v: 64,
            windows: vec![None],
        };
        let (n_head, n_ctx) = (4, 300);
        let rnd = |i: usize| ((i as f32 * 12.9898).sin() * 43758.547).fract() * 2.0 - 1.0;
        let kv: Vec<f32> = (0..n_ctx * 2 * 64).map(rnd).collect();
        let mut masked = KvCache::new(shape.clone());
        masked.append(
            0,
            n_ctx,
            &kv,
            &kv.iter().map(|x| x * 0.5).collect::<Vec<_>>(),
        );
        masked.advance(n_ctx);
        let mut compact = masked.clone();
        for h in 0..2 {
            let keep: Vec<bool> = (0..n_ctx).map(|j| rnd(j * 7 + h) > -0.3).collect();
            masked.evict(0, h, &keep, EvictMode::Mask);
            compact.evict(0, h, &keep, EvictMode::Compact);
        }
        for n in [1, 10, 100] {
            let q: Vec<f32> = (0..n * n_head * 64).map(|i| rnd(i + 99) * 2.0).collect();
            let pos: Vec<u32> = (n_ctx - n..n_ctx).map(|p| p as u32).collect();
            let mut a = vec![0f32; n * n_head * 64];
            let mut b = a.clone();
            attention(&masked.layers[0], &shape, n_head, &q, &pos, 0.125, &mut a);
            attention(&compact.layers[0], &shape, n_head, &q, &pos, 0.125, &mut b);
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            if n < MIN_TILED_BATCH {
                assert_eq!(a, b, "one-query kernel, {n} queries");
            } else {
                assert!(
                    diff < 1e-5,
                    "tiled kernel, {n} queries: max difference {diff}"
                );
            }
        }
    }
}
