//! The two products of tiled attention over a tile of [`TILE`] keys, for a block of
//! queries: the scores (queries times the tile's keys) and the weighted sum of the
//! tile's values. Each output is computed with the float operations of llama.cpp's
//! CPU flash attention in their order (a score is a chain of fused multiply-adds
//! over the head dimension from 0; a value sum adds one key after the other with a
//! fused multiply-add), so the results are bit-identical to the plain loops that
//! [`tile_scores_portable`] and [`tile_accumulate_portable`] spell out.
//!
//! The AVX2 path keeps its accumulators in registers: two queries by 32 keys for
//! the scores (the key row of a dimension is loaded once for both queries), 64
//! output values for the sums. The plain loops, which the compiler cannot keep in
//! registers, load and store an accumulator for every multiply-add.

/// Keys per tile (llama.cpp's CPU flash attention uses 64 as well).
pub const TILE: usize = 64;

/// Scores of the queries `qs` (each `dk` values) against a tile of keys stored
/// transposed in `kt` (`kt[d * TILE + c]` is dimension d of key c): `s[i * TILE + c]`
/// is the dot product of query i and key c, accumulated over d = 0, 1, ... with one
/// fused multiply-add each, starting from 0. Every key column is computed, whether
/// or not the query may see it.
pub fn tile_scores(qs: &[&[f32]], kt: &[f32], dk: usize, s: &mut [f32]) {
    assert!(kt.len() >= dk * TILE && s.len() >= qs.len() * TILE);
    assert!(qs.iter().all(|q| q.len() == dk));
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        // SAFETY: kt holds dk rows of TILE values and s holds TILE values per query
        // (asserted); every query has dk values.
        unsafe { avx2::tile_scores(qs, kt, dk, s) };
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    tile_scores_portable(qs, kt, dk, s);
}

/// [`tile_scores`] as plain loops (where AVX2 is missing, and the tests' reference).
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn tile_scores_portable(qs: &[&[f32]], kt: &[f32], dk: usize, s: &mut [f32]) {
    for (q, row) in qs.iter().zip(s.chunks_exact_mut(TILE)) {
        row.fill(0.0);
        for (d, &qd) in q.iter().enumerate().take(dk) {
            for (x, &k) in row.iter_mut().zip(&kt[d * TILE..(d + 1) * TILE]) {
                *x = qd.mul_add(k, *x);
            }
        }
    }
}

/// `o[x] = w[c] * v[c][x] + o[x]` (one fused multiply-add) for c = 0, 1, ... in
/// order: the weights `w` of a tile's keys applied to their values `vt` (rows of
/// `o.len()` values).
pub fn tile_accumulate(o: &mut [f32], w: &[f32], vt: &[f32]) {
    let dv = o.len();
    assert!(vt.len() >= w.len() * dv);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if dv.is_multiple_of(64) {
        // SAFETY: vt holds w.len() rows of dv values (asserted) and dv is a multiple
        // of 64, the kernel's step.
        unsafe { avx2::tile_accumulate(o, w, vt) };
        return;
    }
    tile_accumulate_portable(o, w, vt);
}

/// [`tile_accumulate`] for two queries with weights over the same keys: the value
/// rows are read once for both. Each output is computed exactly as alone.
pub fn tile_accumulate2(o0: &mut [f32], o1: &mut [f32], w0: &[f32], w1: &[f32], vt: &[f32]) {
    let dv = o0.len();
    assert!(o1.len() == dv && w0.len() == w1.len() && vt.len() >= w0.len() * dv);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if dv.is_multiple_of(32) {
        // SAFETY: vt holds w0.len() rows of dv values, both outputs hold dv values
        // (asserted) and dv is a multiple of 32, the kernel's step.
        unsafe { avx2::tile_accumulate2(o0, o1, w0, w1, vt) };
        return;
    }
    tile_accumulate_portable(o0, w0, vt);
    tile_accumulate_portable(o1, w1, vt);
}

