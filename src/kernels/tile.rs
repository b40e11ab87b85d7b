//! Register-tiled dot products for the weight types that dominate the reference
//! models (Q4_1 against Q8_1 activations, Q5_0 and Q8_0 against Q8_0, Q4_K and Q6_K
//! against Q8_K), with AVX2.
//!
//! ggml's `vec_dot` computes one output per call: every call unpacks its weight
//! row's nibbles, loads the activation row and reduces. A tile computes `R` weight
//! rows against `T` activation rows in one pass over the blocks, so each weight block
//! is unpacked once for `T` tokens and each activation block loaded once for `R`
//! rows; the per-call overhead goes too. Decode (`T = 1`) reads weights closer to
//! memory speed, prefill does far less work per product.
//!
//! Every output is computed with exactly the float operations of ggml's AVX2
//! `vec_dot` for the type, in the same order (the integer parts are exact): the
//! results are bit-identical to ggml's, and so to llama.cpp's (tested below against
//! the kernels themselves). Other types, or builds without AVX2/FMA/F16C, use
//! ggml's `vec_dot` unchanged.
use super::GgmlType;

/// Rows (weights) and columns (tokens) of a tile while several tokens remain, and
/// rows of a tile for a single token (decode).
pub(super) const R: usize = 2;
pub(super) const T: usize = 4;
pub(super) const R_ONE: usize = 4;

/// The tiled kernel for a weight type and number of tokens, if there is one in this
/// build that beats ggml's. With one token a Q5_0 tile shares nothing but the
/// activation load, and ggml's row-by-row order streams from memory as fast, so
/// Q5_0 is tiled only for batches.
pub(super) fn kernel_for(ty: GgmlType, n_tokens: usize) -> Option<Kind> {
    if !cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )) {
        return None;
    }
    match ty {
        GgmlType::Q4_1 => Some(Kind::Q4_1),
        GgmlType::Q8_0 => Some(Kind::Q8_0),
        GgmlType::Q5_0 if n_tokens > 1 => Some(Kind::Q5_0),
        GgmlType::Q4_K if n_tokens > 1 => Some(Kind::Q4_K),
        GgmlType::Q6_K if n_tokens > 1 => Some(Kind::Q6_K),
        _ => None,
    }
}

/// Whether single tokens take this kind's weight rows one at a time: a Q8_0 row
/// has nothing to unpack that several tokens could share, and one row after the
/// other streams from memory best (measured against 4-row tiles); the kernel still
/// beats ggml's by prefetching and by having the activation scales in f32.
pub(super) fn one_row_at_a_time(kind: Kind) -> bool {
    kind == Kind::Q8_0
}

/// The weight types with a tiled kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)] // ggml's type names
pub(super) enum Kind {
    Q4_1,
    Q8_0,
    Q5_0,
    Q4_K,
    Q6_K,
}

impl Kind {
    /// Weights per block (and per activation block).
    pub(super) fn block_len(self) -> usize {
        match self {
            Kind::Q4_1 | Kind::Q8_0 | Kind::Q5_0 => 32,
            Kind::Q4_K | Kind::Q6_K => 256,
        }
    }
}

/// Scales of the activation blocks as f32, computed once per product: for Q8_1,
/// `(d, s)` per block; for Q8_0, `d` per block. The kernels then convert only the
/// weights' scales.
pub(super) fn activation_scales(kind: Kind, xq: &[u8]) -> Vec<f32> {
    let (bytes, per) = match kind {
        Kind::Q4_1 => (36, 2),
        Kind::Q8_0 | Kind::Q5_0 => (34, 1),
        // Q8_K's d is an f32 already: the kernels read it in place.
        Kind::Q4_K | Kind::Q6_K => return Vec::new(),
    };
    assert_eq!(xq.len() % bytes, 0, "activation rows are whole blocks");
    let mut scales = Vec::with_capacity(xq.len() / bytes * per);
    for b in xq.chunks_exact(bytes) {
        for i in 0..per {
            scales.push(half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32());
        }
    }
    scales
}

