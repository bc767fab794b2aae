//! Log set-up shared by the three binaries: `RUST_LOG` if set, else `default`; colours only
//! on a terminal, so log files stay plain text.

use std::io::IsTerminal;

pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
