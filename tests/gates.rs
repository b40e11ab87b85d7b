//! Fast KVzip gates end to end: `train-gates` on a tiny model (deterministic,
//! resumable, the same with 1 and 2 threads, a gate file only its model accepts, the
//! policy eviction uses when none is named), and the gates shipped for the reference
//! models (they predict the teacher on text they were not trained on, and evict in
//! prefill and under a decode budget).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::synth::{tiny_model, TinySpec, Vocab};
use common::*;
use fastkv::gate::train::{self, FeatureFiles, StageA};
use fastkv::gate::{gated_layers, Gates};
use fastkv::kv::{Level, Policy};
use fastkv::model::Model;
use fastkv::session::{EvictionConfig, Session, TeacherPrompt};
use fastkv::tokenizer::{ChatTemplate, Tokenizer};

fn fastkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fastkv"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("fastkv runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(err.contains(needle), "message lacks '{needle}': {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
}

/// A tiny llama with room for the teacher's repeat pass, written to `dir`.
fn tiny(dir: &Path, seed: u64) -> PathBuf {
    let spec = TinySpec {
        n_ctx: 1024,
        seed,
        ..TinySpec::new("llama")
    };
    tiny_model(&spec, &Vocab::bytes(0)).write_to(dir, "tiny.gguf")
}

