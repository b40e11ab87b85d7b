//! Saving a (compressed) context to a file and reading it back, so that a document
//! compressed once can be questioned again later without running it again.
//!
//! Layout (little-endian): magic `FASTKVCX`, format version (u32), the model's
//! fingerprint (u64), the cache shape, the tokens the context holds, the eviction
//! bookkeeping, then every (layer, KV head) list: length, mask flag, positions,
//! scores, keys, values (f16 bits) and mask. An xxh3-64 checksum of everything
//! before it ends the file. Keys and values are stored exactly, so a restored
//! context gives bit-identical logits.
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use half::f16;
use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

use super::{HeadKv, KvCache, KvShape, LayerKv};

const MAGIC: &[u8; 8] = b"FASTKVCX";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ContextFileError {
    #[error("cannot access context file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a fastkv context file")]
    NotAContext(PathBuf),
    #[error("{path} has format version {found}; this fastkv reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{0} was saved with a different model (its fingerprint does not match)")]
    ModelMismatch(PathBuf),
    #[error("{0} is corrupt (checksum mismatch): save the context again")]
    Corrupt(PathBuf),
    #[error("{path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
}

/// Everything needed to continue a conversation: the tokens it holds, the cache,
/// and where prefill eviction stopped judging.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedContext {
    pub tokens: Vec<u32>,
    pub cache: KvCache,
    /// Positions below this have been judged by prefill eviction.
    pub judged_below: u32,
}

