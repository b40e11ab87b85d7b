//! CI must not pass having checked nothing: a test that lacks a model, a data file or
//! a tool skips through `common::skip`, which fails instead under
//! FASTKV_REQUIRE_FIXTURES (set by `.ci/run`).
mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Called only from [`a_missing_fixture_fails_under_the_switch`], in a child process.
#[test]
#[ignore = "run by a_missing_fixture_fails_under_the_switch in a child process"]
fn skip_probe() {
    skip("the probe's fixture");
}

fn probe(require: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["skip_probe", "--exact", "--ignored", "--nocapture"]);
    cmd.env_remove(REQUIRE_FIXTURES);
    if let Some(v) = require {
        cmd.env(REQUIRE_FIXTURES, v);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_missing_fixture_fails_under_the_switch() {
    let (ok, text) = probe(None);
    assert!(ok, "{text}");
    assert!(text.contains("SKIP: the probe's fixture"), "{text}");
    assert!(text.contains("1 passed"), "{text}");

    let (ok, text) = probe(Some("0"));
    assert!(ok, "{text}");

    let (ok, text) = probe(Some("1"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("the probe's fixture (FASTKV_REQUIRE_FIXTURES is set"),
        "{text}"
    );
}

#[test]
fn the_switch_reads_set_and_not_zero() {
    assert!(fixtures_required(Some("1")));
    assert!(fixtures_required(Some("yes")));
    assert!(!fixtures_required(Some("0")));
    assert!(!fixtures_required(Some("")));
    assert!(!fixtures_required(None));
}

/// Every early return for a missing prerequisite goes through `skip`, and CI sets the
/// switch before the README's test command.
#[test]
fn ci_sets_the_switch_and_no_test_skips_on_its_own() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(root.join("tests")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") && path.file_name().unwrap() != "fixtures.rs"
        {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                !text.contains("\"SKIP"),
                "{} prints SKIP itself; call common::skip",
                path.display()
            );
        }
    }
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let switch = ci
        .find("export FASTKV_REQUIRE_FIXTURES=1")
        .expect(".ci/run sets FASTKV_REQUIRE_FIXTURES=1");
    let test = ci
        .find("cargo test --release")
        .expect(".ci/run runs the tests");
    assert!(
        switch < test,
        ".ci/run sets the switch after running the tests"
    );
}
