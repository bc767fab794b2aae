//! The daemons' HTTP side port: Prometheus metrics at `GET /metrics`, liveness at
//! `GET /healthz` and readiness at `GET /readyz` (200 when the daemon serves, 503 before).
//!
//! Metrics are kept in a `prometheus-client` registry, which encodes OpenMetrics; a scraper
//! that asks for OpenMetrics gets it, anyone else the classic text format (version 0.0.4),
//! which `promtool check metrics` and most tools read.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{routing::get, Router};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the daemon serves (what `/readyz` answers).
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct Endpoint {
    registry: Arc<Registry>,
    ready: Readiness,
}

/// Adds what every daemon exports: `tidal_build_info` and the standard `process_*` metrics.
pub fn register_standard(registry: &mut Registry, component: &'static str) {
    let info = Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("component", component)]);
    registry.register("tidal_build", "Version of the running build (always 1)", info);
    registry.register_collector(Box::new(ProcessCollector));
}

fn router(registry: Arc<Registry>, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Endpoint { registry, ready })
}

/// Binds `addr` (port 0 picks a free port) under `limits` and serves `registry` there in the
/// background; returns the address bound, so that a port in use fails the start and port 0
/// can be reported.
pub async fn spawn(
    addr: SocketAddr,
    limits: crate::edge::EdgeLimits,
    registry: Registry,
    ready: Readiness,
) -> std::io::Result<SocketAddr> {
    let listener = crate::edge::EdgeListener::bind(addr, limits, "metrics")?;
    let bound = listener.local_addr()?;
    let app = router(Arc::new(registry), ready);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(addr = %bound, error = %e, "metrics endpoint failed");
        }
    });
    Ok(bound)
}

async fn readyz(State(endpoint): State<Endpoint>) -> Response {
    if (endpoint.ready)() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(endpoint): State<Endpoint>, headers: HeaderMap) -> Response {
    let mut body = String::new();
    if let Err(e) = encode(&mut body, &endpoint.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if wants_openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
    } else {
        ([(header::CONTENT_TYPE, TEXT)], openmetrics_to_text(&body)).into_response()
    }
}

/// OpenMetrics text as the classic Prometheus text format: counter families are named with
/// their `_total` suffix, info families become gauges named `_info`, and the UNIT and EOF
/// lines (which the classic format lacks) go.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut renamed: Vec<(String, String, &str)> = Vec::new();
    for line in openmetrics.lines() {
        let mut words = line.strip_prefix("# TYPE ").unwrap_or_default().split(' ');
        match (words.next(), words.next()) {
            (Some(name), Some("counter")) => renamed.push((name.into(), format!("{name}_total"), "counter")),
            (Some(name), Some("info")) => renamed.push((name.into(), format!("{name}_info"), "gauge")),
            (Some(name), Some("unknown")) => renamed.push((name.into(), name.into(), "untyped")),
            _ => {}
        }
    }
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let (_, new_name, new_type) = renamed.iter().find(|(old, _, _)| old == name)?;
            Some(if *prefix == "# TYPE " {
                format!("# TYPE {new_name} {new_type}")
            } else {
                format!("# HELP {new_name} {tail}")
            })
        });
        text.push_str(rewritten.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

/// The standard `process_*` metrics of this process (read from /proc on each scrape).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = metrics_process::collector::collect();
        if let Some(v) = m.cpu_seconds_total {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        let gauges: [(&str, &str, Option<Unit>, Option<u64>); 6] = [
            ("process_open_fds", "Number of open file descriptors", None, m.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors", None, m.max_fds),
            ("process_virtual_memory", "Virtual memory size in bytes", Some(Unit::Bytes), m.virtual_memory_bytes),
            ("process_resident_memory", "Resident memory size in bytes", Some(Unit::Bytes), m.resident_memory_bytes),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch in seconds",
                Some(Unit::Seconds),
                m.start_time_seconds,
            ),
            ("process_threads", "Number of OS threads in the process", None, m.threads),
        ];
        for (name, help, unit, value) in gauges {
            let Some(v) = value else { continue };
            let g = ConstGauge::new(v as i64);
            g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn openmetrics_becomes_classic_text_with_total_counters_and_info_gauges() {
        let mut registry = Registry::default();
        register_standard(&mut registry, "test");
        let requests: Counter = Counter::default();
        requests.inc();
        registry.register("tidal_requests", "Requests", requests);
        let mut om = String::new();
        encode(&mut om, &registry).unwrap();
        let text = openmetrics_to_text(&om);
        assert!(text.contains("# TYPE tidal_requests_total counter\n"), "{text}");
        assert!(text.contains("# HELP tidal_requests_total Requests.\n"), "{text}");
        assert!(text.contains("tidal_requests_total 1\n"), "{text}");
        assert!(text.contains("# TYPE tidal_build_info gauge\n"), "{text}");
        assert!(text.contains("tidal_build_info{version="), "{text}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
    }
}