/// Some varied text: sentences with numbers, so tokens differ.
fn corpus(dir: &Path) -> PathBuf {
    let text: String = (0..120)
        .map(|i| format!("Line {i}: the value of item {} is {}.\n", i * 7 % 13, i * i))
        .collect();
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn train_args<'a>(model: &'a str, corpus: &'a str, out: &'a str, work: &'a str) -> Vec<&'a str> {
    vec![
        "train-gates",
        "-m",
        model,
        "--corpus",
        corpus,
        "--out",
        out,
        "--work",
        work,
        "--doc-tokens",
        "128",
        "--steps",
        "40",
        "--batch",
        "64",
        "--eval-every",
        "20",
    ]
}

#[test]
fn train_gates_end_to_end_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 1);
    let corpus = corpus(dir.path());
    let (m, c) = (model.to_str().unwrap(), corpus.to_str().unwrap());
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // Asking for eviction without naming a policy: snapkv while the model has no
    // gates, the gates once they are trained (below).
    let doc = dir.path().join("doc.txt");
    let lines = std::fs::read_to_string(&corpus).unwrap();
    std::fs::write(&doc, &lines[..400]).unwrap();
    let unnamed_policy = || {
        let o = fastkv(&[
            "run",
            "-m",
            m,
            "-c",
            "0",
            "--context-file",
            doc.to_str().unwrap(),
            "-p",
            "Line 3:",
            "-n",
            "1",
            "--kv-keep",
            "0.5",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    let err = unnamed_policy();
    assert!(err.contains("; snapkv, keep 0.5"), "{err}");

    let (out1, work1) = (p("tiny.gates.gguf"), p("work1"));
    let mut args = train_args(m, c, &out1, &work1);
    args.extend(["-t", "1"]);
    let o = fastkv(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(table.contains("| all |"), "{table}");
    assert!(stderr(&o).contains("stage A"), "{}", stderr(&o));

    // The file loads for its model, with its metadata.
    let tiny_model = Model::load(&model).unwrap();
    let gates = Gates::load(Path::new(&out1), &tiny_model).unwrap();
    assert_eq!(gates.gated().count(), 2);
    let t = &gates.meta.training;
    assert_eq!((t.steps, t.batch, t.doc_tokens), (40, 64, 128));
    assert!(t.corpus_tokens > 128 && t.val_tokens > 0);
    assert!(t.val_agreement > 0.0 && t.val_loss.is_finite());

    // Again with 2 threads and a fresh work directory: the same gates, byte for byte.
    let (out2, work2) = (p("two.gates.gguf"), p("work2"));
    let mut args = train_args(m, c, &out2, &work2);
    args.extend(["-t", "2"]);
    let o = fastkv(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (std::fs::read(&out1).unwrap(), std::fs::read(&out2).unwrap());
    assert!(a == b, "1 and 2 threads trained different gates");

    // Resuming: stage A's finished documents are reused, and the result is the same.
    let o = fastkv(&train_args(m, c, &out2, &work1));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("from an earlier run"), "{}", stderr(&o));
    assert!(std::fs::read(&out2).unwrap() == a);

    // Now that the model has gates, they are what eviction uses by default, and the
    // output names the file that was found.
    let err = unnamed_policy();
    assert!(err.contains("; gated, keep 0.5"), "{err}");
    assert!(err.contains(&format!("gates: {out1} (found")), "{err}");

    // The gated policy finds the gates next to the model and runs.
    let o = fastkv(&[
        "run",
        "-m",
        m,
        "-p",
        "Line 3: the value",
        "-n",
        "4",
        "--temp",
        "0",
        "--kv-policy",
        "gated",
        "--kv-budget",
        "140",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Another model refuses them, and says why.
    let other_dir = tempfile::tempdir().unwrap();
    let other = tiny(other_dir.path(), 2);
    let o2 = other.to_str().unwrap();
    let gated = ["--kv-policy", "gated"];
    let o = run_one(o2, &[&gated[..], &["--gates", &out1]].concat());
    assert_clean_error(&o, "holds gates for another model");
    let o = run_one(o2, &gated);
    assert_clean_error(&o, "no gate file for");
    let o = run_one(m, &[&gated[..], &["--gates", m]].concat());
    assert_clean_error(&o, "not a fastkv gate file");
    let o = run_one(m, &["--gates", &out1]);
    assert_clean_error(&o, "--gates is for --kv-policy gated");
}

/// A gate file's sizes are checked before they size anything: a block count of 2^40
/// (which once ran a loop that long and sized a table by it) or a huge dimension is
/// refused at once, with a message.
#[test]
fn hostile_gate_metadata_is_refused_before_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), 3);
    let m = Model::load(&path).unwrap();
    let good = dir.path().join("good.gates.gguf");
    untrained_gates(&m, &path).save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    // A u64 metadata value: the key, its type (u32 10 = UINT64), then 8 bytes.
    let patched = |key: &str, value: u64| {
        let at = bytes
            .windows(key.len())
            .position(|w| w == key.as_bytes())
            .unwrap_or_else(|| panic!("{key} is in the file"))
            + key.len();
        assert_eq!(bytes[at..at + 4], 10u32.to_le_bytes(), "{key} is a u64");
        let mut b = bytes.clone();
        b[at + 4..at + 12].copy_from_slice(&value.to_le_bytes());
        let p = dir.path().join("bad.gates.gguf");
        std::fs::write(&p, b).unwrap();
        p
    };
    for (key, value, needle) in [
        ("fastkv.gates.model.block_count", 1u64 << 40, "block count"),
        ("fastkv.gates.model.block_count", 0, "block count"),
        (
            "fastkv.gates.embedding_length",
            1u64 << 40,
            "implausibly large",
        ),
        ("fastkv.gates.dim", 1u64 << 30, "implausibly large"),
    ] {
        let p = patched(key, value);
        let t0 = std::time::Instant::now();
        let err = Gates::open(&p).unwrap_err().to_string();
        assert!(err.contains(needle), "{key} = {value}: {err}");
        assert!(Gates::load(&p, &m).is_err());
        assert!(
            t0.elapsed().as_secs() < 5,
            "{key} = {value} took {:?}",
            t0.elapsed()
        );
    }
    assert!(Gates::load(&good, &m).is_ok());
}

/// Found by fuzzing (fuzz/fuzz_targets/gate_file.rs): gate weights are checked to be
/// finite when read (NaN weights once loaded and scored every pair NaN), and a score
/// that overflows with extreme but finite weights keeps its pair instead of being NaN.
#[test]
fn non_finite_gate_weights_are_refused_and_scores_stay_in_range() {
    use fastkv::gate::{GateMeta, LayerGate};
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), 4);
    let m = Model::load(&path).unwrap();
    let meta = GateMeta::for_model(&m, &path);
    let shape = meta.shape;
    let gates_with = |edit: &dyn Fn(&mut LayerGate)| {
        let layers = gated_layers(&m)
            .into_iter()
            .map(|il| {
                let mut g = LayerGate::init(&shape, il as u64);
                edit(&mut g);
                (il, g)
            })
            .collect();
        Gates::new(meta.clone(), m.config.n_layer, layers)
    };
    let file = dir.path().join("g.gates.gguf");
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        gates_with(&|g| g.sink[3] = bad).save(&file).unwrap();
        let err = match Gates::load(&file, &m) {
            Ok(_) => panic!("gate weights of {bad} were accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("NaN or infinite"), "{bad}: {err}");
        assert!(Gates::open(&file).is_err());
    }
    // Weights of 1e30 overflow every product to infinity (and infinity - infinity
    // to NaN): the scores still lie in [0, 1].
    gates_with(&|g| {
        g.tensors_mut()
            .into_iter()
            .flatten()
            .for_each(|v| *v = 1e30)
    })
    .save(&file)
    .unwrap();
    let gates = Gates::load(&file, &m).unwrap();
    let x = vec![1e20f32; 3 * shape.n_embd];
    for (il, layer) in gates.gated() {
        let mut out = vec![0f32; 3 * shape.n_head_kv];
        layer.score(&shape, &x, &mut out);
        assert!(
            out.iter().all(|p| (0.0..=1.0).contains(p)),
            "layer {il}: {out:?}"
        );
    }
}

/// Gates at the spec's initialisation (seeded by layer) for `m`, loaded from `path`.
fn untrained_gates(m: &Model, path: &Path) -> Gates {
    use fastkv::gate::{GateMeta, LayerGate};
    let meta = GateMeta::for_model(m, path);
    let shape = meta.shape;
    let layers = gated_layers(m)
        .into_iter()
        .map(|il| (il, LayerGate::init(&shape, il as u64)))
        .collect();
    Gates::new(meta, m.config.n_layer, layers)
}

/// `fastkv run` of one token with `model` and `extra` flags.
fn run_one(model: &str, extra: &[&str]) -> Output {
    let args = [&["run", "-m", model, "-p", "x", "-n", "1"][..], extra].concat();
    fastkv(&args)
}

#[test]
fn train_gates_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), 1);
    let m = model.to_str().unwrap();
    let out = dir.path().join("g.gguf");
    let out = out.to_str().unwrap();
    let train = |corpus: &str, extra: &[&str]| {
        let args = [
            &["train-gates", "-m", m, "--corpus", corpus, "--out", out][..],
            extra,
        ];
        fastkv(&args.concat())
    };
    assert_clean_error(&train("/no/such/dir", &[]), "does not exist");
    let c = corpus(dir.path());
    let c = c.to_str().unwrap();
    assert_clean_error(&train(c, &["--lr=-1"]), "--lr");
    assert_clean_error(&train(c, &["--steps", "0"]), "at least 1");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_clean_error(
        &train(empty.to_str().unwrap(), &[]),
        "no files in the corpus",
    );
}

