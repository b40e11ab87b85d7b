//! Causal attention over the ragged cache.
use rayon::prelude::*;

use half::f16;

use super::{HeadKv, KvShape, LayerKv};
use crate::kernels::{attend_one, softmax_exp8, to_f16};

/// Keys per tile (llama.cpp's CPU flash attention uses 64 as well).
const KV_TILE: usize = 64;
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
    // One task per block of tokens, writing its own rows of the output.
    out.par_chunks_mut(Q_BLOCK * n_head * dv)
        .enumerate()
        .for_each(|(b, rows)| {
            let tokens = b * Q_BLOCK..((b + 1) * Q_BLOCK).min(n);
            for (hk, head) in layer.heads.iter().enumerate() {
                let queries: Vec<(usize, usize)> = tokens
                    .clone()
                    .flat_map(|t| (hk * gqa..(hk + 1) * gqa).map(move |h| (t, h)))
                    .collect();
                let ranges: Vec<(usize, usize)> = queries
                    .iter()
                    .map(|&(t, _)| visible(head, layer.window, q_pos[t]))
                    .collect();
                let qs: Vec<&[f32]> = queries
                    .iter()
                    .map(|&(t, h)| &q[(t * n_head + h) * dk..(t * n_head + h + 1) * dk])
                    .collect();
                let res = block_attention(head, dk, dv, &qs, &ranges, kq_scale);
                for (&(t, h), o) in queries.iter().zip(res.chunks_exact(dv)) {
                    let row = (t - tokens.start) * n_head + h;
                    rows[row * dv..(row + 1) * dv].copy_from_slice(o);
                }
            }
        });
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

/// Attention of several queries over one KV head; query i sees keys `ranges[i]`.
/// Returns the outputs, `dv` values per query.
fn block_attention(
    head: &HeadKv,
    dk: usize,
    dv: usize,
    qs: &[&[f32]],
    ranges: &[(usize, usize)],
    kq_scale: f32,
) -> Vec<f32> {
    let nq = qs.len();
    let mut out = vec![0f32; nq * dv];
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut sum = vec![0f32; nq];
    let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
    let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    let mut kt = vec![0f32; dk * KV_TILE]; // keys of the tile, transposed
    let mut vt = vec![0f32; KV_TILE * dv];
    let mut scores = [0f32; KV_TILE];
    for t0 in (lo / KV_TILE * KV_TILE..hi).step_by(KV_TILE) {
        let (j0, j1) = (t0.max(lo), (t0 + KV_TILE).min(hi));
        for j in j0..j1 {
            let c = j - t0;
            for (d, kv) in head.k[j * dk..(j + 1) * dk].iter().enumerate() {
                kt[d * KV_TILE + c] = kv.to_f32();
            }
            let vrow = &mut vt[c * dv..(c + 1) * dv];
            for (x, v) in vrow.iter_mut().zip(&head.v[j * dv..(j + 1) * dv]) {
                *x = v.to_f32();
            }
        }
        for (i, (&qh, &(start, end))) in qs.iter().zip(ranges).enumerate() {
            let (a, b) = (t0.max(start), (t0 + KV_TILE).min(end));
            if a >= b {
                continue;
            }
            // Scores: dot products across keys, one fused multiply-add per dimension.
            let mut acc = [0f32; KV_TILE];
            let (ca, cb) = (a - t0, b - t0);
            for (d, &qd) in qh.iter().enumerate() {
                let krow = &kt[d * KV_TILE + ca..d * KV_TILE + cb];
                for (s, &kv) in acc[ca..cb].iter_mut().zip(krow) {
                    *s = qd.mul_add(kv, *s);
                }
            }
            scores.fill(f32::NEG_INFINITY);
            for c in ca..cb {
                if !head.is_masked(t0 + c) {
                    scores[c] = acc[c] * kq_scale;
                }
            }
            // Online softmax over the tile.
            let o = &mut out[i * dv..(i + 1) * dv];
            let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if tile_max == f32::NEG_INFINITY {
                continue; // every visible key of the tile is masked
            }
            let m_new = m[i].max(tile_max);
            if m_new > m[i] {
                let ms = (m[i] - m_new).exp();
                o.iter_mut().for_each(|v| *v *= ms);
                sum[i] *= ms;
            }
            m[i] = m_new;
            let mut tile_sum = 0f64;
            for block in scores.chunks_exact_mut(8) {
                let block: &mut [f32; 8] = block.try_into().expect("8 values");
                tile_sum += softmax_exp8(block, m_new) as f64;
            }
            sum[i] = (sum[i] as f64 + tile_sum) as f32;
            for c in ca..cb {
                let w = scores[c];
                for (y, &x) in o.iter_mut().zip(&vt[c * dv..(c + 1) * dv]) {
                    *y = w.mul_add(x, *y);
                }
            }
        }
    }
    for (o, &s) in out.chunks_exact_mut(dv).zip(&sum) {
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        o.iter_mut().for_each(|v| *v *= inv);
    }
    out
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
