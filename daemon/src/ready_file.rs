//! `--ready-file`: once a daemon has bound every port, it writes the addresses it bound there
//! as one JSON object (`{"api": "127.0.0.1:40123", ...}`). Whoever started it with port 0
//! (a test, a supervisor) reads the ports from it instead of guessing a free one, which another
//! process can take between the guess and the bind.
//!
//! The file is written to a temporary name beside it and renamed into place, so a reader sees
//! either no file or the whole of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// Removes a file left by an earlier run, so that a reader never takes its ports for this one's.
pub fn clear(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `ports` (name → address bound) to `path`, atomically.
pub fn write(path: &Path, ports: &[(&str, SocketAddr)]) -> std::io::Result<()> {
    let map: BTreeMap<&str, String> = ports.iter().map(|(name, addr)| (*name, addr.to_string())).collect();
    let mut text = serde_json::to_string(&map).map_err(std::io::Error::other)?;
    text.push('\n');
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_port_as_json_and_replaces_an_old_file() {
        let dir = std::env::temp_dir().join(format!("tidal-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ready.json");
        std::fs::write(&path, "stale").unwrap();
        let api: SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let peer: SocketAddr = "[::1]:7001".parse().unwrap();
        write(&path, &[("peer", peer), ("api", api)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"api\":\"127.0.0.1:40123\",\"peer\":\"[::1]:7001\"}\n");
        assert!(!dir.join("ready.json.tmp").exists());
        clear(&path).unwrap();
        assert!(!path.exists());
        clear(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
