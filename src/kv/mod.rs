//! The KV cache: for every layer and KV head, its own contiguous list of f16 keys,
//! f16 values and original token positions. Lists are ragged by design, so that
//! eviction policies can shrink each one independently and really free memory;
//! attention reads each list as it is, using the stored positions for masking.
//!
//! Sliding-window layers keep only the last `window` tokens.
use half::f16;
use rayon::prelude::*;

use crate::kernels::{softmax_exp8, to_f16};

/// Keys, values and positions of one (layer, KV head), in position order.
#[derive(Debug, Clone, Default)]
pub struct HeadKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
    pub pos: Vec<u32>,
}

impl HeadKv {
    pub fn len(&self) -> usize {
        self.pos.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
    /// Bytes held (allocated) by this list.
    pub fn bytes(&self) -> usize {
        (self.k.capacity() + self.v.capacity()) * 2 + self.pos.capacity() * 4
    }
}

/// One layer's cache.
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub heads: Vec<HeadKv>,
    /// Sliding window (tokens), for local-attention layers.
    pub window: Option<usize>,
}

/// The shape of a cache: what each layer and head stores.
#[derive(Debug, Clone)]
pub struct KvShape {
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    /// Per layer: its sliding window, if any.
    pub windows: Vec<Option<usize>>,
}

/// The whole cache, plus the count of tokens seen (the next token's position).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub shape: KvShape,
    pub layers: Vec<LayerKv>,
    n_seen: usize,
}

impl KvCache {
    pub fn new(shape: KvShape) -> Self {
        let layers = shape
            .windows
            .iter()
            .map(|&window| LayerKv {
                heads: vec![HeadKv::default(); shape.n_head_kv],
                window,
            })
            .collect();
        Self {
            shape,
            layers,
            n_seen: 0,
        }
    }

    /// Tokens processed so far; also the position the next token will take.
    pub fn n_seen(&self) -> usize {
        self.n_seen
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            for h in &mut l.heads {
                *h = HeadKv::default();
            }
        }
        self.n_seen = 0;
    }

    /// Keep only the first `n` tokens (positions below `n`). Returns false, changing
    /// nothing, when that is impossible: a sliding-window layer has already dropped
    /// keys the next token would need.
    pub fn truncate(&mut self, n: usize) -> bool {
        if n >= self.n_seen {
            return n == self.n_seen;
        }
        for l in &self.layers {
            let Some(w) = l.window else { continue };
            let needed_from = (n + 1).saturating_sub(w);
            if l.heads
                .iter()
                .any(|h| h.pos.first().is_some_and(|&p| p as usize > needed_from))
            {
                return false;
            }
        }
        let (dk, dv) = (self.shape.head_dim, self.shape.head_dim_v);
        for h in self.layers.iter_mut().flat_map(|l| &mut l.heads) {
            let keep = h.pos.partition_point(|&p| (p as usize) < n);
            h.pos.truncate(keep);
            h.k.truncate(keep * dk);
            h.v.truncate(keep * dv);
        }
        self.n_seen = n;
        true
    }

    /// Record that `n` more tokens have been processed (after all layers appended them),
    /// and drop what sliding-window layers no longer need.
    pub fn advance(&mut self, n: usize) {
        self.n_seen += n;
        let next = self.n_seen as u64;
        for l in &mut self.layers {
            let Some(w) = l.window else { continue };
            for h in &mut l.heads {
                // The next query (position `next`) sees keys with next - pos < w.
                let keep_from = h.pos.partition_point(|&p| (p as u64) + (w as u64) <= next);
                // Compact in batches so decode does not move the list every token.
                if keep_from >= 64 || (keep_from > 0 && keep_from * 4 >= h.len()) {
                    let (dk, dv) = (self.shape.head_dim, self.shape.head_dim_v);
                    h.k.drain(..keep_from * dk);
                    h.v.drain(..keep_from * dv);
                    h.pos.drain(..keep_from);
                }
            }
        }
    }

    /// Bytes held by the cache (what is allocated for keys, values and positions).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(HeadKv::bytes)
            .sum()
    }

    /// Append keys and values of `n` tokens (positions `n_seen..n_seen+n`) to layer `il`.
    /// `k` is n x n_head_kv x head_dim, `v` is n x n_head_kv x head_dim_v (f32).
    pub fn append(&mut self, il: usize, n: usize, k: &[f32], v: &[f32]) {
        let (hk, dk, dv) = (
            self.shape.n_head_kv,
            self.shape.head_dim,
            self.shape.head_dim_v,
        );
        let start = self.n_seen;
        for (h, head) in self.layers[il].heads.iter_mut().enumerate() {
            head.k.reserve(n * dk);
            head.v.reserve(n * dv);
            for t in 0..n {
                let kr = &k[(t * hk + h) * dk..(t * hk + h + 1) * dk];
                let vr = &v[(t * hk + h) * dv..(t * hk + h + 1) * dv];
                let ko = head.k.len();
                head.k.resize(ko + dk, f16::ZERO);
                to_f16(kr, &mut head.k[ko..]);
                let vo = head.v.len();
                head.v.resize(vo + dv, f16::ZERO);
                to_f16(vr, &mut head.v[vo..]);
                head.pos.push((start + t) as u32);
            }
        }
    }
}

