//! Generates Rust bindings for ggml's public headers.
//!
//! ggml itself is compiled (with cmake) by `llama-cpp-sys-2`, which also builds
//! llama.cpp. That crate exports `DEP_LLAMA_GGML_CMAKE_DIR` (its installed
//! `lib/cmake` folder); the installed headers sit in `../../include` from there.
//! Using that one build means one copy of ggml in the program, and llama.cpp as a
//! reference built from the very same ggml source.
use std::env;
use std::path::PathBuf;

fn main() {
    let cmake_dir = env::var("DEP_LLAMA_GGML_CMAKE_DIR").expect(
        "DEP_LLAMA_GGML_CMAKE_DIR is not set: llama-cpp-sys-2 did not install ggml's cmake package",
    );
    let include = PathBuf::from(&cmake_dir).join("../../include");
    let include = include
        .canonicalize()
        .unwrap_or_else(|e| panic!("ggml include dir {} not found: {e}", include.display()));

    let headers = [
        "ggml.h",
        "ggml-cpu.h",
        "ggml-backend.h",
        "ggml-alloc.h",
        "gguf.h",
    ];
    let mut builder = bindgen::Builder::default()
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("ggml_.*|gguf_.*")
        .allowlist_type("ggml_.*|gguf_.*")
        .allowlist_var("GGML_.*|GGUF_.*")
        .prepend_enum_name(false)
        .layout_tests(false)
        .derive_default(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for h in headers {
        let path = include.join(h);
        assert!(path.is_file(), "missing ggml header {}", path.display());
        builder = builder.header(path.to_string_lossy());
    }
    let bindings = builder.generate().expect("bindgen failed on ggml headers");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("ggml_bindings.rs");
    bindings.write_to_file(&out).expect("cannot write bindings");
}
