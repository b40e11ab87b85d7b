//! How far a compressed cache's next-token distributions are from the full cache's:
//! KL divergence, top-1 agreement and the change in negative log-likelihood, plus
//! the summary statistics the reports use.

/// log softmax of a row of logits, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let log_z = log_sum_exp(row);
    row.iter().map(|&v| v as f64 - log_z).collect()
}

/// ln(sum(exp(row))), in f64, computed stably from the row's maximum.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln()
}

/// One position compared with the full cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenFidelity {
    /// KL(full || compressed) of the next-token distributions, in nats.
    pub kld: f64,
    /// Whether both put the same token on top.
    pub same_top1: bool,
    /// NLL of the actual next token under the compressed cache minus under the full.
    pub delta_nll: f64,
}

/// Compare `logits` (compressed cache) with `reference` (the full cache's log
/// probabilities at the same position); `target` is the token that came next.
pub fn compare(reference: &[f64], logits: &[f32], target: u32) -> TokenFidelity {
    let logp = log_softmax(logits);
    let kld = reference
        .iter()
        .zip(&logp)
        .map(|(&p, &q)| if p > -80.0 { p.exp() * (p - q) } else { 0.0 })
        .sum::<f64>()
        .max(0.0);
    let t = target as usize;
    TokenFidelity {
        kld,
        same_top1: argmax(reference) == argmax(&logp),
        delta_nll: reference[t] - logp[t],
    }
}

fn argmax(xs: &[f64]) -> usize {
    // The first of equal maxima, as greedy sampling picks.
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Mean with a 95% confidence half-width, and percentiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    /// Half-width of the normal-approximation 95% interval of the mean
    /// (1.96 standard errors).
    pub ci95: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Summarise `xs`. The confidence interval treats the values as independent, so
/// pass one value per independent unit (a document's mean, a question's score).
pub fn summarize(xs: &[f64]) -> Summary {
    let n = xs.len();
    if n == 0 {
        return Summary::default();
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    // Nearest-rank percentile.
    let pct = |p: f64| sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Summary {
        n,
        mean,
        ci95: 1.96 * (var / n as f64).sqrt(),
        p50: pct(0.5),
        p90: pct(0.9),
        p99: pct(0.99),
    }
}

/// The Wilson score 95% interval of a proportion `p` observed over `n` trials: unlike
/// the normal approximation it stays inside [0, 1] and is not of zero width at
/// p = 0 or 1 (6 of 6 right gives [0.61, 1], not "1.00 ± 0.00"). For scores with
/// partial credit (a fraction of the expected strings found) it is applied to the
/// mean score, which is conservative: such a score varies less than a 0/1 outcome.
pub fn wilson(p: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    const Z: f64 = 1.959_963_984_540_054;
    let (n, p) = (n as f64, p.clamp(0.0, 1.0));
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_distributions_have_zero_divergence() {
        let logits = [1.0f32, 3.0, -2.0, 0.5];
        let r = compare(&log_softmax(&logits), &logits, 2);
        assert_eq!(r.kld, 0.0);
        assert!(r.same_top1);
        assert_eq!(r.delta_nll, 0.0);
    }

    #[test]
    fn divergence_matches_the_formula() {
        let (p, q) = ([0.0f32, 0.0], [0.0f32, (3.0f32).ln()]);
        // P = (1/2, 1/2), Q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3).
        let r = compare(&log_softmax(&p), &q, 0);
        let want = 0.5 * (2.0f64).ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((r.kld - want).abs() < 1e-6, "{} vs {want}", r.kld);
        // Both tie or prefer token 1: P's first maximum is 0, Q's is 1.
        assert!(!r.same_top1);
        // -ln(1/4) - -ln(1/2) = ln 2.
        assert!((r.delta_nll - (2.0f64).ln()).abs() < 1e-6);
    }

    #[test]
    fn wilson_intervals() {
        let close =
            |a: (f64, f64), b: (f64, f64)| (a.0 - b.0).abs() < 5e-4 && (a.1 - b.1).abs() < 5e-4;
        // Reference values (e.g. statsmodels' proportion_confint, method="wilson").
        assert!(
            close(wilson(0.5, 10), (0.2366, 0.7634)),
            "{:?}",
            wilson(0.5, 10)
        );
        assert!(close(wilson(1.0, 6), (0.6097, 1.0)), "{:?}", wilson(1.0, 6));
        assert!(
            close(wilson(0.0, 24), (0.0, 0.1380)),
            "{:?}",
            wilson(0.0, 24)
        );
        assert_eq!(wilson(0.3, 0), (0.0, 1.0));
        let (lo, hi) = wilson(0.75, 24);
        assert!(lo < 0.75 && 0.75 < hi && hi - lo < 0.4);
    }

    #[test]
    fn summary_statistics() {
        let s = summarize(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(s.n, 4);
        assert_eq!(s.mean, 2.5);
        let sd = (5.0f64 / 3.0).sqrt();
        assert!((s.ci95 - 1.96 * sd / 2.0).abs() < 1e-12);
        assert_eq!((s.p50, s.p90, s.p99), (2.0, 4.0, 4.0));
        assert_eq!(summarize(&[]), Summary::default());
    }
}
