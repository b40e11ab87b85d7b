//! Eviction policies: how cached pairs are scored, and which of them are kept.
//!
//! A policy sees scores and shapes, never the model. Scores live next to the
//! entries ([`super::HeadKv::score`]); some are known when a token arrives
//! (streaming, random), some come from attention (H2O, SnapKV, KVzip: see
//! [`super::observe`]). [`select`] then keeps the best-scored fraction of the
//! candidates, over all lists at once or per layer or per list.
use std::fmt;
use std::str::FromStr;

use super::{KeyFilter, Probe, Reduce};

/// SnapKV's observation window: the last this many queries of the context.
pub const SNAPKV_WINDOW: usize = 32;
/// SnapKV's pooling kernel over neighbouring keys.
pub const SNAPKV_KERNEL: usize = 7;
/// StreamingLLM's attention sinks: the first tokens are always kept.
pub const SINK_TOKENS: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "unknown KV policy '{0}' (choose one of: full, streaming, h2o, snapkv, kvzip, gated, random)"
    )]
    UnknownPolicy(String),
    #[error("unknown KV selection level '{0}' (choose one of: auto, global, layer, head)")]
    UnknownLevel(String),
}

/// Which pairs an eviction keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// No eviction.
    #[default]
    Full,
    /// StreamingLLM: the first tokens and the most recent ones.
    Streaming,
    /// H2O: the pairs that have received the most attention so far.
    H2o,
    /// SnapKV: attention from the last 32 queries, max-pooled over 7 neighbours.
    SnapKv,
    /// KVzip: the most attention received while the model repeats the context.
    KvZip,
    /// Fast KVzip: learned gates predict KVzip's score from each layer's attention
    /// input as the token arrives (see [`crate::gate`]).
    Gated,
    /// Uniformly random scores: the floor any policy must beat.
    Random,
}

impl Policy {
    pub const ALL: [Policy; 7] = [
        Policy::Full,
        Policy::Streaming,
        Policy::H2o,
        Policy::SnapKv,
        Policy::KvZip,
        Policy::Gated,
        Policy::Random,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Full => "full",
            Policy::Streaming => "streaming",
            Policy::H2o => "h2o",
            Policy::SnapKv => "snapkv",
            Policy::KvZip => "kvzip",
            Policy::Gated => "gated",
            Policy::Random => "random",
        }
    }

    /// The selection level a policy uses unless told otherwise: SnapKV keeps a top-k
    /// per head, as its paper does; the gates and their teacher one global threshold,
    /// or one per layer where a model evicts few layers ([`Level::Auto`]); the others
    /// one global threshold.
    pub fn default_level(self) -> Level {
        match self {
            Policy::SnapKv => Level::Head,
            Policy::Gated | Policy::KvZip => Level::Auto,
            _ => Level::Global,
        }
    }

    /// Whether scores are known as tokens arrive, so that eviction can run during a
    /// chunked prefill and under a decode budget. KVzip needs the whole context
    /// first (its teacher repeats it).
    pub fn scores_incrementally(self) -> bool {
        !matches!(self, Policy::KvZip)
    }

    /// The attention to observe while running `n` tokens, if the policy scores by
    /// attention as tokens arrive: H2O every query, SnapKV the last 32.
    pub fn probe(self, n: usize) -> Option<Probe> {
        let first_row = match self {
            Policy::H2o => 0,
            Policy::SnapKv => n.saturating_sub(SNAPKV_WINDOW),
            _ => return None,
        };
        Some(Probe {
            first_row,
            reduce: Reduce::Sum,
            keys: KeyFilter::Visible,
        })
    }

    /// The score a new entry starts with: its position for streaming (recent first),
    /// a seeded random number for random, 0 for policies that observe attention and
    /// for the gates (which score a batch of tokens at a time).
    pub fn arrival_score(self, seed: u64, layer: usize, head: usize, pos: u32) -> f32 {
        match self {
            Policy::Streaming => pos as f32,
            Policy::Random => random_score(seed, layer, head, pos),
            _ => 0.0,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s.to_ascii_lowercase())
            .ok_or_else(|| PolicyError::UnknownPolicy(s.to_string()))
    }
}

/// Evictable layers below which [`Level::Auto`] selects per layer.
pub const AUTO_LAYER_BELOW: usize = 8;

