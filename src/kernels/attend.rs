//! Attention of one query over f16 keys and values, key by key with an online
//! softmax, as llama.cpp decodes a token (`ggml_compute_forward_flash_attn_ext_f16`'s
//! one-query path): the score is ggml's f16 dot product (query rounded to f16), the
//! softmax weights come from `expf`, and the weighted values are accumulated in f16,
//! rounded after every key.
//!
//! The AVX2 path fuses a key's three steps (dot product, weight, accumulation) and
//! keeps the accumulator as f32 values that are always exactly f16 (so rounding
//! through F16C equals storing f16), instead of a call into ggml for the dot product
//! and two passes of f16 conversions per key. The portable path calls ggml's dot
//! product and the f16 helpers. Both perform the same float operations in the same
//! order, so their results are bit-identical to each other and to llama.cpp's
//! (tested below).
use half::f16;

use super::{dot_f16, f16_axpy, f16_scale};

/// The output of the query `q16` (rounded to f16) over keys `range` (`keys` and
/// `values` are rows of `q16.len()` and `out.len()` f16 values; `skip(j)` hides key
/// j), scores scaled by `kq_scale`, into `out`. `acc` is scratch of `out.len()` f16.
#[allow(clippy::too_many_arguments)]
pub fn attend_one(
    keys: &[f16],
    values: &[f16],
    range: std::ops::Range<usize>,
    q16: &[f16],
    kq_scale: f32,
    skip: impl Fn(usize) -> bool,
    acc: &mut [f16],
    out: &mut [f32],
) {
    let (dk, dv) = (q16.len(), out.len());
    assert!(keys.len() >= range.end * dk && values.len() >= range.end * dv);
    assert_eq!(acc.len(), dv, "scratch of the values' size");
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    if dk % 32 == 0 && dv % 32 == 0 {
        // SAFETY: the rows of keys and values in `range` are in bounds (asserted);
        // dk and dv are multiples of 32 as the kernel's steps need.
        unsafe { avx2::attend_one(keys, values, range, q16, kq_scale, skip, out) };
        return;
    }
    attend_one_portable(keys, values, range, q16, kq_scale, skip, acc, out);
}

