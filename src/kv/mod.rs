//! The KV cache: for every layer and KV head, its own contiguous list of f16 keys,
//! f16 values, original token positions and eviction scores. Lists are ragged by
//! design, so that eviction policies can shrink each one independently and really
//! free memory; attention reads each list as it is, using the stored positions for
//! masking.
//!
//! Sliding-window layers keep only the last `window` tokens and are never evicted.
mod attention;
mod observe;
mod persist;
pub mod policy;

pub use attention::attention;
pub use observe::{observe, KeyFilter, Probe, Reduce};
pub use persist::{ContextFileError, SavedContext};
pub use policy::{Level, Policy, PolicyError};

use half::f16;

use crate::kernels::to_f16;

/// Keys, values, positions and scores of one (layer, KV head), in position order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
    pub pos: Vec<u32>,
    /// One score per entry: how much the eviction policy wants to keep it (higher =
    /// more). New entries start at 0 until the policy scores them.
    pub score: Vec<f32>,
    /// Entries hidden from attention without being freed; empty when none are. Only
    /// [`EvictMode::Mask`] sets it: it exists to check that eviction equals masking.
    pub masked: Vec<bool>,
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
        (self.k.capacity() + self.v.capacity()) * 2
            + (self.pos.capacity() + self.score.capacity()) * 4
            + self.masked.capacity()
    }
    /// Whether entry `j` is hidden from attention.
    pub fn is_masked(&self, j: usize) -> bool {
        !self.masked.is_empty() && self.masked[j]
    }

    /// Keep the entries where `keep` is true, in order, moving them down in place
    /// from the first removed one. The capacity stays for the next appends (a
    /// chunked prefill refills it); [`KvCache::shrink_to_fit`] returns it.
    fn compact(&mut self, keep: &[bool], dk: usize, dv: usize) {
        let Some(first) = keep.iter().position(|&k| !k) else {
            return;
        };
        let mut w = first;
        for (j, _) in keep.iter().enumerate().skip(first).filter(|(_, &k)| k) {
            self.k.copy_within(j * dk..(j + 1) * dk, w * dk);
            self.v.copy_within(j * dv..(j + 1) * dv, w * dv);
            self.pos[w] = self.pos[j];
            self.score[w] = self.score[j];
            if !self.masked.is_empty() {
                self.masked[w] = self.masked[j];
            }
            w += 1;
        }
        self.truncate(w, dk, dv);
    }

    /// Hide the entries where `keep` is false from attention, keeping their memory.
    fn mask(&mut self, keep: &[bool]) {
        if self.masked.is_empty() {
            self.masked = vec![false; self.len()];
        }
        for (m, &k) in self.masked.iter_mut().zip(keep) {
            *m |= !k;
        }
    }

    fn shrink_to_fit(&mut self) {
        self.k.shrink_to_fit();
        self.v.shrink_to_fit();
        self.pos.shrink_to_fit();
        self.score.shrink_to_fit();
        self.masked.shrink_to_fit();
    }

    /// Drop entries `n..`.
    fn truncate(&mut self, n: usize, dk: usize, dv: usize) {
        self.pos.truncate(n);
        self.score.truncate(n);
        self.k.truncate(n * dk);
        self.v.truncate(n * dv);
        if !self.masked.is_empty() {
            self.masked.truncate(n);
        }
    }

    /// Drop entries `..n` (sliding windows), moving the rest to the front.
    fn drop_front(&mut self, n: usize, dk: usize, dv: usize) {
        self.pos.drain(..n);
        self.score.drain(..n);
        self.k.drain(..n * dk);
        self.v.drain(..n * dv);
        if !self.masked.is_empty() {
            self.masked.drain(..n);
        }
    }

    /// Make room for `n` more entries. Growth is by an eighth of the list (at least
    /// 64 entries) rather than doubling, so that a compacted list does not jump back
    /// to twice its size on the next token.
    fn reserve(&mut self, n: usize, dk: usize, dv: usize) {
        if self.pos.len() + n <= self.pos.capacity() {
            return;
        }
        let extra = n.max(self.len() / 8).max(64);
        self.k.reserve_exact(extra * dk);
        self.v.reserve_exact(extra * dv);
        self.pos.reserve_exact(extra);
        self.score.reserve_exact(extra);
        if !self.masked.is_empty() {
            self.masked.reserve_exact(extra);
        }
    }
}

/// How eviction removes entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EvictMode {
    /// Remove them and free their memory (what the runtime does).
    #[default]
    Compact,
    /// Hide them from attention but keep them (to check that eviction equals
    /// masking; saves nothing).
    Mask,
}

/// One layer's cache.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerKv {
    pub heads: Vec<HeadKv>,
    /// Sliding window (tokens), for local-attention layers.
    pub window: Option<usize>,
}

impl LayerKv {
    /// Whether eviction may shrink this layer (sliding-window layers keep their window).
    pub fn is_evictable(&self) -> bool {
        self.window.is_none()
    }
}

/// The shape of a cache: what each layer and head stores.
#[derive(Debug, Clone, PartialEq)]
pub struct KvShape {
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    /// Per layer: its sliding window, if any.
    pub windows: Vec<Option<usize>>,
}

impl KvShape {
    /// Bytes one entry (one token of one KV head) takes: keys, values, position, score.
    pub fn entry_bytes(&self) -> usize {
        (self.head_dim + self.head_dim_v) * 2 + 8
    }
}

/// The whole cache, plus the count of tokens seen (the next token's position).
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache {
    pub shape: KvShape,
    pub layers: Vec<LayerKv>,
    n_seen: usize,
}