/// Over which candidates one keep ratio is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// [`Level::Global`], or [`Level::Layer`] when the candidates come from fewer than
    /// [`AUTO_LAYER_BELOW`] layers. One threshold compares scores across layers, which
    /// needs them on one scale. Learned or attention scores shift from layer to layer
    /// with the text (on repetitive text a copying layer's scores fall), and with
    /// many layers the global threshold still finds the lists that matter; with a
    /// few (Gemma 3's three global layers) one layer's shift decides what the others
    /// keep: at 8k tokens one threshold left layer 17 none of its pairs.
    Auto,
    /// One threshold over all layers and heads: lists get non-uniform lengths.
    Global,
    /// One threshold per layer.
    Layer,
    /// The same fraction of every (layer, KV head) list.
    Head,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Auto, Level::Global, Level::Layer, Level::Head];

    pub fn name(self) -> &'static str {
        match self {
            Level::Auto => "auto",
            Level::Global => "global",
            Level::Layer => "layer",
            Level::Head => "head",
        }
    }
}

impl FromStr for Level {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Level::ALL
            .into_iter()
            .find(|l| l.name() == s.to_ascii_lowercase())
            .ok_or_else(|| PolicyError::UnknownLevel(s.to_string()))
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A pair that eviction may remove.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub layer: usize,
    pub head: usize,
    /// Index in its list.
    pub index: usize,
    pub pos: u32,
    pub score: f32,
}

/// Which candidates to keep: in every group (all candidates for [`Level::Global`],
/// one layer's, or one list's), the `keep` fraction with the highest scores, rounded
/// to the nearest count. Ties go to the more recent token. Returns one flag per
/// candidate.
pub fn select(cands: &[Candidate], keep: f64, level: Level) -> Vec<bool> {
    let level = match level {
        Level::Auto => {
            let mut layers: Vec<usize> = cands.iter().map(|c| c.layer).collect();
            layers.sort_unstable();
            layers.dedup();
            if layers.len() < AUTO_LAYER_BELOW {
                Level::Layer
            } else {
                Level::Global
            }
        }
        l => l,
    };
    let group = |c: &Candidate| match level {
        Level::Global | Level::Auto => (0, 0),
        Level::Layer => (c.layer, 0),
        Level::Head => (c.layer, c.head),
    };
    let mut order: Vec<usize> = (0..cands.len()).collect();
    // Group by group, best first within each group.
    order.sort_by(|&a, &b| {
        let (ca, cb) = (&cands[a], &cands[b]);
        group(ca)
            .cmp(&group(cb))
            .then(cb.score.total_cmp(&ca.score))
            .then(cb.pos.cmp(&ca.pos))
    });
    let mut flags = vec![false; cands.len()];
    for members in order.chunk_by(|&a, &b| group(&cands[a]) == group(&cands[b])) {
        let n_keep = (keep.clamp(0.0, 1.0) * members.len() as f64).round() as usize;
        for &i in &members[..n_keep] {
            flags[i] = true;
        }
    }
    flags
}

/// SnapKV's pooling: every score becomes the largest within `kernel / 2` entries on
/// either side, so that the neighbours of an attended key are kept with it.
pub fn max_pool(scores: &mut [f32], kernel: usize) {
    let r = kernel / 2;
    let src = scores.to_vec();
    for (j, s) in scores.iter_mut().enumerate() {
        let (a, b) = (j.saturating_sub(r), (j + r + 1).min(src.len()));
        *s = src[a..b].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    }
}

