//! Dense f32 matrix products for the Fast KVzip gates (their weights are small f32
//! matrices, trained here) and for the attention logits that eviction policies
//! observe, through the `matrixmultiply` crate: a well-kept, pure
//! Rust, cache-blocked SIMD GEMM (the one `ndarray` uses). Each call runs on one
//! thread, and an output element's value does not depend on how many rows the call
//! has, so callers parallelise over blocks of rows and stay deterministic.

/// A row-major matrix operand: `rows x cols` values, or the transpose of one stored
/// row-major as `cols x rows`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// The data holds the transpose (`cols` rows of `rows` values).
    pub transposed: bool,
}

impl<'a> Mat<'a> {
    /// `rows x cols`, row-major.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::with(data, rows, cols, false)
    }

    /// The `rows x cols` transpose of `data`, which is `cols x rows` row-major.
    pub fn t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::with(data, rows, cols, true)
    }

    fn with(data: &'a [f32], rows: usize, cols: usize, transposed: bool) -> Self {
        assert_eq!(data.len(), rows * cols, "gemm: operand has the wrong size");
        Self {
            data,
            rows,
            cols,
            transposed,
        }
    }

    /// Row and column strides, in elements.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.rows as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major `a.rows x b.cols`.
pub fn gemm(a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    assert_eq!(c.len(), a.rows * b.cols, "gemm: output has the wrong size");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let (rsa, csa) = a.strides();
    let (rsb, csb) = b.strides();
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the asserts above make every index the strides reach lie inside `a.data`
    // (m x k), `b.data` (k x n) and `c` (m x n, row-major, exclusively borrowed);
    // with beta = 0, `c` is written without being read.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            rsa,
            csa,
            b.data.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0f32; x.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = x[r * cols + c];
            }
        }
        t
    }

    #[test]
    fn matches_naive_product_with_transposes_and_accumulation() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let close = |c: &[f32], w: &[f32]| c.iter().zip(w).all(|(x, y)| (x - y).abs() < 1e-5);
        let mut c = vec![9.0; m * n];
        gemm(Mat::new(&a, m, k), Mat::new(&b, k, n), &mut c, false);
        assert!(close(&c, &want));
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        gemm(Mat::t(&at, m, k), Mat::t(&bt, k, n), &mut c, false);
        assert!(close(&c, &want));
        gemm(Mat::new(&a, m, k), Mat::t(&bt, k, n), &mut c, true);
        let twice: Vec<f32> = want.iter().map(|x| 2.0 * x).collect();
        assert!(close(&c, &twice));
    }
}