/// What [`KvCache::checkpoint`] saved, for [`KvCache::rollback`].
#[derive(Debug)]
pub struct Checkpoint {
    n_seen: usize,
    /// Copies of the sliding-window layers (which drop old keys as new tokens come);
    /// None for the others, which are cut back by position.
    windows: Vec<Option<LayerKv>>,
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
            h.truncate(keep, dk, dv);
        }
        self.n_seen = n;
        true
    }

    /// Remember the cache as it is, to return to it with [`KvCache::rollback`] after
    /// running tokens that must leave no trace (the KVzip teacher's repeat pass).
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            n_seen: self.n_seen,
            windows: self
                .layers
                .iter()
                .map(|l| (!l.is_evictable()).then(|| l.clone()))
                .collect(),
        }
    }

    /// Return to a checkpoint taken on this cache: drop every token appended since
    /// (evictable lists by position, so evictions meanwhile do not matter) and
    /// restore the sliding windows. Scores written meanwhile into entries that
    /// existed then are kept.
    pub fn rollback(&mut self, cp: Checkpoint) {
        let (dk, dv) = (self.shape.head_dim, self.shape.head_dim_v);
        for (l, saved) in self.layers.iter_mut().zip(cp.windows) {
            match saved {
                None => {
                    for h in &mut l.heads {
                        let keep = h.pos.partition_point(|&p| (p as usize) < cp.n_seen);
                        h.truncate(keep, dk, dv);
                    }
                }
                Some(copy) => {
                    // Copy back into the existing allocations, keeping their capacity.
                    for (h, c) in l.heads.iter_mut().zip(&copy.heads) {
                        h.k.clone_from(&c.k);
                        h.v.clone_from(&c.v);
                        h.pos.clone_from(&c.pos);
                        h.score.clone_from(&c.score);
                        h.masked.clone_from(&c.masked);
                    }
                }
            }
        }
        self.n_seen = cp.n_seen;
    }

    /// Record that `n` more tokens have been processed (after all layers appended them),
    /// and drop what sliding-window layers no longer need.
    pub fn advance(&mut self, n: usize) {
        self.n_seen += n;
        let next = self.n_seen as u64;
        let (dk, dv) = (self.shape.head_dim, self.shape.head_dim_v);
        for l in &mut self.layers {
            let Some(w) = l.window else { continue };
            for h in &mut l.heads {
                // The next query (position `next`) sees keys with next - pos < w.
                let keep_from = h.pos.partition_point(|&p| (p as u64) + (w as u64) <= next);
                // Compact in batches so decode does not move the list every token.
                if keep_from >= 64 || (keep_from > 0 && keep_from * 4 >= h.len()) {
                    h.drop_front(keep_from, dk, dv);
                }
            }
        }
    }

    /// Bytes held by the cache (what is allocated for keys, values, positions and scores).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(HeadKv::bytes)
            .sum()
    }

    /// The lists eviction may shrink: every head of every layer without a window.
    pub fn evictable_heads(&self) -> impl Iterator<Item = &HeadKv> {
        self.layers
            .iter()
            .filter(|l| l.is_evictable())
            .flat_map(|l| &l.heads)
    }

    /// [`KvCache::evictable_heads`], mutably (for scores).
    pub fn evictable_heads_mut(&mut self) -> impl Iterator<Item = &mut HeadKv> {
        self.layers
            .iter_mut()
            .filter(|l| l.is_evictable())
            .flat_map(|l| &mut l.heads)
    }

    /// Bytes held by the layers eviction may shrink.
    pub fn evictable_bytes(&self) -> usize {
        self.evictable_heads().map(HeadKv::bytes).sum()
    }

    /// Bytes the cache would hold without eviction: what it holds, plus the pairs
    /// evicted from lists that would otherwise hold every token seen.
    pub fn full_bytes(&self) -> usize {
        let evicted: usize = self
            .evictable_heads()
            .map(|h| self.n_seen.saturating_sub(h.len()))
            .sum();
        self.bytes() + evicted * self.shape.entry_bytes()
    }

    /// Entries held in evictable lists.
    pub fn evictable_entries(&self) -> usize {
        self.evictable_heads().map(HeadKv::len).sum()
    }

    /// Release the spare capacity of evictable lists, so that after a compression
    /// the bytes held are the bytes used.
    pub fn shrink_to_fit(&mut self) {
        self.evictable_heads_mut().for_each(HeadKv::shrink_to_fit);
    }

    /// Remove (or, with [`EvictMode::Mask`], hide) entries of list (`il`, `h`) where
    /// `keep` is false. Sliding-window layers are never evicted. Removal keeps the
    /// list's capacity for what comes next; [`KvCache::shrink_to_fit`] and
    /// [`release_freed_memory`] give the memory back.
    pub fn evict(&mut self, il: usize, h: usize, keep: &[bool], mode: EvictMode) {
        let layer = &mut self.layers[il];
        assert!(
            layer.is_evictable(),
            "sliding-window layers are not evicted"
        );
        let head = &mut layer.heads[h];
        assert_eq!(keep.len(), head.len(), "one keep flag per entry");
        if keep.iter().all(|&k| k) {
            return;
        }
        match mode {
            EvictMode::Compact => head.compact(keep, self.shape.head_dim, self.shape.head_dim_v),
            EvictMode::Mask => head.mask(keep),
        }
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
            head.reserve(n, dk, dv);
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
                head.score.push(0.0);
                if !head.masked.is_empty() {
                    head.masked.push(false);
                }
            }
        }
    }
}

/// Give memory freed by eviction back to the operating system. glibc keeps freed
/// blocks below its (adaptive, up to 32 MiB) mmap threshold in its heaps, so without
/// this the process's resident size would not shrink after a compaction.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heaps; it takes no pointers from us
    // and is thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0);
    }
}
