//! `codexfs`: parses the command line and dispatches to the commands in `cli`.

mod cli;
mod node_cmd;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CODEXFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,libp2p_kad=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = cli::run(args) {
        eprintln!("codexfs: {}", cli::describe(&e));
        std::process::exit(cli::exit_code(&e));
    }
}
