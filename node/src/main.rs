//! `fedq-node`: the hospital node's binary; everything it does is in [`fedq_node::cli`].

fn main() -> std::process::ExitCode {
    fedq_node::cli::main()
}
