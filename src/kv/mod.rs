//! The KV cache: for every layer and KV head, its own contiguous list of f16 keys,
//! f16 values and original token positions. Lists are ragged by design, so that
//! eviction policies can shrink each one independently and really free memory;
//! attention reads each list as it is, using the stored positions for masking.
//!
//! Sliding-window layers keep only the last `window` tokens.
mod attention;

pub use attention::attention;

use half::f16;

use crate::kernels::to_f16;

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
