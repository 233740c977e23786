//! The optional TOML settings file. Its keys are the long option names (`data-dir`,
//! `quota`, `listen`, …); each one that the environment does not already set becomes the
//! option's `CODEXFS_*` variable, so clap applies the order flags > environment > file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// The file named by `--config`, `CODEXFS_CONFIG`, or the default
/// `$XDG_CONFIG_HOME/codexfs/config.toml` when it exists.
fn config_path() -> Option<(PathBuf, bool)> {
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy().into_owned();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return args.next().map(|p| (PathBuf::from(p), true));
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some((PathBuf::from(p), true));
        }
    }
    if let Some(p) = std::env::var_os("CODEXFS_CONFIG").filter(|p| !p.is_empty()) {
        return Some((PathBuf::from(p), true));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some((base.join("codexfs/config.toml"), false))
}

/// Every option that has an environment variable, by long name, over all subcommands.
fn settings(command: &clap::Command, out: &mut BTreeMap<String, String>) {
    for arg in command.get_arguments() {
        if let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) {
            if long != "config" {
                out.insert(long.to_string(), env.to_string_lossy().into_owned());
            }
        }
    }
    for sub in command.get_subcommands() {
        settings(sub, out);
    }
}

fn value_text(key: &str, value: &toml::Value) -> Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| value_text(key, v))
            .collect::<Result<Vec<_>>>()?
            .join(","),
        _ => bail!("setting {key}: expected a string, number, boolean or list"),
    })
}

/// Reads the settings file, if any, into the environment.
pub fn apply(command: &clap::Command) -> Result<()> {
    let Some((path, named)) = config_path() else {
        return Ok(());
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading config file {}", path.display())),
    };
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config file {}", path.display()))?;
    let mut known = BTreeMap::new();
    settings(command, &mut known);
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(env) = known.get(&long) else {
            bail!(
                "config file {}: unknown setting {key:?} (known: {})",
                path.display(),
                known.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        if std::env::var_os(env).is_none() {
            std::env::set_var(env, value_text(key, value)?);
        }
    }
    Ok(())
}
