//! Tiny random-weight models of each architecture, written by the test itself, give
//! the same logits in fastkv and in llama.cpp. Unlike the real-model tests these need
//! no download (the tokenizer is SmolLM2's when present, else a byte-level one), and
//! they cover what the real models do not: qwen2's Q/K/V biases, qwen3's per-head
//! Q/K norms, GQA, attention wider than the embedding, untied output heads, and
//! Q8_0 / F16 / F32 weights.
//!
//! Random Q8_0 models are a sharp test: activations are re-quantized to 8 bits before
//! every Q8_0 product, so a one-ulp difference anywhere upstream occasionally flips an
//! int8 rounding and the flip then spreads through the KV cache to all later tokens.
//! fastkv and llama.cpp must therefore agree to the last bit, not just "closely".
mod common;

use common::compare_logits;
use common::synth::{tiny_model, Rng, TinySpec, Vocab};
use fastkv::kernels::GgmlType;
use fastkv::model::{Logits, Model};
use ggml_sys::reference::{RefContext, RefContextParams, RefModel};

/// Tokens evaluated per model (0.99 top-1 agreement then tolerates 2 mismatches).
const N_TOKENS: usize = 200;
const N_CTX: usize = 256;

/// Token ids: the tokenization of some English by llama.cpp (which also checks that
/// the copied tokenizer is usable), padded with random ids from the whole vocabulary.
fn test_tokens(reference: &RefModel, n_vocab: usize, seed: u64) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog. In 1894, the city council \
                voted to build a new bridge across the river; construction took seven years.";
    let mut ids: Vec<u32> = reference
        .tokenize(text, false, false)
        .into_iter()
        .map(|t| t as u32)
        .collect();
    assert!(
        ids.len() >= 20,
        "llama.cpp tokenized the text to {} tokens",
        ids.len()
    );
    assert!(ids.iter().all(|&t| (t as usize) < n_vocab));
    let mut rng = Rng::new(seed);
    ids.truncate(N_TOKENS / 2);
    while ids.len() < N_TOKENS {
        ids.push(rng.below(n_vocab) as u32);
    }
    ids
}

/// Write `spec`'s model with `vocab`, run it in both runtimes and check that they
/// agree: all tokens in one batch, and (fastkv) the same tokens as a prefill followed
/// by one-token decode steps, which exercises the KV cache across calls.
fn agrees_with_llama_cpp(spec: TinySpec, vocab: &Vocab) {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(&spec, vocab).write_to(dir.path(), &format!("tiny-{}.gguf", spec.arch));
    let label = format!(
        "{} (head_dim {}, embd {}, weights {}, {}, {} vocab)",
        spec.arch,
        spec.head_dim,
        spec.embd_type,
        spec.weight_type,
        if spec.tied {
            "tied output"
        } else {
            "untied output"
        },
        vocab.source
    );

    let reference = RefModel::load(&path, false).expect("llama.cpp loads the synthetic model");
    let n_vocab = reference.n_vocab();
    assert_eq!(n_vocab, vocab.len());
    let tokens = test_tokens(&reference, n_vocab, spec.seed + 100);
    let params = RefContextParams {
        n_ctx: N_CTX as u32,
        n_batch: N_CTX as u32,
        flash_attn: true,
        ..Default::default()
    };
    let mut ctx = RefContext::new(&reference, params).unwrap();
    let ref_tokens: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let want = ctx.eval(&ref_tokens, true).unwrap();
    assert_eq!(want.len(), N_TOKENS * n_vocab);

    let model = Model::load(&path).expect("fastkv loads the synthetic model");
    let c = &model.config;
    assert_eq!(c.arch.name(), spec.arch);
    assert_eq!(c.n_vocab, n_vocab);
    assert_eq!(
        (
            c.n_embd,
            c.n_layer,
            c.n_head,
            c.n_head_kv,
            c.head_dim,
            c.n_ff
        ),
        (
            spec.n_embd,
            spec.n_layer,
            spec.n_head,
            spec.n_head_kv,
            spec.head_dim,
            spec.n_ff
        )
    );

    // One batch.
    let mut cache = model.new_cache();
    let got = model
        .forward(&tokens, &mut cache, Logits::All, N_CTX)
        .unwrap();
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{label}: non-finite logits"
    );
    let (top1, kl) = compare_logits(&want, &got, n_vocab);
    eprintln!("{label}: one batch: top-1 agreement {top1:.4}, mean KL {kl:.3e}");

    // Prefill, then one token at a time.
    let split = N_TOKENS * 3 / 4;
    let mut cache = model.new_cache();
    let mut stepped = model
        .forward(&tokens[..split], &mut cache, Logits::All, N_CTX)
        .unwrap();
    for &t in &tokens[split..] {
        stepped.extend(
            model
                .forward(&[t], &mut cache, Logits::Last, N_CTX)
                .unwrap(),
        );
    }
    let (top1_step, kl_step) = compare_logits(&want, &stepped, n_vocab);
    eprintln!("{label}: prefill + decode: top-1 agreement {top1_step:.4}, mean KL {kl_step:.3e}");

    // The logits are not degenerate (else agreement would prove little): the
    // predicted token varies along the sequence.
    let distinct: std::collections::HashSet<usize> =
        want.chunks_exact(n_vocab).map(common::argmax).collect();
    assert!(
        distinct.len() > N_TOKENS / 4,
        "{label}: the reference predicts only {} distinct tokens",
        distinct.len()
    );

    for (what, top1, kl) in [
        ("one batch", top1, kl),
        ("prefill + decode", top1_step, kl_step),
    ] {
        assert!(
            top1 >= 0.99,
            "{label}, {what}: top-1 agreement {top1} < 0.99"
        );
        assert!(kl <= 1e-3, "{label}, {what}: mean KL {kl} > 1e-3");
    }
}

