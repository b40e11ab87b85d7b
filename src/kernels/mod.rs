//! The math: quantized matrix products driven by ggml's per-type CPU kernels, and the
//! small f32 operations of a decoder (RMSNorm, RoPE, softmax, activations).
//!
//! Matrix products follow llama.cpp's CPU recipe exactly: the activations are
//! converted once to the weight type's `vec_dot_type` (e.g. Q8_0 for Q4_0, Q8_K for
//! K-quants) with ggml's `from_float`, then every output element is one call of
//! ggml's `vec_dot`, or, for the types that dominate the reference models, one lane
//! of a register tile ([`tile`]) that performs that call's float operations in its
//! order. Each output element is computed once, in one fixed order, so results do
//! not depend on the number of threads.
mod attend;
mod flash;
mod gemm;
mod ops;
mod tile;
mod types;

pub use attend::attend_one;
pub use flash::{tile_accumulate, tile_accumulate2, tile_scores, TILE};
pub use gemm::{gemm, Mat};
pub use ops::*;
pub use types::GgmlType;

use rayon::prelude::*;

/// A weight matrix in any ggml type, borrowed (typically from the memory map):
/// `rows` rows of `cols` values, each row `ty.row_bytes(cols)` bytes.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Wrap raw bytes; errors if the size does not match the shape.
    pub fn new(ty: GgmlType, cols: usize, rows: usize, data: &'a [u8]) -> Option<Self> {
        (cols.is_multiple_of(ty.block_size()) && ty.row_bytes(cols) * rows == data.len()).then_some(
            Self {
                ty,
                rows,
                cols,
                data,
            },
        )
    }

    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantize row `r` into `out` (len `cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.ty.to_f32(self.row(r), out);
    }
}

/// Activations (n rows of `cols` f32 values) together with their conversions to the
/// `vec_dot_type`s of the weights they meet, made once and reused: the same input
/// feeds Q, K and V (and gate and up), which share a dot type.
pub struct Activations<'a> {
    x: &'a [f32],
    n: usize,
    cols: usize,
    converted: Vec<(GgmlType, Vec<u8>)>,
}

impl<'a> Activations<'a> {
    pub fn new(x: &'a [f32], n: usize, cols: usize) -> Self {
        assert_eq!(x.len(), n * cols, "activation shape mismatch");
        Self {
            x,
            n,
            cols,
            converted: Vec::new(),
        }
    }

    /// Convert the activations to `ty` unless that was done already.
    fn convert(&mut self, ty: GgmlType) {
        if ty == GgmlType::F32 || self.converted.iter().any(|(t, _)| *t == ty) {
            return;
        }
        let rb = ty.row_bytes(self.cols);
        let mut buf = vec![0u8; rb * self.n];
        let cols = self.cols;
        buf.par_chunks_mut(rb)
            .zip(self.x.par_chunks(cols))
            .for_each(|(dst, src)| ty.from_f32(src, dst));
        self.converted.push((ty, buf));
    }

    /// The activations as rows of `ty` (after [`Activations::convert`]).
    fn as_type(&self, ty: GgmlType) -> &[u8] {
        if ty == GgmlType::F32 {
            return bytes_of(self.x);
        }
        let (_, buf) = self
            .converted
            .iter()
            .find(|(t, _)| *t == ty)
            .expect("activations converted before use");
        buf
    }
}

/// View f32s as bytes (for the f32 `vec_dot`, which takes untyped pointers).
fn bytes_of(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is
    // exact and the lifetime is tied to `x`.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

/// A raw output pointer shared by rayon tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint indices (see `matmul`), so sharing is race-free.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not field access) so closures capture the whole `Send` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[t * w.rows + r] = dot(w.row(r), x.row(t))` for every token `t` and weight row
/// `r`, i.e. `out = x · wᵀ`, in parallel over blocks of weight rows (each block is
/// read once from memory and used for every token while it is in cache). Types with
/// a register-tiled kernel ([`tile`]) compute several rows and tokens per pass; the
/// others call ggml's `vec_dot` once per output. Either way each output is one
/// computation in ggml's arithmetic, whatever the thread count.
pub fn matmul(w: &QMatrix, x: &mut Activations, out: &mut [f32]) {
    matmuls(&mut [(*w, out)], x);
}

/// Several products of the same activations (Q, K and V; gate and up), as
/// [`matmul`] computes each, in one parallel pass: one hand-off to the threads
/// instead of one per matrix, which counts when decoding a token is hundreds of
/// small products.
pub fn matmuls(products: &mut [(QMatrix, &mut [f32])], x: &mut Activations) {
    let n = x.n;
    for (w, out) in products.iter() {
        assert_eq!(w.cols, x.cols, "matmul: inner dimensions differ");
        assert_eq!(out.len(), n * w.rows, "matmul: output has the wrong size");
        x.convert(w.ty.vec_dot_type());
    }
    let x = &*x;
    struct Job<'a> {
        w: QMatrix<'a>,
        xq: &'a [u8],
        kind: Option<tile::Kind>,
        scales: Vec<f32>,
        out: OutPtr,
        block: usize,
    }
    let jobs: Vec<Job> = products
        .iter_mut()
        .map(|(w, out)| {
            let xq = x.as_type(w.ty.vec_dot_type());
            let kind = tile::kernel_for(w.ty, n);
            Job {
                w: *w,
                xq,
                kind,
                scales: kind.map_or(Vec::new(), |k| tile::activation_scales(k, xq)),
                out: OutPtr(out.as_mut_ptr()),
                block: row_block(w.rows, n),
            }
        })
        .collect();
    let tasks: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(i, j)| (0..j.w.rows.div_ceil(j.block)).map(move |b| (i, b)))
        .collect();
    tasks.into_par_iter().for_each(|(i, b)| {
        let job = &jobs[i];
        let (rows, out) = (job.w.rows, job.out);
        let r0 = b * job.block;
        let r1 = (r0 + job.block).min(rows);
        // SAFETY: every (t, r) with r in this task's row block is written by this
        // task only (blocks of one matrix are disjoint, and each matrix has its own
        // output), inside that output (checked above: its length is n * rows).
        let store = |t: usize, r: usize, v: f32| unsafe { *out.get().add(t * rows + r) = v };
        match job.kind {
            Some(kind) => tiled_rows(kind, &job.w, job.xq, &job.scales, n, r0..r1, store),
            None => vec_dot_rows(&job.w, job.xq, n, r0..r1, store),
        }
    });
}

