//! The `fastkv` binary: parses the command line and reports errors with context.
fn main() {
    if let Err(e) = fastkv::cli::main() {
        // A closed pipe (`fastkv run ... | head`) is the reader's choice, not an error.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