#[test]
fn llama_q8_0_untied_matches_llama_cpp() {
    let spec = TinySpec {
        embd_type: GgmlType::Q8_0,
        weight_type: GgmlType::Q8_0,
        tied: false,
        seed: 11,
        ..TinySpec::new("llama")
    };
    agrees_with_llama_cpp(spec, &Vocab::smollm2_or_bytes());
}

#[test]
fn llama_f16_byte_vocab_matches_llama_cpp() {
    // Needs no model file at all: a 256-byte gpt2 vocabulary plus filler tokens.
    let spec = TinySpec {
        embd_type: GgmlType::F16,
        weight_type: GgmlType::F16,
        tied: true,
        head_dim: 32,
        seed: 12,
        ..TinySpec::new("llama")
    };
    agrees_with_llama_cpp(spec, &Vocab::bytes(4000));
}

#[test]
fn qwen2_with_qkv_bias_matches_llama_cpp() {
    agrees_with_llama_cpp(
        TinySpec {
            embd_type: GgmlType::F16,
            weight_type: GgmlType::F16,
            tied: true,
            rope_base: 1_000_000.0,
            seed: 22,
            ..TinySpec::new("qwen2")
        },
        &Vocab::smollm2_or_bytes(),
    );
}

#[test]
fn qwen2_q8_0_untied_matches_llama_cpp() {
    agrees_with_llama_cpp(
        TinySpec {
            embd_type: GgmlType::Q8_0,
            weight_type: GgmlType::Q8_0,
            tied: false,
            seed: 23,
            ..TinySpec::new("qwen2")
        },
        &Vocab::smollm2_or_bytes(),
    );
}

#[test]
fn qwen3_with_qk_norm_matches_llama_cpp() {
    agrees_with_llama_cpp(
        TinySpec {
            embd_type: GgmlType::Q8_0,
            weight_type: GgmlType::F32,
            tied: false,
            rope_base: 1_000_000.0,
            seed: 33,
            ..TinySpec::new("qwen3")
        },
        &Vocab::smollm2_or_bytes(),
    );
}

#[test]
fn qwen3_q8_0_tied_matches_llama_cpp() {
    // head_dim 32 with 4 heads: the attention width (128) differs from n_embd (64),
    // as in real qwen3 models.
    agrees_with_llama_cpp(
        TinySpec {
            embd_type: GgmlType::F16,
            weight_type: GgmlType::Q8_0,
            tied: true,
            head_dim: 32,
            seed: 34,
            ..TinySpec::new("qwen3")
        },
        &Vocab::smollm2_or_bytes(),
    );
}
