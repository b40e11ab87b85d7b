//! Gate files (`--gates`, and those found next to a model): read on their own and
//! checked against a tiny model; gates that load must score.
#![no_main]
use fastkv::gate::Gates;
use libfuzzer_sys::fuzz_target;

// Shared state is loaded before the first input, so no input pays for it.
fuzz_target!(init: {
    fastkv_fuzz::tiny_llama();
}, |data: &[u8]| {
    let path = fastkv_fuzz::scratch_file("gates.gguf", data);
    let _ = Gates::open(&path);
    let model = fastkv_fuzz::tiny_llama();
    let Ok(gates) = Gates::load(&path, model) else {
        return;
    };
    let shape = *gates.shape();
    let x = vec![0.5f32; shape.n_embd];
    for (_, layer) in gates.gated() {
        let mut out = vec![0f32; shape.n_head_kv];
        layer.score(&shape, &x, &mut out);
        assert!(out.iter().all(|p| (0.0..=1.0).contains(p)), "gate scores lie in [0, 1]");
    }
});
