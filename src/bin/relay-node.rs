//! `relay-node`: runs a roamsync relay.
//!
//! ```text
//! relay-node --data DIR [--listen 0.0.0.0:4433] [--config relay.toml]
//!            [--quota-bytes N] [--rate-per-s N] [--durability full|normal]
//! ```
//!
//! A TOML file given with `--config` may set the same fields (`data`, `listen`, `quota_bytes`,
//! `rate_per_s`, `durability`); the command line wins. Logs go to stderr, filtered by
//! `RUST_LOG` (default `info`). Once serving, the relay prints
//! `relay-node listening on <relay key>@host:port` on stdout: that is the address devices use.
//! SIGINT or SIGTERM stop it gracefully.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use roamsync::relay::limits::RelayLimits;
use roamsync::relay::server::{Relay, RelayConfig};
use roamsync::store::Durability;
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// Default listen address.
const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// The burst a `--rate-per-s` allows, as a multiple of the rate.
const BURST_PER_RATE: u64 = 2;

/// Runs a roamsync relay: store-and-forward of sealed envelopes between devices over QUIC.
#[derive(Debug, Parser)]
#[command(name = "relay-node", version)]
struct Cli {
    /// Directory of the relay's store and key (created if missing).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// UDP address to listen on [default: 0.0.0.0:4433].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// A TOML file with any of the settings; the command line wins.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Bytes of stored envelopes each account may use [default: 1 GiB].
    #[arg(long, value_name = "N")]
    quota_bytes: Option<u64>,
    /// Requests per second each connection may send (bursts of twice as many) [default: 50000].
    #[arg(long, value_name = "N")]
    rate_per_s: Option<u64>,
    /// `full`: every acknowledged write survives power loss; `normal`: it survives a crash of
    /// the process only [default: full].
    #[arg(long, value_enum)]
    durability: Option<DurabilityArg>,
}

/// The settings a config file may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data: Option<PathBuf>,
    listen: Option<SocketAddr>,
    quota_bytes: Option<u64>,
    rate_per_s: Option<u64>,
    durability: Option<DurabilityArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DurabilityArg {
    Full,
    Normal,
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("no data directory: pass --data DIR or set `data` in the config file")]
    NoDataDir,
}

fn relay_config(cli: Cli) -> Result<RelayConfig, ConfigError> {
    let file = match &cli.config {
        None => FileConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.clone(),
                source: Box::new(source),
            })?
        }
    };
    let data = cli.data.or(file.data).ok_or(ConfigError::NoDataDir)?;
    let listen = cli
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("the default address parses"));
    let mut config = RelayConfig::new(data, listen);
    let defaults = RelayLimits::default();
    if let Some(rate) = cli.rate_per_s.or(file.rate_per_s) {
        config.limits.rate_per_s = rate;
        config.limits.burst = rate.saturating_mul(BURST_PER_RATE);
    }
    config.limits.quota_bytes = cli
        .quota_bytes
        .or(file.quota_bytes)
        .unwrap_or(defaults.quota_bytes);
    config.durability = match cli.durability.or(file.durability) {
        Some(DurabilityArg::Normal) => Durability::Normal,
        Some(DurabilityArg::Full) | None => Durability::Full,
    };
    Ok(config)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match relay_config(Cli::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("relay-node: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("relay-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: RelayConfig) -> ExitCode {
    tracing::info!(data = %config.data_dir.display(), listen = %config.listen, limits = ?config.limits, durability = ?config.durability, "starting");
    let mut relay = match Relay::start(config).await {
        Ok(relay) => relay,
        Err(e) => {
            tracing::error!(error = %e, "the relay did not start");
            eprintln!("relay-node: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    let printed =
        writeln!(stdout, "relay-node listening on {}", relay.addr()).and_then(|()| stdout.flush());
    if let Err(e) = printed {
        tracing::warn!(error = %e, "cannot print the address");
    }
    tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!(signal, "stopping");
            relay.shutdown().await;
            ExitCode::SUCCESS
        }
        result = relay.stopped() => {
            if let Err(e) = result {
                tracing::error!(error = %e, "the relay stopped");
                eprintln!("relay-node: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Waits for SIGINT or SIGTERM; returns its name.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "data = \"/from/file\"\nlisten = \"127.0.0.1:1\"\nquota_bytes = 5\nrate_per_s = 7\ndurability = \"normal\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "relay-node",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:2",
            "--rate-per-s",
            "100",
        ]);
        let config = relay_config(cli).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/file"));
        assert_eq!(config.listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(config.limits.quota_bytes, 5);
        assert_eq!((config.limits.rate_per_s, config.limits.burst), (100, 200));
        assert_eq!(config.durability, Durability::Normal);
        std::fs::write(&file, "nonsense = 1\n").unwrap();
        let cli = Cli::parse_from(["relay-node", "--config", file.to_str().unwrap()]);
        assert!(matches!(relay_config(cli), Err(ConfigError::Parse { .. })));
        let cli = Cli::parse_from(["relay-node"]);
        assert!(matches!(relay_config(cli), Err(ConfigError::NoDataDir)));
    }
}
