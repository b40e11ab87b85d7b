//! Element-wise and row operations of a decoder, in f32 (f16 for cached keys and
//! values). Each follows the formula llama.cpp's CPU backend uses, so the two runtimes
//! agree to float rounding.
use std::sync::OnceLock;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// `out = x / rms(x) * w` (RMSNorm), as ggml computes it: the sum of squares of f32
/// products accumulated in f64, then `x * scale * w`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let scale = rms_scale(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// RMSNorm in place (see [`rmsnorm`]).
pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let scale = rms_scale(x, eps);
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.
    Normal,
    /// Halves (x[i], x[i + d/2]): GPT-NeoX, qwen2, qwen3, gemma3.
    Neox,
}

/// Rotary position embedding, part 1: the (cos, sin) of each pair's angle at
/// position `pos`, into `out`, for rotating the first `n_rot` dimensions of a head.
/// The angle of pair i is `freq_scale * pos * base^(-2i/n_rot)` (`freq_scale` < 1 is
/// linear scaling), built by repeated multiplication in f32 as ggml does. Computed
/// once per token and shared by all its heads, as ggml's rope cache is (the sines
/// and cosines cost more than the rotations).
pub fn rope_angles(pos: f32, n_rot: usize, base: f32, freq_scale: f32, out: &mut Vec<(f32, f32)>) {
    let theta_scale = base.powf(-2.0 / n_rot as f32);
    let mut theta = pos;
    out.clear();
    for _ in 0..n_rot / 2 {
        let (s, c) = (freq_scale * theta).sin_cos();
        out.push((c, s));
        theta *= theta_scale;
    }
}

/// Rotary position embedding, part 2: rotate one head vector `x` (length = head
/// dim) by [`rope_angles`].
pub fn rope_rotate(x: &mut [f32], angles: &[(f32, f32)], style: RopeStyle) {
    let half = angles.len();
    for (i, &(c, s)) in angles.iter().enumerate() {
        let (a, b) = match style {
            RopeStyle::Normal => (2 * i, 2 * i + 1),
            RopeStyle::Neox => (i, i + half),
        };
        let (x0, x1) = (x[a], x[b]);
        // Fused as ggml's compiled rope is (built with FMA contraction).
        x[a] = x0.mul_add(c, -(x1 * s));
        x[b] = x0.mul_add(s, x1 * c);
    }
}