/// Rows `rows` of `w` against every token, one ggml `vec_dot` per output.
fn vec_dot_rows(
    w: &QMatrix,
    xq: &[u8],
    n: usize,
    rows: std::ops::Range<usize>,
    store: impl Fn(usize, usize, f32),
) {
    let vec_dot = w.ty.vec_dot();
    let wrb = w.row_bytes();
    let xrb = xq.len() / n;
    for t in 0..n {
        let xt = &xq[t * xrb..(t + 1) * xrb];
        for r in rows.clone() {
            let wr = &w.data[r * wrb..(r + 1) * wrb];
            let mut s = 0f32;
            // SAFETY: `wr` and `xt` are full rows of `cols` values in the types
            // `vec_dot` expects (w.ty and its vec_dot_type); `s` is one float.
            unsafe {
                vec_dot(
                    w.cols as i32,
                    &mut s,
                    0,
                    wr.as_ptr().cast(),
                    0,
                    xt.as_ptr().cast(),
                    0,
                    1,
                )
            };
            store(t, r, s);
        }
    }
}

/// Rows `rows` of `w` against every token with the tiled kernel: tiles of
/// `tile::R` rows x `tile::T` tokens while `tile::T` tokens remain, then the rest
/// one token at a time in tiles of `tile::R_ONE` rows (or one, see
/// [`tile::one_row_at_a_time`]). `scales` are the activations'
/// [`tile::activation_scales`].
fn tiled_rows(
    kind: tile::Kind,
    w: &QMatrix,
    xq: &[u8],
    scales: &[f32],
    n: usize,
    rows: std::ops::Range<usize>,
    store: impl Fn(usize, usize, f32) + Copy,
) {
    let x = TileInput {
        kind,
        w,
        xq,
        scales,
        n,
    };
    let batched = n / tile::T * tile::T;
    x.pass::<{ tile::R }, { tile::T }>(0..batched, rows.clone(), store);
    if tile::one_row_at_a_time(kind) {
        x.pass::<1, 1>(batched..n, rows, store);
    } else {
        x.pass::<{ tile::R_ONE }, 1>(batched..n, rows, store);
    }
}

