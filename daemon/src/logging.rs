//! Log set-up shared by the daemons: a filter in `RUST_LOG` syntax, from a file that SIGHUP
//! (`systemctl reload`) re-reads, else `RUST_LOG`, else a default; text (colours only on a
//! terminal, so log files stay plain) or one JSON object per line for log collectors.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

/// The daemons' logging flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "TIDAL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// A file holding the log filter in RUST_LOG syntax (e.g. `info,tidal_agent=debug`),
    /// read at start and again on SIGHUP (`systemctl reload`). Without it: RUST_LOG, else the
    /// daemon's default.
    #[arg(long, env = "TIDAL_LOG_FILTER_FILE")]
    pub log_filter_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("reading the log filter file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the log filter in {path} is not valid: {source}")]
    Parse { path: PathBuf, source: tracing_subscriber::filter::ParseError },
}

fn filter_from_file(path: &Path) -> Result<EnvFilter, LogError> {
    let text = std::fs::read_to_string(path).map_err(|source| LogError::Read { path: path.into(), source })?;
    EnvFilter::try_new(text.trim()).map_err(|source| LogError::Parse { path: path.into(), source })
}

/// Installs the global subscriber. A filter file that cannot be read fails the start (an
/// operator asked for it); without one, `RUST_LOG` or `default` applies.
pub fn init(args: &LogArgs, default: &str) -> Result<LogReload, LogError> {
    let filter = match &args.log_filter_file {
        Some(path) => filter_from_file(path)?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let stderr = std::io::stderr;
    match args.log_format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(stderr))
            .init(),
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json().with_writer(stderr)).init(),
    }
    Ok(LogReload { handle, file: args.log_filter_file.clone() })
}

/// Plain text logs to stderr filtered by `RUST_LOG` or `default`, for command-line tools.
pub fn init_plain(default: &str) {
    let args = LogArgs { log_format: LogFormat::Text, log_filter_file: None };
    // Without a filter file there is nothing that can fail.
    let _ = init(&args, default);
}

/// Re-reads the filter file when asked.
pub struct LogReload {
    handle: reload::Handle<EnvFilter, Registry>,
    file: Option<PathBuf>,
}

impl LogReload {
    /// Re-reads the filter file; a bad file keeps the filter in force.
    pub fn reload(&self) {
        let Some(path) = &self.file else {
            tracing::info!("reload: no --log-filter-file, nothing to re-read");
            return;
        };
        match filter_from_file(path).map(|f| self.handle.reload(f)) {
            Ok(Ok(())) => tracing::info!(file = %path.display(), "log filter reloaded"),
            Ok(Err(e)) => tracing::warn!(error = %e, "log filter not reloaded"),
            Err(e) => tracing::warn!(error = %e, "log filter not reloaded; the old one stays"),
        }
    }

    /// Reloads on every SIGHUP (systemd's `ExecReload`), which would otherwise end the process.
    pub fn spawn_on_sighup(self) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload is unavailable");
                return;
            }
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                crate::systemd::reloading();
                self.reload();
                crate::systemd::reloaded();
            }
        });
    }
}