/// Keys per tile of the attention kernel (llama.cpp's CPU flash attention uses 64).
const KV_TILE: usize = 64;

/// Causal attention of `n` query tokens (positions `q_pos[t]`) over layer `layer`.
/// `q` is n x n_head x head_dim; `out` is n x n_head x head_dim_v.
///
/// Each query head reads the list of its KV head (`n_head / n_head_kv` query heads
/// share one); a key is visible when its position is at most the query's and, in
/// sliding-window layers, within the window.
///
/// The kernel is a tiled online softmax in f32, in exactly the arithmetic order of
/// llama.cpp's CPU flash attention for prompt batches (tiles of 64 keys, fused
/// multiply-adds, its exp approximation), so fastkv and llama.cpp agree bit for bit
/// on the same cache. Values are accumulated in f32 (llama.cpp's single-token path
/// accumulates in f16; we keep the more accurate f32 everywhere).
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
    let gqa = n_head / shape.n_head_kv;
    out.par_chunks_mut(dv).enumerate().for_each_init(
        || (vec![0f32; dk * KV_TILE], [0f32; KV_TILE]),
        |(kt, scores), (i, o)| {
            let (t, h) = (i / n_head, i % n_head);
            let head = &layer.heads[h / gqa];
            let p = q_pos[t] as u64;
            let end = head.pos.partition_point(|&kp| kp as u64 <= p);
            let start = match layer.window {
                Some(w) => head.pos[..end].partition_point(|&kp| kp as u64 + w as u64 <= p),
                None => 0,
            };
            let qh = &q[i * dk..(i + 1) * dk];
            let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
            o.fill(0.0);
            // Tiles are aligned on list indices, as llama.cpp's are on cache cells.
            for t0 in (start / KV_TILE * KV_TILE..end).step_by(KV_TILE) {
                let (j0, j1) = (t0.max(start), (t0 + KV_TILE).min(end));
                // Scores: keys transposed to f32 so the dot products run across keys.
                scores.fill(f32::NEG_INFINITY);
                let cols = j1 - j0;
                for (c, j) in (j0..j1).enumerate() {
                    for (d, kv) in head.k[j * dk..(j + 1) * dk].iter().enumerate() {
                        kt[d * KV_TILE + c] = kv.to_f32();
                    }
                }
                let mut acc = [0f32; KV_TILE];
                for (d, &qd) in qh.iter().enumerate() {
                    let krow = &kt[d * KV_TILE..d * KV_TILE + cols];
                    for (a, &kv) in acc[..cols].iter_mut().zip(krow) {
                        *a = qd.mul_add(kv, *a);
                    }
                }
                let off = j0 - t0;
                for c in 0..cols {
                    scores[off + c] = acc[c] * kq_scale;
                }
                // Online softmax over the tile.
                let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let m_new = m.max(tile_max);
                if m_new > m {
                    let ms = (m - m_new).exp();
                    o.iter_mut().for_each(|v| *v *= ms);
                    sum *= ms;
                }
                m = m_new;
                let mut tile_sum = 0f64;
                for block in scores.chunks_exact_mut(8) {
                    let block: &mut [f32; 8] = block.try_into().expect("8 values");
                    tile_sum += softmax_exp8(block, m) as f64;
                }
                sum = (sum as f64 + tile_sum) as f32;
                for j in j0..j1 {
                    let w = scores[j - t0];
                    for (y, x) in o.iter_mut().zip(&head.v[j * dv..(j + 1) * dv]) {
                        *y = w.mul_add(x.to_f32(), *y);
                    }
                }
            }
            let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
            o.iter_mut().for_each(|v| *v *= inv);
        },
    );
}