/// The shipped gates predict the KVzip teacher on WikiText, text they were never
/// trained on (they were trained on rust-docs): stage A on one held-out document,
/// then the gates' agreement with the teacher's scores.
fn gates_predict_the_teacher(name: &'static str, min_agreement: f64) {
    let Some(path) = model(name) else { return };
    let Some(text) = wiki_text() else { return };
    let m = Model::load(&path).unwrap();
    let Some(gates) = shipped_gates(name, &m) else {
        return;
    };
    let tok = Tokenizer::from_gguf(m.file()).unwrap();
    let template = ChatTemplate::from_gguf(m.file(), &tok).unwrap_or_else(ChatTemplate::plain);
    let ids = tok.encode(&text[..100_000], false, false);
    let doc = ids[5000..5000 + 768].to_vec();
    let work = tempfile::tempdir().unwrap();
    let stage = StageA {
        prefix: tok.bos().into_iter().collect(),
        teacher: TeacherPrompt::new(&tok, &template).unwrap(),
        sample_every: 1,
        corpus: "wiki.test.raw".into(),
        doc_tokens: 768,
    };
    train::collect(&m, &[doc], work.path(), &stage, |_| {}).unwrap();
    let files = FeatureFiles::open(work.path()).unwrap();
    let layers = gated_layers(&m);
    let (all, per_layer) = train::score_against_teacher(&gates, files.view(), &layers).unwrap();
    eprintln!("{name}: agreement with the teacher on held-out text {all:?}");
    assert!(
        all.agreement >= min_agreement,
        "{name}: agreement {} on held-out text (per layer {per_layer:?})",
        all.agreement
    );
}

#[test]
fn shipped_gates_predict_the_teacher_smollm2() {
    gates_predict_the_teacher(SMOLLM2, 0.9);
}

#[test]
fn shipped_gates_predict_the_teacher_gemma3() {
    gates_predict_the_teacher(GEMMA3, 0.9);
}

