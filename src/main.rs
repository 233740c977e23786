//! `codexfs`: reads settings (flags, `CODEXFS_*` environment, config file), parses the
//! command line and dispatches to the commands in `cli`.

mod cli;
mod client;
mod config_file;
mod dir_cmd;
mod node_cmd;

use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, EnvFilter};

const DEFAULT_LOG: &str = "warn,libp2p_kad=error";

fn main() {
    if let Err(e) = config_file::apply(&cli::Cli::command()) {
        eprintln!("codexfs: {}", cli::describe(&e));
        std::process::exit(2);
    }
    let args = match cli::Cli::from_arg_matches(&cli::Cli::command().get_matches()) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    let filter =
        EnvFilter::try_from_env("CODEXFS_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let set_log_level: Arc<codexfs::api::LogLevelSetter> = Arc::new(move |level: &str| {
        let directive = log_directive(level)?;
        let filter = EnvFilter::try_new(&directive).map_err(|e| format!("{level:?}: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    if let Err(e) = cli::run(args, Some(set_log_level)) {
        eprintln!("codexfs: {}", cli::describe(&e));
        std::process::exit(cli::exit_code(&e));
    }
}

/// Codex's (chronicles) level names as a tracing filter: TRACE, DEBUG, INFO, NOTICE,
/// WARN, ERROR, FATAL, or a tracing directive as is.
fn log_directive(level: &str) -> Result<String, String> {
    let level = level.trim();
    if level.is_empty() {
        return Err("empty log level".into());
    }
    Ok(match level.to_ascii_uppercase().as_str() {
        "TRACE" => "trace".into(),
        "DEBUG" => "debug".into(),
        "INFO" | "NOTICE" => "info".into(),
        "WARN" => "warn".into(),
        "ERROR" | "FATAL" => "error".into(),
        _ if level.contains('=') => level.to_string(),
        _ => {
            return Err(format!(
                "unknown log level {level:?} (TRACE, DEBUG, INFO, NOTICE, WARN, ERROR, FATAL, \
                 or a directive such as codexfs=debug)"
            ))
        }
    })
}
