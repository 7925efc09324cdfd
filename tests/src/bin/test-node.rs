//! The `fedq-node` program under another name, so end-to-end tests can start it as a real
//! process (Cargo exposes only a test's own package's binaries to it).

fn main() -> std::process::ExitCode {
    fedq_node::cli::main()
}