/// Gated eviction in the runtime's two schedules on SmolLM2: a 1024-token context
/// compressed while it streams in keeps 30% of the evictable pairs with non-uniform
/// heads, and a decode budget holds while tokens are generated.
#[test]
fn gated_eviction_in_prefill_and_decode() {
    let Some(path) = model(SMOLLM2) else { return };
    let Some(text) = wiki_text() else { return };
    let m = Model::load(&path).unwrap();
    let Some(gates) = shipped_gates(SMOLLM2, &m) else {
        return;
    };
    let tok = Tokenizer::from_gguf(m.file()).unwrap();
    let ids = tok.encode(&text[..60_000], false, false);
    let prefix: Vec<u32> = tok.bos().into_iter().collect();
    let context = &ids[2000..3024];

    let mut s = Session::new(&m, 4096);
    s.set_gates(gates.clone());
    s.set_eviction(EvictionConfig::new(Policy::Gated, 0.3))
        .unwrap();
    let (_, report) = s.feed_context(&prefix, context).unwrap();
    let cache = s.cache();
    let lists = cache.evictable_heads().count();
    let kept = (cache.evictable_entries() - prefix.len() * lists) as f64;
    let want = 0.3 * context.len() as f64 * lists as f64;
    assert!(
        (kept - want).abs() / want < 0.02,
        "kept {kept}, want {want}"
    );
    assert!(report.kv_bytes < report.kv_bytes_full / 2);
    let lens: Vec<usize> = cache.evictable_heads().map(|h| h.len()).collect();
    assert!(
        lens.iter().max() > lens.iter().min(),
        "global threshold gives ragged lists"
    );

    // Decode under a budget of 160 pairs per list: every 128 tokens the gates score
    // what was buffered and the lowest-scored pairs go.
    let mut s = Session::new(&m, 4096);
    s.set_gates(gates);
    let cfg = EvictionConfig {
        budget: Some(160),
        level: Level::Global,
        ..EvictionConfig::new(Policy::Gated, 1.0)
    };
    s.set_eviction(cfg).unwrap();
    s.feed(&prefix).unwrap();
    for &t in &ids[4000..4400] {
        s.feed(&[t]).unwrap();
    }
    let c = s.cache();
    let n_lists = c.evictable_heads().count();
    let held = c.evictable_entries();
    // Enforced at 384 tokens fed (401 seen); 17 more arrived since.
    assert!(
        held <= (160 + 17) * n_lists,
        "{held} pairs in {n_lists} lists"
    );
    assert!(held >= 150 * n_lists, "{held} pairs in {n_lists} lists");
    // Every pair still held before the last 128 tokens has a gate score.
    let recent = c.n_seen() as u32 - 128;
    for h in c.evictable_heads() {
        for (&p, &x) in h.pos.iter().zip(&h.score) {
            assert!(p >= recent || x > 0.0, "pair at {p} was never scored");
        }
    }
}

/// Decode scores its buffered tokens 128 at a time; prefill scores a chunk at once.
/// Both give every pair its own score (a token's score depends only on its own
/// input), and the buffered scores land on the right pairs.
#[test]
fn buffered_decode_scores_equal_prefill_scores() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), 3);
    let m = Model::load(&path).unwrap();
    let gates = std::sync::Arc::new(untrained_gates(&m, &path));
    let tokens: Vec<u32> = (0..300).map(|i| (i * 37 % 250) as u32).collect();
    let session = || {
        let mut s = Session::new(&m, 1024);
        s.set_gates(gates.clone());
        s.set_eviction(EvictionConfig::new(Policy::Gated, 1.0))
            .unwrap();
        s
    };
    let mut prefill = session();
    prefill.feed(&tokens).unwrap();
    let mut decode = session();
    for &t in &tokens {
        decode.feed(&[t]).unwrap();
    }
    let (a, b) = (prefill.cache(), decode.cache());
    for (il, h) in
        (0..m.config.n_layer).flat_map(|il| (0..m.config.n_head_kv).map(move |h| (il, h)))
    {
        let (ha, hb) = (&a.layers[il].heads[h], &b.layers[il].heads[h]);
        assert_eq!(ha.pos, hb.pos);
        // 256 tokens were scored in two batches; the last 44 wait in the buffer.
        // Layer 0's input (the normed embedding) is the same under both schedules,
        // so its scores are bit-identical; deeper inputs differ by the attention
        // kernels' rounding (tiled for prefill, one query at a time for decode).
        if il == 0 {
            assert_eq!(ha.score[..256], hb.score[..256]);
        } else {
            for (x, y) in ha.score[..256].iter().zip(&hb.score[..256]) {
                assert!((x - y).abs() < 2e-3, "layer {il}: {x} vs {y}");
            }
        }
        assert!(ha.score.iter().all(|&x| x > 0.0 && x < 1.0));
        assert!(hb.score[256..].iter().all(|&x| x == 0.0));
    }

    // A call of 32 tokens or more is scored at once (the short last chunk of a long
    // prefill does not sit in the buffer); a shorter one waits for the batch.
    let mut s = session();
    s.feed(&tokens[..40]).unwrap();
    s.feed(&tokens[40..50]).unwrap();
    for h in s.cache().evictable_heads() {
        assert!(
            h.score[..40].iter().all(|&x| x > 0.0),
            "{:?}",
            &h.score[..40]
        );
        assert!(h.score[40..].iter().all(|&x| x == 0.0));
    }
}