/// What every tile of one product reads.
struct TileInput<'a> {
    kind: tile::Kind,
    w: &'a QMatrix<'a>,
    xq: &'a [u8],
    scales: &'a [f32],
    n: usize,
}

impl TileInput<'_> {
    /// Tokens `tokens` (a multiple of `TT` of them) against rows `rows`, in tiles
    /// of `RR x TT` and single rows at the end of the range.
    fn pass<const RR: usize, const TT: usize>(
        &self,
        tokens: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
        store: impl Fn(usize, usize, f32),
    ) {
        let blocks = self.w.cols / self.kind.block_len();
        let (wrb, xrb) = (self.w.row_bytes(), self.xq.len() / self.n);
        let per_token = self.scales.len() / self.n;
        let scales_of = |t: usize| self.scales[t * per_token..(t + 1) * per_token].as_ptr();
        let w_row = |r: usize| self.w.data[r * wrb..(r + 1) * wrb].as_ptr();
        for t in tokens.step_by(TT) {
            let xp: [*const u8; TT] =
                std::array::from_fn(|j| self.xq[(t + j) * xrb..(t + j + 1) * xrb].as_ptr());
            let xs: [*const f32; TT] = std::array::from_fn(|j| scales_of(t + j));
            let mut r = rows.start;
            while r < rows.end {
                // SAFETY: every pointer is the start of a whole row (of `w`, or of
                // the activations converted to the dot type, with their scales),
                // `w.cols` values long; the slicing above checked the bounds.
                if r + RR <= rows.end {
                    let wp: [*const u8; RR] = std::array::from_fn(|i| w_row(r + i));
                    let v = unsafe { tile::dot_tile::<RR, TT>(self.kind, wp, xp, xs, blocks) };
                    for (i, vr) in v.iter().enumerate() {
                        for (j, &vv) in vr.iter().enumerate() {
                            store(t + j, r + i, vv);
                        }
                    }
                    r += RR;
                } else {
                    let v =
                        unsafe { tile::dot_tile::<1, TT>(self.kind, [w_row(r)], xp, xs, blocks) };
                    for (j, &vv) in v[0].iter().enumerate() {
                        store(t + j, r, vv);
                    }
                    r += 1;
                }
            }
        }
    }
}

/// How many weight rows one task handles: enough tasks to balance the threads, few
/// enough that dispatch stays cheap, and small enough that the block stays in cache
/// while all tokens pass over it.
fn row_block(rows: usize, n_tokens: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = rows.div_ceil(threads * 4);
    let by_cache = if n_tokens > 1 { 64 } else { usize::MAX };
    by_threads.min(by_cache).max(16)
}

