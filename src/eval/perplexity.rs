//! Quality measurement: perplexity the way llama.cpp's `llama-perplexity` computes it,
//! so figures compare with what llama.cpp users report.
use crate::model::ModelError;

/// Result of a perplexity run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub ppl: f64,
    /// Standard error of `ppl` (from the spread of the per-token log-likelihoods).
    pub ppl_err: f64,
    /// Running estimate after each chunk.
    pub per_chunk: Vec<f64>,
    pub n_chunks: usize,
    pub n_tokens_scored: usize,
}

/// Perplexity of `tokens` in chunks of `n_ctx` (llama.cpp's method): every chunk is
/// evaluated from an empty context, its first token replaced by `bos` when the model
/// adds one, and only the second half of each chunk is scored, so every scored token
/// has at least `n_ctx / 2` tokens of context.
///
/// `eval_chunk` gets the chunk's tokens and returns the logits of every position
/// (n_ctx x n_vocab); it is called with a fresh context each time.
pub fn perplexity(
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    n_vocab: usize,
    eval_chunk: impl FnMut(usize, &[u32]) -> Result<Vec<f32>, ModelError>,
) -> Result<Perplexity, ModelError> {
    perplexity_reporting(
        tokens,
        n_ctx,
        max_chunks,
        bos,
        n_vocab,
        eval_chunk,
        |_, _| {},
    )
}

/// [`perplexity`], calling `on_chunk(i, estimate)` with the running estimate after
/// each chunk `i`, as `llama-perplexity` prints `[1]18.2,[2]17.9,...` while it works.
pub fn perplexity_reporting(
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    n_vocab: usize,
    mut eval_chunk: impl FnMut(usize, &[u32]) -> Result<Vec<f32>, ModelError>,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity, ModelError> {
    if n_ctx < 4 {
        return Err(ModelError::BadConfig(format!(
            "context {n_ctx} is too small for perplexity"
        )));
    }
    let available = tokens.len() / n_ctx;
    let n_chunks = max_chunks.map_or(available, |m| m.min(available));
    if n_chunks == 0 {
        return Err(ModelError::BadConfig(format!(
            "need at least {n_ctx} tokens for one chunk of perplexity, the text has {}",
            tokens.len()
        )));
    }
    let first = n_ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut per_chunk = Vec::with_capacity(n_chunks);
    for i in 0..n_chunks {
        let mut chunk = tokens[i * n_ctx..(i + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let logits = eval_chunk(i, &chunk)?;
        assert_eq!(
            logits.len(),
            n_ctx * n_vocab,
            "eval_chunk must return all logits"
        );
        for j in first..n_ctx - 1 {
            let row = &logits[j * n_vocab..(j + 1) * n_vocab];
            let lp = log_softmax_at(row, tokens[i * n_ctx + j + 1] as usize);
            nll -= lp;
            nll2 += lp * lp;
            count += 1;
        }
        let estimate = (nll / count as f64).exp();
        on_chunk(i, estimate);
        per_chunk.push(estimate);
    }
    let mean = nll / count as f64;
    let var = (nll2 / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    let ppl_err = if count > 1 {
        ppl * (var / (count - 1) as f64).sqrt()
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        ppl_err,
        per_chunk,
        n_chunks,
        n_tokens_scored: count,
    })
}

/// log softmax(row)[i], in f64.
pub fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    row[i] as f64 - super::fidelity::log_sum_exp(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_model_has_vocab_perplexity() {
        let tokens: Vec<u32> = (0..64).map(|i| i % 5).collect();
        let r = perplexity(&tokens, 16, None, Some(0), 5, |_, c| {
            Ok(vec![0.0; c.len() * 5])
        })
        .unwrap();
        assert_eq!(r.n_chunks, 4);
        assert_eq!(r.n_tokens_scored, 4 * 7);
        assert!((r.ppl - 5.0).abs() < 1e-9);
        assert!(r.ppl_err.abs() < 1e-9);
    }

    #[test]
    fn perfect_model_has_perplexity_one() {
        let tokens: Vec<u32> = (0..32).map(|i| i % 4).collect();
        // Predict token (t + 1) % 4 with near certainty.
        let r = perplexity(&tokens, 8, Some(2), None, 4, |_, c| {
            Ok(c.iter()
                .flat_map(|&t| (0..4).map(move |v| if v == (t + 1) % 4 { 50.0 } else { 0.0 }))
                .collect())
        })
        .unwrap();
        assert_eq!(r.n_chunks, 2);
        assert!((r.ppl - 1.0).abs() < 1e-9);
    }

    #[test]
    fn too_little_text_is_an_error() {
        let err = perplexity(&[1, 2, 3], 512, None, None, 4, |_, _| unreachable!()).unwrap_err();
        assert!(err.to_string().contains("need at least 512 tokens"));
    }
}