/// A uniform number in [0, 1) from the seed and the pair's coordinates (splitmix64),
/// so that the random policy is reproducible.
pub fn random_score(seed: u64, layer: usize, head: usize, pos: u32) -> f32 {
    let mut z = seed
        ^ (layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (head as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (pos as u64).wrapping_mul(0x1656_67B1_9E37_79F9);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(layer: usize, head: usize, index: usize, score: f32) -> Candidate {
        Candidate {
            layer,
            head,
            index,
            pos: index as u32,
            score,
        }
    }

    #[test]
    fn names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
        }
        assert!(matches!(
            "lru".parse::<Policy>(),
            Err(PolicyError::UnknownPolicy(_))
        ));
        assert_eq!("Head".parse::<Level>(), Ok(Level::Head));
        assert!("row".parse::<Level>().is_err());
    }

    #[test]
    fn global_threshold_gives_non_uniform_lists() {
        // Head 0 holds the high scores, head 1 the low ones.
        let mut cands = Vec::new();
        for j in 0..10 {
            cands.push(cand(0, 0, j, 1.0 + j as f32));
            cands.push(cand(0, 1, j, 0.01 * j as f32));
        }
        let keep = select(&cands, 0.5, Level::Global);
        let kept = |h: usize| {
            cands
                .iter()
                .zip(&keep)
                .filter(|(c, &k)| c.head == h && k)
                .count()
        };
        assert_eq!((kept(0), kept(1)), (10, 0));
        // Per head, each list keeps half: its five best.
        let keep = select(&cands, 0.5, Level::Head);
        assert_eq!(keep.iter().filter(|&&k| k).count(), 10);
        for (c, &k) in cands.iter().zip(&keep) {
            assert_eq!(k, c.index >= 5, "{c:?}");
        }
    }

    #[test]
    fn layer_level_applies_the_ratio_per_layer() {
        let mut cands = Vec::new();
        for j in 0..8 {
            cands.push(cand(0, 0, j, 10.0 + j as f32));
            cands.push(cand(1, 0, j, j as f32));
            cands.push(cand(1, 1, j, 100.0 + j as f32));
        }
        let keep = select(&cands, 0.25, Level::Layer);
        let kept = |l: usize, h: usize| {
            cands
                .iter()
                .zip(&keep)
                .filter(|(c, &k)| c.layer == l && c.head == h && k)
                .count()
        };
        // Layer 0 keeps 2 of 8; layer 1 keeps 4 of 16, all from its better head.
        assert_eq!((kept(0, 0), kept(1, 0), kept(1, 1)), (2, 0, 4));
    }

    #[test]
    fn auto_level_is_per_layer_for_few_layers() {
        // Layer 0 holds the high scores: one threshold would empty layer 1.
        let few: Vec<Candidate> = (0..3)
            .flat_map(|l| (0..10).map(move |j| cand(l, 0, j, (10 - l) as f32 + j as f32 * 0.01)))
            .collect();
        assert_eq!(
            select(&few, 0.3, Level::Auto),
            select(&few, 0.3, Level::Layer)
        );
        assert_ne!(
            select(&few, 0.3, Level::Auto),
            select(&few, 0.3, Level::Global)
        );
        let many: Vec<Candidate> = (0..AUTO_LAYER_BELOW)
            .flat_map(|l| (0..10).map(move |j| cand(l, 0, j, (10 - l) as f32 + j as f32 * 0.01)))
            .collect();
        assert_eq!(
            select(&many, 0.3, Level::Auto),
            select(&many, 0.3, Level::Global)
        );
        assert_eq!("auto".parse::<Level>(), Ok(Level::Auto));
    }

    #[test]
    fn ties_keep_recent_tokens() {
        let cands: Vec<Candidate> = (0..6).map(|j| cand(0, 0, j, 1.0)).collect();
        let keep = select(&cands, 0.5, Level::Global);
        assert_eq!(keep, [false, false, false, true, true, true]);
    }

    #[test]
    fn max_pool_spreads_peaks_over_the_kernel() {
        let mut s = vec![0.0; 12];
        s[5] = 1.0;
        s[11] = 0.5;
        max_pool(&mut s, SNAPKV_KERNEL);
        let want = [0., 0., 1., 1., 1., 1., 1., 1., 1., 0.5, 0.5, 0.5];
        assert_eq!(s, want);
    }

    #[test]
    fn probes_and_arrival_scores() {
        assert_eq!(Policy::H2o.probe(100).unwrap().first_row, 0);
        assert_eq!(Policy::SnapKv.probe(100).unwrap().first_row, 68);
        assert_eq!(Policy::SnapKv.probe(10).unwrap().first_row, 0);
        assert!(Policy::Streaming.probe(100).is_none());
        assert!(
            Policy::Streaming.arrival_score(0, 0, 0, 9)
                > Policy::Streaming.arrival_score(0, 0, 0, 8)
        );
        let r: Vec<f32> = (0..1000).map(|p| random_score(7, 1, 2, p)).collect();
        assert!(r.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = r.iter().sum::<f32>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        assert_eq!(random_score(7, 1, 2, 3), random_score(7, 1, 2, 3));
        assert_ne!(random_score(7, 1, 2, 3), random_score(8, 1, 2, 3));
    }
}