/// Dot product of two f16 vectors with ggml's own kernel (f32 accumulation in its
/// SIMD order), as llama.cpp's single-token attention computes its scores.
pub fn dot_f16(a: &[half::f16], b: &[half::f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f16: lengths differ");
    let vec_dot = GgmlType::F16.vec_dot();
    let mut s = 0f32;
    // SAFETY: both slices hold a.len() f16 values (ggml_fp16_t is a u16 of the same
    // layout as half::f16); `s` is one float.
    unsafe {
        vec_dot(
            a.len() as i32,
            &mut s,
            0,
            a.as_ptr().cast(),
            0,
            b.as_ptr().cast(),
            0,
            1,
        )
    };
    s
}

/// Make sure ggml's CPU backend tables (f16 conversion, GELU) are initialised.
pub fn init() {
    types::init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every weight type the reference models use: the quantized product equals the
    /// product of the dequantized weights with the activations (up to the activation
    /// quantization), and is the same with 1 and 2 threads.
    #[test]
    fn matmul_matches_dequantized_reference_for_each_type() {
        init();
        let (cols, rows, n) = (256, 24, 3);
        let w = pseudo_random(cols * rows, 1);
        let x = pseudo_random(cols * n, 2);
        let types = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ];
        for ty in types {
            let rb = ty.row_bytes(cols);
            let mut data = vec![0u8; rb * rows];
            for (r, dst) in data.chunks_exact_mut(rb).enumerate() {
                ty.from_f32(&w[r * cols..(r + 1) * cols], dst);
            }
            let m = QMatrix::new(ty, cols, rows, &data).expect("shape");
            let mut out = vec![0f32; n * rows];
            matmul(&m, &mut Activations::new(&x, n, cols), &mut out);
            let mut deq = vec![0f32; cols];
            let mut worst = 0f32;
            for r in 0..rows {
                m.dequantize_row(r, &mut deq);
                for t in 0..n {
                    let want: f32 = deq.iter().zip(&x[t * cols..]).map(|(a, b)| a * b).sum();
                    worst = worst.max((out[t * rows + r] - want).abs());
                }
            }
            // Activations meet quantized weights as 8-bit values and f16 weights as f16.
            let tol = match ty {
                GgmlType::F32 => 1e-4,
                GgmlType::F16 => 1e-2,
                _ => 0.15,
            };
            assert!(worst < tol, "{ty}: worst error {worst}");

            let single = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let mut out1 = vec![0f32; n * rows];
            single.install(|| matmul(&m, &mut Activations::new(&x, n, cols), &mut out1));
            assert_eq!(out, out1, "{ty}: result depends on the thread count");
        }
    }

    /// The tiled kernels give exactly ggml's `vec_dot` results (same float operations
    /// in the same order), for every tile shape and edge: full tiles, a lone row, a
    /// lone token, and with one and two threads.
    #[test]
    fn tiled_products_are_bit_identical_to_ggml() {
        init();
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            assert!(tile::kernel_for(ty, 2).is_some() || !cfg!(target_feature = "avx2"));
            let cols = if ty.block_size() == 256 { 768 } else { 320 };
            for (rows, n) in [(13, 1), (13, 2), (21, 5), (64, 7), (4, 3)] {
                let w = pseudo_random(cols * rows, rows as u32);
                let x: Vec<f32> = pseudo_random(cols * n, 7 + n as u32)
                    .iter()
                    .map(|v| v * 3.0)
                    .collect();
                let rb = ty.row_bytes(cols);
                let mut data = vec![0u8; rb * rows];
                for (r, dst) in data.chunks_exact_mut(rb).enumerate() {
                    ty.from_f32(&w[r * cols..(r + 1) * cols], dst);
                }
                let m = QMatrix::new(ty, cols, rows, &data).expect("shape");
                let mut acts = Activations::new(&x, n, cols);
                acts.convert(ty.vec_dot_type());
                let xq = acts.as_type(ty.vec_dot_type());
                let want = std::cell::RefCell::new(vec![0f32; n * rows]);
                vec_dot_rows(&m, xq, n, 0..rows, |t, r, v| {
                    want.borrow_mut()[t * rows + r] = v
                });
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut got = vec![0f32; n * rows];
                    pool.install(|| matmul(&m, &mut Activations::new(&x, n, cols), &mut got));
                    let want = want.borrow();
                    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{ty} {rows}x{n}, {threads} threads, output {i}: {g} vs ggml {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn type_sizes_come_from_ggml() {
        assert_eq!(GgmlType::Q4_0.block_size(), 32);
        assert_eq!(GgmlType::Q4_0.type_size(), 18);
        assert_eq!(GgmlType::Q4_K.row_bytes(256), 144);
        assert_eq!(GgmlType::Q4_1.vec_dot_type().name(), "q8_1");
        assert_eq!(GgmlType::Q4_K.vec_dot_type().name(), "q8_K");
        assert_eq!(GgmlType::F16.name(), "f16");
        assert!(GgmlType::from_id(4).is_none(), "removed type Q4_2");
        assert!(GgmlType::from_id(10_000).is_none());
        assert!(QMatrix::new(GgmlType::Q4_0, 31, 1, &[0; 18]).is_none());
    }
}
