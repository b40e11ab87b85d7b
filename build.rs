//! Build information for `fastkv --version`: the git commit the binary was built
//! from, its cargo features and the instruction-set extensions it was compiled for
//! (`FASTKV_BUILD_INFO`, read by src/cli/mod.rs).
use std::path::Path;
use std::process::Command;

/// The SIMD extensions worth naming, in the order they came; the compiler's list of
/// target features holds dozens more.
const SIMD: [&str; 9] = [
    "sse4.2",
    "avx",
    "f16c",
    "fma",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vnni",
    "neon",
];

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let commit = git(&["rev-parse", "--short=12", "HEAD"]);
    // Run again when HEAD moves: a checkout changes HEAD, a commit the ref it names
    // (or packed-refs). Only files that exist are named: cargo would otherwise run
    // this script, and rebuild the crate, on every build.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let dir = Path::new(&dir);
        let mut watch = vec![dir.join("HEAD"), dir.join("packed-refs")];
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(dir.join(head_ref));
        }
        for path in watch.iter().filter(|p| p.is_file()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }

    let features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| {
            let f = k
                .strip_prefix("CARGO_FEATURE_")?
                .to_lowercase()
                .replace('_', "-");
            (f != "default").then_some(f)
        })
        .collect();
    let target_features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let simd: Vec<String> = SIMD
        .into_iter()
        .filter(|f| target_features.split(',').any(|t| t == *f))
        .map(String::from)
        .collect();
    let or_none = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    println!(
        "cargo:rustc-env=FASTKV_BUILD_INFO=commit {}; features: {}; compiled for: {} {}",
        commit
            .as_deref()
            .unwrap_or("unknown (not built from a git checkout)"),
        or_none(&features),
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default(),
        or_none(&simd),
    );
}