/// `out[r][t] = dot(w[r], x[t])` for `RR` (at most 4) weight rows and `TT`
/// activation rows of `blocks` blocks each, in the formats of `kind` (Q4_1 weights
/// with Q8_1 activations, Q5_0 or Q8_0 with Q8_0, Q4_K or Q6_K with Q8_K); `xs[t]`
/// points to token t's [`activation_scales`] (unused for Q8_K).
///
/// # Safety
/// Every pointer must address a whole row of `blocks` blocks in its format, and the
/// scales of that many blocks, valid for reads.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub(super) unsafe fn dot_tile<const RR: usize, const TT: usize>(
    kind: Kind,
    w: [*const u8; RR],
    x: [*const u8; TT],
    xs: [*const f32; TT],
    blocks: usize,
) -> [[f32; TT]; RR] {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        match kind {
            Kind::Q4_1 => avx2::q4_1_q8_1::<RR, TT>(w, x, xs, blocks),
            Kind::Q8_0 => avx2::signed_q8_0::<RR, TT, avx2::Q8_0>(w, x, xs, blocks),
            Kind::Q5_0 => avx2::signed_q8_0::<RR, TT, avx2::Q5_0>(w, x, xs, blocks),
            Kind::Q4_K => avx2::q4_k_q8_k::<RR, TT>(w, x, blocks),
            Kind::Q6_K => avx2::q6_k_q8_k::<RR, TT>(w, x, blocks),
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
pub(super) unsafe fn dot_tile<const RR: usize, const TT: usize>(
    _kind: Kind,
    _w: [*const u8; RR],
    _x: [*const u8; TT],
    _xs: [*const f32; TT],
    _blocks: usize,
) -> [[f32; TT]; RR] {
    unreachable!("kernel_for returns None in builds without AVX2")
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx2 {
    use std::arch::x86_64::*;

    /// Bytes of a Q4_1 block (f16 d, f16 m, 16 bytes of nibbles), a Q8_1 block (f16
    /// d, f16 s = d * sum(q), 32 i8) and a Q8_0 block (f16 d, 32 i8).
    const Q4_1_BYTES: usize = 20;
    const Q8_1_BYTES: usize = 36;
    const Q8_0_BYTES: usize = 34;
    /// How far ahead of the current block the weight rows are prefetched.
    const PREFETCH: usize = 512;

    /// The 32-bit word at `p` (unaligned).
    #[inline(always)]
    unsafe fn word_at(p: *const u8) -> i32 {
        // SAFETY: the caller guarantees four readable bytes at `p`.
        unsafe { p.cast::<i32>().read_unaligned() }
    }

    /// ggml's `hsum_float_8`: (hi + lo), then the upper pair onto the lower, then
    /// lane 1 onto lane 0.
    #[inline(always)]
    unsafe fn hsum_float_8(x: __m256) -> f32 {
        // SAFETY: register-only intrinsics, available under this module's cfg.
        unsafe {
            let mut res = _mm256_extractf128_ps(x, 1);
            res = _mm_add_ps(res, _mm256_castps256_ps128(x));
            res = _mm_add_ps(res, _mm_movehl_ps(res, res));
            res = _mm_add_ss(res, _mm_movehdup_ps(res));
            _mm_cvtss_f32(res)
        }
    }

    /// Lane `i` of `v`.
    #[inline(always)]
    unsafe fn lane(v: __m256, i: usize) -> f32 {
        // SAFETY: register-only intrinsics.
        unsafe {
            _mm_cvtss_f32(_mm256_castps256_ps128(_mm256_permutevar8x32_ps(
                v,
                _mm256_set1_epi32(i as i32),
            )))
        }
    }

    /// ggml's `mul_sum_us8_pairs_float`: unsigned x signed bytes, pairwise sums
    /// twice, as floats.
    #[inline(always)]
    unsafe fn mul_sum_us8_pairs_float(ax: __m256i, sy: __m256i) -> __m256 {
        // SAFETY: register-only intrinsics.
        unsafe {
            let dot = _mm256_maddubs_epi16(ax, sy);
            _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
        }
    }

    /// ggml's `ggml_vec_dot_q4_1_q8_1` (AVX2), for a tile of rows and tokens.
    ///
    /// Per block: `summs += m * s`, `acc = fma(d0 * d1, float(sum of nibble x q8
    /// products), acc)`; at the end `hsum(acc) + summs`. The scales of the (up to 4)
    /// rows are converted together: lanes 2r and 2r + 1 hold row r's d and m, and
    /// products with the token's d and s stay in those lanes (a product of two f16
    /// values is exact in f32, so `summs`'s update equals ggml's either way).
    #[inline(always)]
    pub(super) unsafe fn q4_1_q8_1<const RR: usize, const TT: usize>(
        w: [*const u8; RR],
        x: [*const u8; TT],
        xs: [*const f32; TT],
        nb: usize,
    ) -> [[f32; TT]; RR] {
        const { assert!(RR <= 4, "the scales of at most 4 rows fit one vector") };
        // SAFETY: the caller guarantees `nb` readable blocks and scales behind every
        // pointer; the rest are register-only intrinsics.
        unsafe {
            let low = _mm256_set1_epi8(0xF);
            let mut acc = [[_mm256_setzero_ps(); TT]; RR];
            let mut summs = [_mm256_setzero_ps(); TT];
            for ib in 0..nb {
                let mut words = [0i32; 4];
                let mut qx = [_mm256_setzero_si256(); RR];
                for r in 0..RR {
                    let b = w[r].add(ib * Q4_1_BYTES);
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH).cast());
                    words[r] = word_at(b);
                    let tmp = _mm_loadu_si128(b.add(4).cast());
                    let bytes = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
                    qx[r] = _mm256_and_si256(low, bytes);
                }
                let dm = _mm256_cvtph_ps(_mm_set_epi32(words[3], words[2], words[1], words[0]));
                for t in 0..TT {
                    let d1 = *xs[t].add(2 * ib);
                    let s1 = *xs[t].add(2 * ib + 1);
                    let qy = _mm256_loadu_si256(x[t].add(ib * Q8_1_BYTES + 4).cast());
                    summs[t] = _mm256_fmadd_ps(dm, _mm256_set1_ps(s1), summs[t]);
                    let dd = _mm256_mul_ps(dm, _mm256_set1_ps(d1));
                    for r in 0..RR {
                        let d = _mm256_permutevar8x32_ps(dd, _mm256_set1_epi32(2 * r as i32));
                        let xy = mul_sum_us8_pairs_float(qx[r], qy);
                        acc[r][t] = _mm256_fmadd_ps(d, xy, acc[r][t]);
                    }
                }
            }
            let mut out = [[0f32; TT]; RR];
            for r in 0..RR {
                for t in 0..TT {
                    out[r][t] = hsum_float_8(acc[r][t]) + lane(summs[t], 2 * r + 1);
                }
            }
            out
        }
    }

    /// A block format whose 32 weights unpack to signed bytes, after an f16 scale
    /// (a type, not a function pointer, so that the unpacking is inlined).
    pub(super) trait SignedBlock {
        const BYTES: usize;
        /// The block's 32 weights as signed bytes.
        ///
        /// # Safety
        /// `b` must address a whole block.
        unsafe fn unpack(b: *const u8) -> __m256i;
    }

    /// Q8_0: f16 d, 32 i8.
    pub(super) struct Q8_0;

    impl SignedBlock for Q8_0 {
        const BYTES: usize = Q8_0_BYTES;
        #[inline(always)]
        unsafe fn unpack(b: *const u8) -> __m256i {
            // SAFETY: the caller guarantees a whole block at `b`.
            unsafe { _mm256_loadu_si256(b.add(2).cast()) }
        }
    }

    /// Q5_0: f16 d, 32 high bits, 16 bytes of low nibbles. The weights come out in
    /// -16..=15 as ggml's AVX2 code unpacks them: the nibble, with 0xF0 or-ed in
    /// where the high bit is clear.
    pub(super) struct Q5_0;

    impl SignedBlock for Q5_0 {
        const BYTES: usize = 22;
        #[inline(always)]
        unsafe fn unpack(b: *const u8) -> __m256i {
            // SAFETY: the caller guarantees a whole block at `b`; the rest are
            // register-only intrinsics.
            unsafe {
                let qh = b.add(2).cast::<i32>().read_unaligned();
                let tmp = _mm_loadu_si128(b.add(6).cast());
                let low = _mm256_and_si256(
                    _mm256_set1_epi8(0xF),
                    _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp),
                );
                // Byte i of the 32 gets bit i of qh (ggml's `bytes_from_bits_32`).
                let shuf = _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0,
                );
                let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh), shuf);
                let bits = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
                let high = _mm256_cmpeq_epi8(bits, _mm256_set1_epi64x(-1));
                _mm256_or_si256(
                    low,
                    _mm256_andnot_si256(high, _mm256_set1_epi8(0xF0u8 as i8)),
                )
            }
        }
    }

    /// ggml's `ggml_vec_dot_q8_0_q8_0` and `ggml_vec_dot_q5_0_q8_0` (AVX2), for a
    /// tile of rows and tokens of `B` blocks (f16 d, then weights that unpack to
    /// signed bytes);
    /// `acc = fma(d0 * d1, float(sum of q x q products), acc)`, then `hsum(acc)`.
    /// Lane r of the converted scales is row r's d.
    #[inline(always)]
    pub(super) unsafe fn signed_q8_0<const RR: usize, const TT: usize, B: SignedBlock>(
        w: [*const u8; RR],
        x: [*const u8; TT],
        xs: [*const f32; TT],
        nb: usize,
    ) -> [[f32; TT]; RR] {
        const { assert!(RR <= 4, "the scales of at most 4 rows fit one vector") };
        // SAFETY: as in `q4_1_q8_1`.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); TT]; RR];
            for ib in 0..nb {
                let mut halves = [0i16; 4];
                let mut qx = [_mm256_setzero_si256(); RR];
                let mut ax = [_mm256_setzero_si256(); RR];
                for r in 0..RR {
                    let b = w[r].add(ib * B::BYTES);
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH).cast());
                    halves[r] = b.cast::<i16>().read_unaligned();
                    qx[r] = B::unpack(b);
                    ax[r] = _mm256_sign_epi8(qx[r], qx[r]);
                }
                let d0 = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_set_epi16(
                    0, 0, 0, 0, halves[3], halves[2], halves[1], halves[0],
                )));
                for t in 0..TT {
                    let d1 = *xs[t].add(ib);
                    let qy = _mm256_loadu_si256(x[t].add(ib * Q8_0_BYTES + 2).cast());
                    let dd = _mm256_mul_ps(d0, _mm256_set1_ps(d1));
                    for r in 0..RR {
                        let d = _mm256_permutevar8x32_ps(dd, _mm256_set1_epi32(r as i32));
                        let sy = _mm256_sign_epi8(qy, qx[r]);
                        let q = mul_sum_us8_pairs_float(ax[r], sy);
                        acc[r][t] = _mm256_fmadd_ps(d, q, acc[r][t]);
                    }
                }
            }
            let mut out = [[0f32; TT]; RR];
            for r in 0..RR {
                for t in 0..TT {
                    out[r][t] = hsum_float_8(acc[r][t]);
                }
            }
            out
        }
    }

    /// Bytes of a Q4_K block (f16 d, f16 dmin, 12 bytes of 6-bit scales and mins,
    /// 128 bytes of nibbles), a Q6_K block (128 bytes of low nibbles, 64 of high
    /// bit pairs, 16 i8 scales, f16 d) and a Q8_K block (f32 d, 256 i8, 16 i16 sums
    /// of 16).
    const Q4_K_BYTES: usize = 144;
    const Q6_K_BYTES: usize = 210;
    const Q8_K_BYTES: usize = 292;
    const Q8_K_QS: usize = 4;
    const Q8_K_BSUMS: usize = 260;

    /// ggml's `get_scale_shuffle_k4(i)`: the i16 scale i repeated 16 times.
    #[inline(always)]
    unsafe fn scale_shuffle_k4(i: usize) -> __m256i {
        // SAFETY: register-only intrinsics.
        unsafe { _mm256_set1_epi16((((2 * i + 1) << 8) | (2 * i)) as i16) }
    }

    /// ggml's `get_scale_shuffle(i)`: bytes 2i (8 times), then 2i + 1 (8 times).
    #[inline(always)]
    unsafe fn scale_shuffle(i: usize) -> __m128i {
        // SAFETY: register-only intrinsics.
        unsafe {
            let (a, b) = (
                (2 * i) as i64 * 0x0101010101010101,
                (2 * i + 1) as i64 * 0x0101010101010101,
            );
            _mm_set_epi64x(b, a)
        }
    }

    /// The integer part of a K-quant product, shared by the two kernels below: for
    /// each of the block's 8 groups of 32 weights, `weights(r, k)` gives row r's
    /// unsigned weights and i16 scales of group k; every token's sum gains
    /// `madd(scales, maddubs(weights, q8))`, lane for lane as ggml's loop (its sums
    /// are exact integers, so grouping them differently changes nothing).
    #[inline(always)]
    unsafe fn k_sums<const RR: usize, const TT: usize>(
        y: [*const u8; TT],
        mut weights: impl FnMut(usize, usize) -> (__m256i, __m256i),
    ) -> [[__m256i; TT]; RR] {
        // SAFETY: the caller guarantees a whole Q8_K block behind every `y[t]`.
        unsafe {
            let mut sumi = [[_mm256_setzero_si256(); TT]; RR];
            for k in 0..8 {
                let wk: [(__m256i, __m256i); RR] = std::array::from_fn(|r| weights(r, k));
                for t in 0..TT {
                    let q8 = _mm256_loadu_si256(y[t].add(Q8_K_QS + 32 * k).cast());
                    for r in 0..RR {
                        let p16 = _mm256_madd_epi16(wk[r].1, _mm256_maddubs_epi16(wk[r].0, q8));
                        sumi[r][t] = _mm256_add_epi32(sumi[r][t], p16);
                    }
                }
            }
            sumi
        }
    }

    /// ggml's `ggml_vec_dot_q4_K_q8_K` (AVX2), for a tile of rows and tokens.
    ///
    /// Per block: `acc_m = fma(-dy * dmin, float(mins . bsum pairs), acc_m)` (4
    /// lanes) and `acc = fma(dy * d, float(sum of scaled nibble x q8 products), acc)`;
    /// at the end `hsum(acc)` plus `acc_m` reduced as ggml reduces it.
    #[inline(always)]
    pub(super) unsafe fn q4_k_q8_k<const RR: usize, const TT: usize>(
        w: [*const u8; RR],
        x: [*const u8; TT],
        nb: usize,
    ) -> [[f32; TT]; RR] {
        const { assert!(RR <= 4, "the scales of at most 4 rows fit one vector") };
        // SAFETY: the caller guarantees `nb` readable blocks behind every pointer;
        // the rest are register-only intrinsics.
        unsafe {
            let low = _mm256_set1_epi8(0xF);
            let mut acc = [[_mm256_setzero_ps(); TT]; RR];
            let mut acc_m = [[_mm_setzero_ps(); TT]; RR];
            for ib in 0..nb {
                let b: [*const u8; RR] = std::array::from_fn(|r| w[r].add(ib * Q4_K_BYTES));
                let y: [*const u8; TT] = std::array::from_fn(|t| x[t].add(ib * Q8_K_BYTES));
                let mut words = [0i32; 4];
                let mut scales = [_mm256_setzero_si256(); RR];
                let mut mins = [_mm_setzero_si128(); RR];
                for r in 0..RR {
                    _mm_prefetch::<_MM_HINT_T0>(b[r].wrapping_add(PREFETCH).cast());
                    words[r] = word_at(b[r]);
                    // The 6-bit scales and mins, unpacked as ggml does (`utmp`).
                    let u0 = word_at(b[r].add(4)) as u32;
                    let u1 = word_at(b[r].add(8)) as u32;
                    let u2 = word_at(b[r].add(12)) as u32;
                    let (m1, m2, m3) = (0x3f3f3f3fu32, 0x0f0f0f0fu32, 0x03030303u32);
                    let t3 = ((u2 >> 4) & m2) | (((u1 >> 6) & m3) << 4);
                    let t1 = (u2 & m2) | (((u0 >> 6) & m3) << 4);
                    let t2 = u1 & m1;
                    let t0 = u0 & m1;
                    let ms = _mm256_cvtepu8_epi16(_mm_set_epi32(
                        t3 as i32, t2 as i32, t1 as i32, t0 as i32,
                    ));
                    let sc = _mm256_castsi256_si128(ms);
                    scales[r] = _mm256_set_m128i(sc, sc);
                    mins[r] = _mm256_extracti128_si256(ms, 1);
                }
                // Lanes 2r and 2r + 1: row r's d and dmin.
                let dm = _mm256_cvtph_ps(_mm_set_epi32(words[3], words[2], words[1], words[0]));
                let mut dy = [0f32; TT];
                for t in 0..TT {
                    dy[t] = y[t].cast::<f32>().read_unaligned();
                    let q8sums = _mm256_loadu_si256(y[t].add(Q8_K_BSUMS).cast());
                    let q8s = _mm_hadd_epi16(
                        _mm256_castsi256_si128(q8sums),
                        _mm256_extracti128_si256(q8sums, 1),
                    );
                    for r in 0..RR {
                        let dmin = -dy[t] * lane(dm, 2 * r + 1);
                        let prod = _mm_madd_epi16(mins[r], q8s);
                        acc_m[r][t] =
                            _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r][t]);
                    }
                }
                let sumi = k_sums::<RR, TT>(y, |r, k| {
                    let bits = _mm256_loadu_si256(b[r].add(16 + 32 * (k / 2)).cast());
                    let q = _mm256_and_si256(
                        if k % 2 == 0 {
                            bits
                        } else {
                            _mm256_srli_epi16(bits, 4)
                        },
                        low,
                    );
                    (q, _mm256_shuffle_epi8(scales[r], scale_shuffle_k4(k)))
                });
                for r in 0..RR {
                    for t in 0..TT {
                        let d = dy[t] * lane(dm, 2 * r);
                        acc[r][t] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d),
                            _mm256_cvtepi32_ps(sumi[r][t]),
                            acc[r][t],
                        );
                    }
                }
            }
            let mut out = [[0f32; TT]; RR];
            for r in 0..RR {
                for t in 0..TT {
                    let mut m = acc_m[r][t];
                    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
                    m = _mm_add_ss(m, _mm_movehdup_ps(m));
                    out[r][t] = hsum_float_8(acc[r][t]) + _mm_cvtss_f32(m);
                }
            }
            out
        }
    }

    /// ggml's `ggml_vec_dot_q6_K_q8_K` (AVX2), for a tile of rows and tokens.
    ///
    /// Per block: the integer sum of scaled 6-bit x q8 products less 32 x the
    /// scaled bsums, then `acc = fma(dy * d, float(that), acc)`; at the end
    /// `hsum(acc)`.
    #[inline(always)]
    pub(super) unsafe fn q6_k_q8_k<const RR: usize, const TT: usize>(
        w: [*const u8; RR],
        x: [*const u8; TT],
        nb: usize,
    ) -> [[f32; TT]; RR] {
        const { assert!(RR <= 8, "the scales of at most 8 rows fit one vector") };
        // SAFETY: as in `q4_k_q8_k`.
        unsafe {
            let m3 = _mm256_set1_epi8(3);
            let m15 = _mm256_set1_epi8(15);
            let mut acc = [[_mm256_setzero_ps(); TT]; RR];
            for ib in 0..nb {
                let b: [*const u8; RR] = std::array::from_fn(|r| w[r].add(ib * Q6_K_BYTES));
                let y: [*const u8; TT] = std::array::from_fn(|t| x[t].add(ib * Q8_K_BYTES));
                let mut halves = [0i16; 8];
                let mut scales = [_mm_setzero_si128(); RR];
                for r in 0..RR {
                    _mm_prefetch::<_MM_HINT_T0>(b[r].wrapping_add(PREFETCH).cast());
                    halves[r] = b[r].add(208).cast::<i16>().read_unaligned();
                    scales[r] = _mm_loadu_si128(b[r].add(192).cast());
                }
                let d16 = _mm256_cvtph_ps(_mm_loadu_si128(halves.as_ptr().cast()));
                let mut sumi = k_sums::<RR, TT>(y, |r, k| {
                    let (j, part) = (k / 4, k % 4);
                    let ql = b[r].add(64 * j + 32 * (part % 2));
                    let lowbits = _mm256_loadu_si256(ql.cast());
                    let lo = if part < 2 {
                        _mm256_and_si256(lowbits, m15)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(lowbits, 4), m15)
                    };
                    let hb = _mm256_loadu_si256(b[r].add(128 + 32 * j).cast());
                    let hi = match part {
                        0 => _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4),
                        1 => _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(12)), 2),
                        2 => _mm256_and_si256(hb, _mm256_set1_epi8(48)),
                        _ => _mm256_srli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(-64)), 2),
                    };
                    let sc = _mm_shuffle_epi8(scales[r], scale_shuffle(4 * j + part));
                    (_mm256_or_si256(lo, hi), _mm256_cvtepi8_epi16(sc))
                });
                for t in 0..TT {
                    let dy = y[t].cast::<f32>().read_unaligned();
                    let q8sums = _mm256_loadu_si256(y[t].add(Q8_K_BSUMS).cast());
                    for r in 0..RR {
                        let sub = _mm256_slli_epi32(
                            _mm256_madd_epi16(q8sums, _mm256_cvtepi8_epi16(scales[r])),
                            5,
                        );
                        sumi[r][t] = _mm256_sub_epi32(sumi[r][t], sub);
                        let d = dy * lane(d16, r);
                        acc[r][t] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d),
                            _mm256_cvtepi32_ps(sumi[r][t]),
                            acc[r][t],
                        );
                    }
                }
            }
            let mut out = [[0f32; TT]; RR];
            for r in 0..RR {
                for t in 0..TT {
                    out[r][t] = hsum_float_8(acc[r][t]);
                }
            }
            out
        }
    }
}