/// [`tile_accumulate`] as plain loops.
fn tile_accumulate_portable(o: &mut [f32], w: &[f32], vt: &[f32]) {
    let dv = o.len();
    for (c, &wc) in w.iter().enumerate() {
        for (y, &x) in o.iter_mut().zip(&vt[c * dv..(c + 1) * dv]) {
            *y = wc.mul_add(x, *y);
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use std::arch::x86_64::*;

    use super::TILE;

    /// See [`super::tile_scores`]; the caller checks the sizes.
    pub(super) unsafe fn tile_scores(qs: &[&[f32]], kt: &[f32], dk: usize, s: &mut [f32]) {
        let kt = kt.as_ptr();
        let mut i = 0;
        while i < qs.len() {
            let pair = i + 1 < qs.len();
            let (q0, q1) = (qs[i].as_ptr(), qs[if pair { i + 1 } else { i }].as_ptr());
            for half in [0, 32] {
                let mut a = [_mm256_setzero_ps(); 8];
                for d in 0..dk {
                    // SAFETY (all loads): d < dk, so q0 + d and q1 + d are in their
                    // queries, and row d of kt holds TILE >= half + 32 values.
                    let k = kt.add(d * TILE + half);
                    let (k0, k1, k2, k3) = (
                        _mm256_loadu_ps(k),
                        _mm256_loadu_ps(k.add(8)),
                        _mm256_loadu_ps(k.add(16)),
                        _mm256_loadu_ps(k.add(24)),
                    );
                    let b0 = _mm256_broadcast_ss(&*q0.add(d));
                    let b1 = _mm256_broadcast_ss(&*q1.add(d));
                    a[0] = _mm256_fmadd_ps(b0, k0, a[0]);
                    a[1] = _mm256_fmadd_ps(b0, k1, a[1]);
                    a[2] = _mm256_fmadd_ps(b0, k2, a[2]);
                    a[3] = _mm256_fmadd_ps(b0, k3, a[3]);
                    a[4] = _mm256_fmadd_ps(b1, k0, a[4]);
                    a[5] = _mm256_fmadd_ps(b1, k1, a[5]);
                    a[6] = _mm256_fmadd_ps(b1, k2, a[6]);
                    a[7] = _mm256_fmadd_ps(b1, k3, a[7]);
                }
                // SAFETY: rows i and (when paired) i + 1 of s hold TILE values.
                let r0 = s.as_mut_ptr().add(i * TILE + half);
                for (j, v) in a[..4].iter().enumerate() {
                    _mm256_storeu_ps(r0.add(8 * j), *v);
                }
                if pair {
                    let r1 = r0.add(TILE);
                    for (j, v) in a[4..].iter().enumerate() {
                        _mm256_storeu_ps(r1.add(8 * j), *v);
                    }
                }
            }
            i += 2;
        }
    }

    /// See [`super::tile_accumulate`]; the caller checks the sizes and that
    /// `o.len()` is a multiple of 64.
    pub(super) unsafe fn tile_accumulate(o: &mut [f32], w: &[f32], vt: &[f32]) {
        let dv = o.len();
        let (op, vp) = (o.as_mut_ptr(), vt.as_ptr());
        for x0 in (0..dv).step_by(64) {
            // SAFETY (all loads and stores): x0 + 64 <= dv, and row c < w.len() of
            // vt holds dv values.
            let mut a: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(op.add(x0 + 8 * j)));
            for (c, &wc) in w.iter().enumerate() {
                let b = _mm256_set1_ps(wc);
                let v = vp.add(c * dv + x0);
                for (j, acc) in a.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(b, _mm256_loadu_ps(v.add(8 * j)), *acc);
                }
            }
            for (j, acc) in a.iter().enumerate() {
                _mm256_storeu_ps(op.add(x0 + 8 * j), *acc);
            }
        }
    }

    /// See [`super::tile_accumulate2`]; the caller checks the sizes and that the
    /// outputs' length is a multiple of 32.
    pub(super) unsafe fn tile_accumulate2(
        o0: &mut [f32],
        o1: &mut [f32],
        w0: &[f32],
        w1: &[f32],
        vt: &[f32],
    ) {
        let dv = o0.len();
        let (p0, p1, vp) = (o0.as_mut_ptr(), o1.as_mut_ptr(), vt.as_ptr());
        for x0 in (0..dv).step_by(32) {
            // SAFETY (all loads and stores): x0 + 32 <= dv, and row c < w0.len() of
            // vt holds dv values.
            let mut a: [__m256; 8] = std::array::from_fn(|j| {
                let p = if j < 4 { p0 } else { p1 };
                _mm256_loadu_ps(p.add(x0 + 8 * (j % 4)))
            });
            for (c, (&wa, &wb)) in w0.iter().zip(w1).enumerate() {
                let (b0, b1) = (_mm256_set1_ps(wa), _mm256_set1_ps(wb));
                let v = vp.add(c * dv + x0);
                let vs = [
                    _mm256_loadu_ps(v),
                    _mm256_loadu_ps(v.add(8)),
                    _mm256_loadu_ps(v.add(16)),
                    _mm256_loadu_ps(v.add(24)),
                ];
                for j in 0..4 {
                    a[j] = _mm256_fmadd_ps(b0, vs[j], a[j]);
                    a[4 + j] = _mm256_fmadd_ps(b1, vs[j], a[4 + j]);
                }
            }
            for (j, acc) in a.iter().enumerate() {
                let p = if j < 4 { p0 } else { p1 };
                _mm256_storeu_ps(p.add(x0 + 8 * (j % 4)), *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(i: usize) -> f32 {
        ((i as f32 * 12.9898).sin() * 43758.547).fract() * 2.0 - 1.0
    }

    /// The fast kernels give bit for bit what the plain loops give, for even and
    /// odd query counts and the head sizes of the reference models.
    #[test]
    fn kernels_equal_the_plain_loops() {
        for (dk, nq) in [(64, 6), (256, 5), (128, 1)] {
            let kt: Vec<f32> = (0..dk * TILE).map(rnd).collect();
            let q: Vec<f32> = (0..nq * dk).map(|i| rnd(i + 7)).collect();
            let qs: Vec<&[f32]> = q.chunks(dk).collect();
            let (mut a, mut b) = (vec![1f32; nq * TILE], vec![2f32; nq * TILE]);
            tile_scores(&qs, &kt, dk, &mut a);
            tile_scores_portable(&qs, &kt, dk, &mut b);
            assert_eq!(a, b, "scores, dk {dk}, {nq} queries");

            let w: Vec<f32> = (0..37).map(|i| rnd(i + 3).abs()).collect();
            let vt: Vec<f32> = (0..37 * dk).map(|i| rnd(i + 11)).collect();
            let mut a: Vec<f32> = (0..dk).map(|i| rnd(i + 5)).collect();
            let mut b = a.clone();
            tile_accumulate(&mut a, &w, &vt);
            tile_accumulate_portable(&mut b, &w, &vt);
            assert_eq!(a, b, "values, dv {dk}");
            let w1: Vec<f32> = (0..37).map(|i| rnd(i + 19).abs()).collect();
            let (mut c, mut d) = (b.clone(), b.iter().map(|x| x * 0.5).collect::<Vec<_>>());
            let (mut e, mut f) = (c.clone(), d.clone());
            tile_accumulate2(&mut c, &mut d, &w, &w1, &vt);
            tile_accumulate_portable(&mut e, &w, &vt);
            tile_accumulate_portable(&mut f, &w1, &vt);
            assert_eq!((c, d), (e, f), "value pairs, dv {dk}");
        }
    }
}
