//! How tidalctl prints what it reads: aligned tables for people, JSON or YAML (the API's own
//! messages) for scripts; and which exit code says what went wrong.

use comfy_table::{presets, CellAlignment, ContentArrangement, Table};
use serde::Serialize;

/// `-o` / `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, for reading.
    #[default]
    Table,
    /// The API's messages as JSON (one document).
    Json,
    /// The API's messages as YAML.
    Yaml,
}

/// Prints `value` as JSON or YAML; `table` renders it for `--output table`.
pub fn print<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    match format {
        Format::Table => print!("{}", table(value)),
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
    }
    Ok(())
}

/// A borderless table whose columns fit their longest cell; numbers right-aligned.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
    // A trailing '#' marks a numeric column (right-aligned); it is not shown.
    t.set_header(header.iter().map(|h| h.trim_end_matches('#').to_string()));
    for row in rows {
        t.add_row(row);
    }
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        let numeric = header.get(i).is_some_and(|h| h.ends_with('#') || h.ends_with("/s") || h.ends_with("ms"));
        if numeric {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let text = t.to_string();
    let mut out: String = text.lines().map(|l| l.trim_end().to_string() + "\n").collect();
    if out.is_empty() {
        out.push('\n');
    }
    out
}

/// Exit codes, so that scripts can tell failures apart.
pub mod exit {
    /// Bad input: flags, files, or a request the cluster rejects as invalid (also clap's own).
    pub const INVALID: i32 = 2;
    /// No controller or agent answered (connection refused, timeout, no leader).
    pub const UNREACHABLE: i32 = 3;
    /// The cluster refused: not authenticated, not allowed, or not in a state to do it.
    pub const REFUSED: i32 = 4;
    /// A change was sent and then not answered: it may or may not have taken effect (read
    /// the state before sending it again).
    pub const OUTCOME_UNKNOWN: i32 = 5;
}

/// The exit code for an error: the gRPC status or transport error anywhere in its chain
/// decides; anything else is 1.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    use tonic::Code;
    if error.downcast_ref::<crate::connect::TlsMismatch>().is_some() {
        return exit::INVALID;
    }
    for cause in error.chain() {
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            return match status.code() {
                Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::OutOfRange => exit::INVALID,
                Code::Unavailable | Code::DeadlineExceeded => exit::UNREACHABLE,
                Code::Unauthenticated | Code::PermissionDenied | Code::FailedPrecondition => exit::REFUSED,
                Code::Unknown => exit::OUTCOME_UNKNOWN,
                _ => 1,
            };
        }
        if cause.downcast_ref::<tonic::transport::Error>().is_some()
            || cause.downcast_ref::<crate::connect::Unreachable>().is_some()
        {
            return exit::UNREACHABLE;
        }
        if cause.downcast_ref::<tidal_auth::tls::TlsError>().is_some() {
            return exit::INVALID;
        }
    }
    1
}

/// An error as one line, each cause once: a gRPC status by its message and code (its own
/// source, which tonic prints inside the status too, is left out), and a cause that repeats
/// the one before it skipped.
pub fn describe(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            let message = status.message().trim();
            let message = if message.is_empty() { status.code().description() } else { message };
            parts.push(format!("{message} [{:?}]", status.code()));
            break;
        }
        let text = cause.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_the_longest_cell() {
        let t = table(
            &["NODE", "CORES#"],
            vec![vec!["a".into(), "2".into()], vec!["a-much-longer-name".into(), "16".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        let col = |l: &str| l.find(|c: char| c.is_ascii_digit() || c == 'C').unwrap();
        assert_eq!(lines.len(), 3, "{t}");
        // The second column starts at the same place on every line, after the longest name.
        assert!(lines[0].starts_with("NODE") && col(lines[0]) > "a-much-longer-name".len(), "{t}");
        assert!(lines[1].ends_with(" 2") && lines[2].ends_with("16"), "numbers right-aligned:\n{t}");
        assert_eq!(lines[1].len(), lines[2].len(), "{t}");
    }

    #[test]
    fn statuses_map_to_distinct_exit_codes() {
        let err = |code| anyhow::Error::new(tonic::Status::new(code, "x")).context("doing something");
        assert_eq!(exit_code(&err(tonic::Code::InvalidArgument)), exit::INVALID);
        assert_eq!(exit_code(&err(tonic::Code::Unavailable)), exit::UNREACHABLE);
        assert_eq!(exit_code(&err(tonic::Code::PermissionDenied)), exit::REFUSED);
        assert_eq!(exit_code(&anyhow::anyhow!("something else")), 1);
    }

    #[test]
    fn an_error_reads_as_one_line_with_each_cause_once() {
        let status = tonic::Status::permission_denied("agent node-1 may not call SetSlo");
        let e = anyhow::Error::new(status).context("setting the SLO");
        assert_eq!(describe(&e), "setting the SLO: agent node-1 may not call SetSlo [PermissionDenied]");
        assert_eq!(exit_code(&e), exit::REFUSED);
        let unknown = anyhow::Error::new(tonic::Status::unknown("proposed, no answer"));
        assert_eq!(exit_code(&unknown), exit::OUTCOME_UNKNOWN);
        let io = std::io::Error::other("connection refused");
        let e = anyhow::Error::new(io).context("connection refused").context("connecting to 10.0.0.1:7000");
        assert_eq!(describe(&e), "connecting to 10.0.0.1:7000: connection refused");
        let silent = anyhow::Error::new(crate::connect::Unreachable("no answer".into()));
        assert_eq!(exit_code(&silent), exit::UNREACHABLE);
    }
}
