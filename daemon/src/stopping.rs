//! How a daemon ends: once its stop token is cancelled, its servers finish their calls and
//! the tasks it started end, within a bound, before it lets go of what they used.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// How long a stopping daemon waits for its servers' calls and its tasks (systemd's stop
/// timeout is longer).
pub const STOP_WITHIN: Duration = Duration::from_secs(10);

/// Waits, at most [`STOP_WITHIN`], for `servers` to finish and for every task of `tasks`
/// (closed here) to end; says so if they do not.
pub async fn wait_for<T>(servers: impl IntoIterator<Item = JoinHandle<T>>, tasks: &TaskTracker) {
    tasks.close();
    let ended = async {
        futures::future::join_all(servers).await;
        tasks.wait().await;
    };
    if tokio::time::timeout(STOP_WITHIN, ended).await.is_err() {
        warn!("the servers and tasks did not stop within {STOP_WITHIN:?}");
    }
}
