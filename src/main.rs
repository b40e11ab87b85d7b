//! The `fastkv` binary: parses the command line and reports errors with context.
fn main() {
    if let Err(e) = fastkv::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