/// `gate = silu(gate) * up` (SwiGLU) over one row. As in ggml's AVX2 code, blocks of
/// 8 use its exp approximation and a tail of fewer than 8 values uses `expf`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    let blocks = gate.len() / 8 * 8;
    for (g, &u) in gate[..blocks].iter_mut().zip(up) {
        *g = *g / (1.0 + softmax_exp(-*g)) * u;
    }
    for (g, &u) in gate[blocks..].iter_mut().zip(&up[blocks..]) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate = gelu(gate) * up` (GeGLU), GELU with the tanh approximation. Like ggml's
/// CPU backend, the input is rounded to f16 and GELU is read from a 64k-entry table
/// of f16 results, which makes the two runtimes agree exactly here.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    let table = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0 // ggml stores +0 here, not 0 * up (which is -0 for a negative up)
        } else if x >= 10.0 {
            x * u
        } else {
            table[f16::from_f32(x).to_bits() as usize].to_f32() * u
        };
    }
}

/// GELU (tanh approximation) of one value, in f32.
pub fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044715;
    // `1 + a*x*x` fused, as GCC compiles ggml_gelu_f32 (FMA contraction): the table
    // then equals ggml's ggml_table_gelu_f16 in all 65536 entries.
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (COEF_A * x).mul_add(x, 1.0)).tanh())
}

fn gelu_table() -> &'static [f16] {
    static TABLE: OnceLock<Vec<f16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu(f16::from_bits(bits).to_f32())))
            .collect()
    })
}

/// `exp(x)` as ggml's vectorised softmax computes it: the polynomial approximation
/// of ARM's optimized-routines (max error about 1.5 ulp), evaluated with the same
/// fused operations in the same order, so that attention weights and SiLU are
/// bit-identical to llama.cpp's. Valid over the whole f32 range (overflow gives inf,
/// underflow 0).
pub fn softmax_exp(x: f32) -> f32 {
    let f = f32::from_bits;
    let r = f(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f(0x3fb8_aa3b), r); // x * log2(e) + r
    let n = z - r;
    let b = (-n).mul_add(f(0x35bf_be8e), (-n).mul_add(f(0x3f31_7200), x));
    let e = z.to_bits() << 23;
    let k = f(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = f(0x3c07_2010)
        .mul_add(b, f(0x3d2b_9f17))
        .mul_add(u, f(0x3e2a_af33).mul_add(b, f(0x3eff_fedb)))
        .mul_add(u, f(0x3f7f_fff6) * b);
    if n.abs() <= 126.0 {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f(g.wrapping_add(0x7f00_0000));
    let s2 = f(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// `y[i] = exp(x[i] - max)` for a block of 8 values, returning their sum reduced in
/// the order of ggml's AVX2 softmax: ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7)).
pub fn softmax_exp8(x: &mut [f32; 8], max: f32) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        // SAFETY: the target supports AVX2 and FMA (checked at compile time), and x
        // holds the 8 values the kernel loads and stores.
        unsafe { exp8_avx2(x, max) };
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    for v in x.iter_mut() {
        *v = softmax_exp(*v - max);
    }
    let a: [f32; 4] = std::array::from_fn(|i| x[i + 4] + x[i]);
    (a[0] + a[2]) + (a[1] + a[3])
}

/// `x[i] = softmax_exp(x[i] - max)` for 8 lanes at once: [`softmax_exp`]'s operations
/// in its order, lane by lane, so the results are bit-identical. Lanes outside its
/// main range (|n| > 126: far below the maximum, or -inf for masked keys) take the
/// scalar path.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
unsafe fn exp8_avx2(x: &mut [f32; 8], max: f32) {
    use std::arch::x86_64::*;
    let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    // SAFETY: x holds 8 f32 values.
    let v = _mm256_sub_ps(_mm256_loadu_ps(x.as_ptr()), _mm256_set1_ps(max));
    let r = c(0x4b40_0000);
    let z = _mm256_fmadd_ps(v, c(0x3fb8_aa3b), r);
    let n = _mm256_sub_ps(z, r);
    let neg_n = _mm256_sub_ps(_mm256_setzero_ps(), n);
    let b = _mm256_fmadd_ps(
        neg_n,
        c(0x35bf_be8e),
        _mm256_fmadd_ps(neg_n, c(0x3f31_7200), v),
    );
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(
        e,
        _mm256_set1_epi32(1f32.to_bits() as i32),
    ));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
            u,
            _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
        ),
        u,
        _mm256_mul_ps(c(0x3f7f_fff6), b),
    );
    let out = _mm256_fmadd_ps(j, k, k);
    // |n| <= 126 in every lane: the main path holds.
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let outside = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(abs_n, _mm256_set1_ps(126.0)));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), out);
    for (i, (o, l)) in x.iter_mut().zip(lanes).enumerate() {
        *o = if outside & (1 << i) != 0 {
            softmax_exp(*o - max)
        } else {
            l
        };
    }
}

/// Convert f32 to f16 (8 lanes at a time with F16C).
pub fn to_f16(src: &[f32], dst: &mut [f16]) {
    let n = src.len().min(dst.len());
    dst[..n].convert_from_f32_slice(&src[..n]);
}

/// Values converted per step of the f16 accumulator helpers (on the stack).
const F16_BLOCK: usize = 64;

/// `acc[i] = f16(v[i] * w + acc[i])`: a fused multiply-add in f32, rounded to f16,
/// as ggml's f16 attention accumulator (`ggml_vec_mad_f16`) does, converting 8 lanes
/// at a time.
pub fn f16_axpy(acc: &mut [f16], v: &[f16], w: f32) {
    let (mut a, mut b) = ([0f32; F16_BLOCK], [0f32; F16_BLOCK]);
    for (ac, vc) in acc.chunks_mut(F16_BLOCK).zip(v.chunks(F16_BLOCK)) {
        let n = ac.len();
        ac.convert_to_f32_slice(&mut a[..n]);
        vc.convert_to_f32_slice(&mut b[..n]);
        for (x, &y) in a[..n].iter_mut().zip(&b[..n]) {
            *x = y.mul_add(w, *x);
        }
        ac.convert_from_f32_slice(&a[..n]);
    }
}

/// `acc[i] = f16(acc[i] * s)` (ggml's `ggml_vec_scale_f16`).
pub fn f16_scale(acc: &mut [f16], s: f32) {
    let mut a = [0f32; F16_BLOCK];
    for ac in acc.chunks_mut(F16_BLOCK) {
        let n = ac.len();
        ac.convert_to_f32_slice(&mut a[..n]);
        a[..n].iter_mut().for_each(|x| *x *= s);
        ac.convert_from_f32_slice(&a[..n]);
    }
}

/// Index of the largest value (first one on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_unit_rms() {
        let x = [3.0, 4.0];
        let mut out = [0.0; 2];
        rmsnorm(&x, &[1.0, 2.0], 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6);
        assert!((out[1] - 8.0 / rms).abs() < 1e-6);
    }

    fn rope(x: &mut [f32], pos: f32, n_rot: usize, base: f32, scale: f32, style: RopeStyle) {
        let mut angles = Vec::new();
        rope_angles(pos, n_rot, base, scale, &mut angles);
        rope_rotate(x, &angles, style);
    }

    #[test]
    fn rope_rotates_and_keeps_norm() {
        let mut a = [1.0, 0.0, 0.5, 0.5];
        rope(&mut a, 3.0, 4, 10000.0, 1.0, RopeStyle::Normal);
        // first pair rotated by 3 radians
        assert!((a[0] - 3f32.cos()).abs() < 1e-6 && (a[1] - 3f32.sin()).abs() < 1e-6);
        let n: f32 = a.iter().map(|v| v * v).sum();
        assert!((n - 1.5).abs() < 1e-5);
        let mut b = [1.0, 0.5, 0.0, 0.5];
        rope(&mut b, 0.0, 4, 10000.0, 1.0, RopeStyle::Neox);
        assert_eq!(b, [1.0, 0.5, 0.0, 0.5], "position 0 is the identity");
        rope(&mut b, 3.0, 4, 10000.0, 1.0, RopeStyle::Neox);
        assert!((b[0] - 3f32.cos()).abs() < 1e-6 && (b[2] - 3f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn activations() {
        let mut g = [0.0, 1.0, -20.0, 20.0];
        swiglu(&mut g, &[1.0, 2.0, 1.0, 1.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        let mut g = [0.0, 1.0, -20.0, 20.0];
        geglu(&mut g, &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 0.8412).abs() < 1e-3, "gelu(1) = {}", g[1]);
        assert_eq!(g[2], 0.0);
        assert_eq!(g[3], 20.0);
    }

    /// The vectorised f16 accumulator rounds exactly as the scalar formula does.
    #[test]
    fn f16_accumulator_matches_scalar_rounding() {
        let v: Vec<f16> = (0..150)
            .map(|i| f16::from_f32((i as f32 * 0.37).sin() * 3.0))
            .collect();
        let mut acc: Vec<f16> = (0..150)
            .map(|i| f16::from_f32((i as f32 * 0.11).cos()))
            .collect();
        let mut want = acc.clone();
        f16_axpy(&mut acc, &v, 0.713);
        f16_scale(&mut acc, 0.25);
        for (a, x) in want.iter_mut().zip(&v) {
            *a = f16::from_f32(x.to_f32().mul_add(0.713, a.to_f32()));
            *a = f16::from_f32(a.to_f32() * 0.25);
        }
        assert_eq!(acc, want);
    }

    #[test]
    fn softmax_exp_is_accurate() {
        // Normal results (down to exp(-87)); below that only absolute accuracy matters.
        for i in 0..1740 {
            let x = -(i as f32) * 0.05;
            let (got, want) = (softmax_exp(x), x.exp());
            assert!(
                (got - want).abs() <= want * 4e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert!(softmax_exp(-100.0) < 1e-40);
        for x in [0.5f32, 1.0, 10.0, 80.0] {
            assert!(
                (softmax_exp(x) - x.exp()).abs() <= x.exp() * 4e-7,
                "exp({x})"
            );
        }
        assert_eq!(softmax_exp(200.0), f32::INFINITY);
        assert_eq!(softmax_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(softmax_exp(-200.0), 0.0);
        let mut v = [0.0, -1.0, -2.0, f32::NEG_INFINITY, 0.0, -0.5, -3.0, -4.0];
        let sum = softmax_exp8(&mut v, 0.0);
        assert!((sum - v.iter().sum::<f32>()).abs() < 1e-6);
        assert_eq!(v[0], 1.0);
    }

    /// The 8-lane exponential is bit for bit the scalar one, over the whole range
    /// (main path, the lanes far below the maximum, -inf, overflow), lanes mixed.
    #[test]
    fn exp8_equals_the_scalar_exp_bit_for_bit() {
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32
        };
        let specials = [
            f32::NEG_INFINITY,
            -150.0,
            -130.0,
            -87.5,
            0.0,
            88.0,
            100.0,
            1e-30,
        ];
        for round in 0..20_000 {
            let max = if round % 3 == 0 {
                0.0
            } else {
                next() * 40.0 - 20.0
            };
            let mut x: [f32; 8] = std::array::from_fn(|_| max - next() * 200.0);
            if round % 5 == 0 {
                x[round % 8] = specials[(round / 5) % specials.len()];
            }
            let want: Vec<u32> = x.iter().map(|&v| softmax_exp(v - max).to_bits()).collect();
            let mut got = x;
            softmax_exp8(&mut got, max);
            let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "x {x:?}, max {max}");
        }
    }
}