/// A writer that hashes what passes through it.
struct Hashing<W: Write> {
    inner: W,
    hash: Xxh3Default,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl SavedContext {
    /// Write `tokens`, `cache` and `judged_below` to `path` (replacing it), stamped
    /// with the model's fingerprint. Streams to disk: nothing is copied in memory.
    pub fn save(
        path: &Path,
        fingerprint: u64,
        tokens: &[u32],
        cache: &KvCache,
        judged_below: u32,
    ) -> Result<(), ContextFileError> {
        let io_err = |source| ContextFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        // A crash or a second save to the same path never leaves a torn file.
        crate::durable::write_with(path, |file| {
            let mut w = Hashing {
                inner: BufWriter::new(file),
                hash: Xxh3Default::new(),
            };
            write_body(&mut w, fingerprint, tokens, cache, judged_below)?;
            let sum = w.hash.digest();
            let mut inner = w.inner;
            inner.write_all(&sum.to_le_bytes())?;
            inner.flush()
        })
        .map_err(io_err)
    }

    /// Read a context saved by [`SavedContext::save`] for the model with this
    /// fingerprint and cache shape.
    pub fn load(path: &Path, fingerprint: u64, shape: &KvShape) -> Result<Self, ContextFileError> {
        let bytes = std::fs::read(path).map_err(|source| ContextFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let p = || path.to_path_buf();
        if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(ContextFileError::NotAContext(p()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(ContextFileError::Version {
                path: p(),
                found: version,
            });
        }
        if bytes.len() < 28 {
            return Err(ContextFileError::Corrupt(p()));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if xxh3_64(body) != u64::from_le_bytes(sum.try_into().expect("8 bytes")) {
            return Err(ContextFileError::Corrupt(p()));
        }
        let mut r = Reader {
            buf: body,
            at: 12,
            path,
        };
        if r.u64()? != fingerprint {
            return Err(ContextFileError::ModelMismatch(p()));
        }
        let dims = [r.u64()?, r.u64()?, r.u64()?, r.u64()?];
        let want = [
            shape.n_layer,
            shape.n_head_kv,
            shape.head_dim,
            shape.head_dim_v,
        ];
        let windows: Vec<Option<usize>> = (0..dims[0].min(4096))
            .map(|_| r.u64().map(|w| (w > 0).then_some(w as usize)))
            .collect::<Result<_, _>>()?;
        if dims.iter().zip(want).any(|(&a, b)| a != b as u64) || windows != shape.windows {
            return Err(ContextFileError::ModelMismatch(p()));
        }
        let n_seen = r.u64()? as usize;
        let judged_below = r.u32()?;
        let n_tokens = r.count(4)?;
        let tokens: Vec<u32> = (0..n_tokens).map(|_| r.u32()).collect::<Result<_, _>>()?;
        let mut cache = KvCache::new(shape.clone());
        let (dk, dv) = (shape.head_dim, shape.head_dim_v);
        for layer in &mut cache.layers {
            for head in &mut layer.heads {
                *head = r.head(dk, dv)?;
            }
        }
        if r.at != body.len() {
            return Err(r.malformed("trailing bytes"));
        }
        if tokens_len_mismatch(&cache, n_seen, &tokens) {
            return Err(r.malformed("token count and cache disagree"));
        }
        if judged_below as usize > n_seen {
            return Err(r.malformed("eviction progress beyond the tokens held"));
        }
        cache.n_seen = n_seen;
        Ok(SavedContext {
            tokens,
            cache,
            judged_below,
        })
    }
}

fn write_body(
    w: &mut impl Write,
    fingerprint: u64,
    tokens: &[u32],
    cache: &KvCache,
    judged_below: u32,
) -> io::Result<()> {
    let s = &cache.shape;
    w.write_all(MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    w.write_all(&fingerprint.to_le_bytes())?;
    for x in [s.n_layer, s.n_head_kv, s.head_dim, s.head_dim_v] {
        w.write_all(&(x as u64).to_le_bytes())?;
    }
    for win in &s.windows {
        w.write_all(&(win.unwrap_or(0) as u64).to_le_bytes())?;
    }
    w.write_all(&(cache.n_seen() as u64).to_le_bytes())?;
    w.write_all(&judged_below.to_le_bytes())?;
    w.write_all(&(tokens.len() as u64).to_le_bytes())?;
    for t in tokens {
        w.write_all(&t.to_le_bytes())?;
    }
    for h in cache.layers.iter().flat_map(|l| &l.heads) {
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&[u8::from(!h.masked.is_empty())])?;
        for p in &h.pos {
            w.write_all(&p.to_le_bytes())?;
        }
        for x in &h.score {
            w.write_all(&x.to_le_bytes())?;
        }
        for x in h.k.iter().chain(&h.v) {
            w.write_all(&x.to_bits().to_le_bytes())?;
        }
        let mask: Vec<u8> = h.masked.iter().map(|&m| u8::from(m)).collect();
        w.write_all(&mask)?;
    }
    Ok(())
}

/// A saved context must hold one token per position seen, and no position beyond.
/// Positions in every list strictly increase and stay below `n_seen`.
fn tokens_len_mismatch(cache: &KvCache, n_seen: usize, tokens: &[u32]) -> bool {
    tokens.len() != n_seen
        || cache
            .layers
            .iter()
            .flat_map(|l: &LayerKv| &l.heads)
            .any(|h| {
                h.pos.last().is_some_and(|&p| p as usize >= n_seen)
                    || h.pos.windows(2).any(|w| w[0] >= w[1])
            })
}

/// Reads the body of a context file, with bounds checks.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn malformed(&self, what: &str) -> ContextFileError {
        ContextFileError::Malformed {
            path: self.path.to_path_buf(),
            what: what.to_string(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&[u8], ContextFileError> {
        if self.buf.len() - self.at < n {
            return Err(self.malformed("truncated"));
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, ContextFileError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, ContextFileError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    /// A count of items of `item_bytes` each, checked against the bytes left.
    fn count(&mut self, item_bytes: usize) -> Result<usize, ContextFileError> {
        let n = self.u64()?;
        if n > ((self.buf.len() - self.at) / item_bytes.max(1)) as u64 {
            return Err(self.malformed("a length runs past the end of the file"));
        }
        Ok(n as usize)
    }
    fn head(&mut self, dk: usize, dv: usize) -> Result<HeadKv, ContextFileError> {
        let n = self.count(8 + 2 * (dk + dv))?;
        let has_mask = self.take(1)?[0] != 0;
        let u32s = |b: &[u8]| -> Vec<u32> {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        };
        let f16s = |b: &[u8]| -> Vec<f16> {
            b.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect()
        };
        let pos = u32s(self.take(4 * n)?);
        let score = u32s(self.take(4 * n)?)
            .into_iter()
            .map(f32::from_bits)
            .collect();
        let k = f16s(self.take(2 * n * dk)?);
        let v = f16s(self.take(2 * n * dv)?);
        let masked = if has_mask {
            self.take(n)?.iter().map(|&b| b != 0).collect()
        } else {
            Vec::new()
        };
        Ok(HeadKv {
            k,
            v,
            pos,
            score,
            masked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            n_layer: 2,
            n_head_kv: 2,
            head_dim: 4,
            head_dim_v: 4,
            windows: vec![Some(8), None],
        }
    }

    fn context() -> SavedContext {
        let mut cache = KvCache::new(shape());
        let n = 6;
        let k: Vec<f32> = (0..n * 2 * 4).map(|i| i as f32 * 0.37 - 3.0).collect();
        let v: Vec<f32> = (0..n * 2 * 4).map(|i| 1.0 / (i as f32 + 1.0)).collect();
        for il in 0..2 {
            cache.append(il, n, &k, &v);
        }
        cache.advance(n);
        cache.layers[1].heads[0].score = vec![0.5, 0.1, 0.9, 0.2, 0.3, 0.4];
        cache.evict(
            1,
            0,
            &[true, false, true, true, false, true],
            super::super::EvictMode::Compact,
        );
        SavedContext {
            tokens: vec![1, 2, 3, 4, 5, 6],
            cache,
            judged_below: 4,
        }
    }

    fn save(path: &Path, fingerprint: u64, c: &SavedContext) {
        SavedContext::save(path, fingerprint, &c.tokens, &c.cache, c.judged_below).unwrap();
    }

    #[test]
    fn round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctx.fkv");
        let ctx = context();
        save(&path, 42, &ctx);
        let back = SavedContext::load(&path, 42, &shape()).unwrap();
        assert_eq!(back, ctx);
    }

    /// Saves racing to one path (two sessions saving the same file) all succeed, the
    /// file is one of them whole, and no temporary file is left behind.
    #[test]
    fn concurrent_saves_to_one_path_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctx.fkv");
        let base = context();
        let versions: Vec<SavedContext> = (0..4u32)
            .map(|t| {
                let mut c = base.clone();
                c.tokens[0] = 100 + t;
                c
            })
            .collect();
        std::thread::scope(|s| {
            for c in &versions {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..50 {
                        SavedContext::save(path, 42, &c.tokens, &c.cache, c.judged_below).unwrap();
                    }
                });
            }
        });
        let back = SavedContext::load(&path, 42, &shape()).unwrap();
        assert!(versions.contains(&back));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ctx.fkv"]);
    }

    #[test]
    fn mismatches_and_corruption_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctx.fkv");
        save(&path, 42, &context());
        assert!(matches!(
            SavedContext::load(&path, 43, &shape()),
            Err(ContextFileError::ModelMismatch(_))
        ));
        let mut other = shape();
        other.head_dim = 8;
        assert!(matches!(
            SavedContext::load(&path, 42, &other),
            Err(ContextFileError::ModelMismatch(_))
        ));
        let good = std::fs::read(&path).unwrap();
        for at in [20, good.len() / 2, good.len() - 3] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert!(matches!(
                SavedContext::load(&path, 42, &shape()),
                Err(ContextFileError::Corrupt(_))
            ));
        }
        std::fs::write(&path, &good[..good.len() - 20]).unwrap();
        assert!(SavedContext::load(&path, 42, &shape()).is_err());
        std::fs::write(&path, b"GGUF\x03\0\0\0 and more bytes here").unwrap();
        assert!(matches!(
            SavedContext::load(&path, 42, &shape()),
            Err(ContextFileError::NotAContext(_))
        ));
        let mut v2 = good.clone();
        v2[8] = 2;
        std::fs::write(&path, &v2).unwrap();
        assert!(matches!(
            SavedContext::load(&path, 42, &shape()),
            Err(ContextFileError::Version { found: 2, .. })
        ));
        // Edited bodies with a recomputed checksum are caught by validation.
        let restamp = |mut body: Vec<u8>| {
            let n = body.len();
            let sum = xxh3_64(&body[..n - 8]);
            body[n - 8..].copy_from_slice(&sum.to_le_bytes());
            std::fs::write(&path, &body).unwrap();
            SavedContext::load(&path, 42, &shape())
        };
        // judged_below (after magic, version, fingerprint, 4 dims, 2 windows, n_seen).
        let judged_at = 8 + 4 + 8 + 4 * 8 + 2 * 8 + 8;
        let mut b = good.clone();
        b[judged_at..judged_at + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            restamp(b),
            Err(ContextFileError::Malformed { .. })
        ));
        // The first position of the first list, made equal to the second.
        let tokens_end = judged_at + 4 + 8 + 6 * 4;
        let pos_at = tokens_end + 8 + 1;
        let mut b = good.clone();
        b[pos_at..pos_at + 4].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            restamp(b),
            Err(ContextFileError::Malformed { .. })
        ));
        // A list length far beyond the file.
        let mut b = good.clone();
        b[tokens_end..tokens_end + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            restamp(b),
            Err(ContextFileError::Malformed { .. })
        ));
        assert!(restamp(good.clone()).is_ok());

        let missing = dir.path().join("missing.fkv");
        assert!(matches!(
            SavedContext::load(&missing, 42, &shape()),
            Err(ContextFileError::Io { .. })
        ));
    }
}