/// [`attend_one`] through ggml's dot product and the f16 accumulator helpers, one
/// key at a time: llama.cpp's loop written with its own kernels.
#[allow(clippy::too_many_arguments)]
fn attend_one_portable(
    keys: &[f16],
    values: &[f16],
    range: std::ops::Range<usize>,
    q16: &[f16],
    kq_scale: f32,
    skip: impl Fn(usize) -> bool,
    acc: &mut [f16],
    out: &mut [f32],
) {
    let (dk, dv) = (q16.len(), acc.len());
    acc.fill(f16::ZERO);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for j in range {
        if skip(j) {
            continue;
        }
        let s = dot_f16(&keys[j * dk..(j + 1) * dk], q16) * kq_scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            ms = (m - s).exp();
            m = s;
            f16_scale(acc, ms);
        } else {
            vs = (s - m).exp();
        }
        f16_axpy(acc, &values[j * dv..(j + 1) * dv], vs);
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a.to_f32() * inv;
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Eight f16 at `p`, widened.
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable values at `p`.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    /// Round eight f32 to f16 and back (round to nearest even, as ggml stores).
    #[inline(always)]
    unsafe fn round_f16(x: __m256) -> __m256 {
        // SAFETY: register-only intrinsics.
        unsafe { _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x)) }
    }

    /// ggml's `ggml_vec_dot_f16` for n a multiple of 32: four accumulators of 8
    /// lanes over steps of 32, reduced (0+2, 1+3, then 0+1, halves, two hadds).
    #[inline(always)]
    unsafe fn dot_f16(k: *const f16, q: *const f16, n: usize) -> f32 {
        // SAFETY: the caller guarantees n readable values behind both pointers.
        unsafe {
            let mut sum = [_mm256_setzero_ps(); 4];
            for i in (0..n).step_by(32) {
                for (j, s) in sum.iter_mut().enumerate() {
                    let ax = load8(k.add(i + j * 8));
                    let ay = load8(q.add(i + j * 8));
                    *s = _mm256_fmadd_ps(ax, ay, *s);
                }
            }
            let a = _mm256_add_ps(sum[0], sum[2]);
            let b = _mm256_add_ps(sum[1], sum[3]);
            let x = _mm256_add_ps(a, b);
            let t0 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
            let t1 = _mm_hadd_ps(t0, t0);
            _mm_cvtss_f32(_mm_hadd_ps(t1, t1))
        }
    }

    /// See [`super::attend_one`]; dk and dv are multiples of 32. `out` serves as
    /// the accumulator until the end.
    pub(super) unsafe fn attend_one(
        keys: &[f16],
        values: &[f16],
        range: std::ops::Range<usize>,
        q16: &[f16],
        kq_scale: f32,
        skip: impl Fn(usize) -> bool,
        out: &mut [f32],
    ) {
        let (dk, dv) = (q16.len(), out.len());
        out.fill(0.0);
        let acc = out.as_mut_ptr();
        let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
        // SAFETY: the caller checked that rows `range` of keys and values are in
        // bounds; every vector access stays inside row j, the query, or `out`.
        unsafe {
            for j in range {
                if skip(j) {
                    continue;
                }
                let s = dot_f16(keys.as_ptr().add(j * dk), q16.as_ptr(), dk) * kq_scale;
                let (mut ms, mut vs) = (1f32, 1f32);
                if s > m {
                    ms = (m - s).exp();
                    m = s;
                    let msv = _mm256_set1_ps(ms);
                    for i in (0..dv).step_by(8) {
                        let a = _mm256_loadu_ps(acc.add(i));
                        _mm256_storeu_ps(acc.add(i), round_f16(_mm256_mul_ps(a, msv)));
                    }
                } else {
                    vs = (s - m).exp();
                }
                let vsv = _mm256_set1_ps(vs);
                let v = values.as_ptr().add(j * dv);
                for i in (0..dv).step_by(8) {
                    let a = _mm256_loadu_ps(acc.add(i));
                    let y = _mm256_fmadd_ps(load8(v.add(i)), vsv, a);
                    _mm256_storeu_ps(acc.add(i), round_f16(y));
                }
                sum = sum.mul_add(ms, vs);
            }
        }
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        out.iter_mut().for_each(|a| *a *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused kernel equals llama.cpp's loop written with ggml's kernels bit for
    /// bit, with hidden keys, for the head sizes of the reference models (64, 256)
    /// and one the fused kernel does not take (48).
    #[test]
    fn fused_kernel_matches_ggml_loop() {
        super::super::init();
        let rnd = |i: usize| ((i as f32 * 12.9898).sin() * 43758.547).fract() * 2.0 - 1.0;
        for (d, n) in [(64, 300), (256, 50), (48, 20)] {
            let keys: Vec<f16> = (0..n * d).map(|i| f16::from_f32(rnd(i) * 3.0)).collect();
            let values: Vec<f16> = (0..n * d).map(|i| f16::from_f32(rnd(i + 7))).collect();
            let q16: Vec<f16> = (0..d).map(|i| f16::from_f32(rnd(i + 99) * 2.0)).collect();
            let skip = |j: usize| j % 7 == 3;
            let mut acc = vec![f16::ZERO; d];
            let (mut want, mut got) = (vec![0f32; d], vec![0f32; d]);
            attend_one_portable(&keys, &values, 2..n, &q16, 0.125, skip, &mut acc, &mut want);
            attend_one(&keys, &values, 2..n, &q16, 0.125, skip, &mut acc, &mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "head size {d}");
            assert!(want.iter().any(|&x| x != 0.0));
        }
    }
}
