//! Serves a Prometheus registry at `GET /metrics` (text exposition format), for both daemons.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::{http::header, response::IntoResponse, routing::get, Router};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Binds `addr` and serves `registry` until the process ends.
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match encode(&mut body, &registry) {
                    Ok(()) => {
                        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
                            .into_response()
                    }
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

/// Serves `registry` on `addr` in the background; a failure to bind is logged, not fatal.
pub fn spawn(addr: SocketAddr, registry: Registry) {
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        if let Err(e) = serve(addr, registry).await {
            tracing::error!(%addr, error = %e, "metrics endpoint failed");
        }
    });
}
