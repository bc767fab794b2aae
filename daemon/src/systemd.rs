//! systemd's notification protocol (`Type=notify` units): readiness once the daemon serves, a
//! watchdog ping while it is healthy, and STOPPING when it shuts down. Outside systemd (no
//! `NOTIFY_SOCKET`) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, info};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "systemd notification not sent");
    }
}

/// Tells systemd the daemon serves; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    info!(status, "ready");
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd a reload (SIGHUP) is under way, then that it is done.
pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// Tells systemd the daemon is shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// When the unit has a watchdog (`WatchdogSec=`), pings it at a third of its interval for as
/// long as `healthy()` holds; a daemon that hangs or reports itself unhealthy is restarted.
pub fn spawn_watchdog(healthy: impl Fn() -> bool + Send + 'static) {
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let period = (interval / 3).max(Duration::from_millis(10));
    info!(?interval, "systemd watchdog on");
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            if healthy() {
                send(&[NotifyState::Watchdog]);
            }
        }
    });
}

/// Waits for SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
