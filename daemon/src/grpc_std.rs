//! The standard gRPC services every Tidal port serves beside its own: `grpc.health.v1.Health`
//! (for load balancers, `grpc_health_probe` and Kubernetes-style probes) and server reflection
//! (for `grpcurl` and other generic clients), v1 and v1alpha (`crate::reflection`).
//!
//! Health answers as the protocol's document says (grpc/grpc `doc/health-checking.md`): `Check`
//! on a service the daemon does not name is NOT_FOUND; `Watch` on one sends SERVICE_UNKNOWN
//! and stays open, sending the service's status when it appears, changes or goes.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tonic::transport::server::Router;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus as Answer;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::{v1, v1alpha};

use crate::reflection::{Index, ReflectionV1, ReflectionV1alpha};

/// Each named service's status (serving or not), written by one task ([`follow`]).
pub struct Statuses(watch::Sender<BTreeMap<String, bool>>);

/// The health service: reads what [`Statuses`] last wrote. Cheap to clone (one per port).
#[derive(Clone)]
pub struct Health(watch::Receiver<BTreeMap<String, bool>>);

/// The writer and the service, with the overall status ("") NOT_SERVING: a daemon says it
/// serves once it does.
pub fn health() -> (Statuses, Health) {
    let (tx, rx) = watch::channel(BTreeMap::from([(String::new(), false)]));
    (Statuses(tx), Health(rx))
}

/// The protocol's answer about `service` (SERVICE_UNKNOWN: not named here).
fn status_of(statuses: &BTreeMap<String, bool>, service: &str) -> Answer {
    match statuses.get(service) {
        Some(true) => Answer::Serving,
        Some(false) => Answer::NotServing,
        None => Answer::ServiceUnknown,
    }
}

fn answer(status: Answer) -> HealthCheckResponse {
    HealthCheckResponse { status: status as i32 }
}

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for Health {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match status_of(&self.0.borrow(), &service) {
            Answer::ServiceUnknown => Err(Status::not_found(format!("no service {service:?} here"))),
            status => Ok(Response::new(answer(status))),
        }
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        // The current status first, then each change of it (not every change of the others).
        let stream = futures::stream::unfold((self.0.clone(), None), move |(mut rx, last)| {
            let service = service.clone();
            async move {
                loop {
                    let now = status_of(&rx.borrow_and_update(), &service);
                    if last != Some(now) {
                        return Some((Ok(answer(now)), (rx, Some(now))));
                    }
                    // The writer is gone only when the daemon stops: the stream ends with it.
                    rx.changed().await.ok()?;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Adds health (answering from `health`) and reflection to a server. Reflection lists the
/// services this port serves, `services` and the standard ones, and describes every message
/// of `descriptor_sets` (a set may hold services another port serves: they are not listed).
pub fn add_standard(
    router: Router,
    health: &Health,
    services: &[&str],
    descriptor_sets: &[&'static [u8]],
) -> Result<Router, crate::reflection::IndexError> {
    const STANDARD: [&str; 3] =
        ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];
    let listed = services.iter().chain(STANDARD.iter()).map(|s| s.to_string()).collect();
    let index = Arc::new(Index::new(listed, descriptor_sets)?);
    Ok(router
        .add_service(HealthServer::new(health.clone()))
        .add_service(v1::server_reflection_server::ServerReflectionServer::new(ReflectionV1(index.clone())))
        .add_service(v1alpha::server_reflection_server::ServerReflectionServer::new(ReflectionV1alpha(index))))
}

/// Keeps `health` in step with `statuses` (service name → serving?), looked at every `every`:
/// services appear and go as `statuses` names them. Runs until the process ends.
pub async fn follow(health: Statuses, every: Duration, mut statuses: impl FnMut() -> BTreeMap<String, bool> + Send) {
    loop {
        let now = statuses();
        // Watchers wake only on a change.
        health.0.send_if_modified(|known| {
            let changed = *known != now;
            if changed {
                *known = now;
            }
            changed
        });
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tonic_health::pb::health_server::Health as _;

    fn request(service: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest { service: service.into() })
    }

    async fn next(watch: &mut <Health as tonic_health::pb::health_server::Health>::WatchStream) -> i32 {
        let got = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
        got.expect("an answer in time").expect("the stream open").unwrap().status
    }

    #[tokio::test]
    async fn watch_stays_open_through_unknown_and_sends_only_changes() {
        let (statuses, health) = health();
        let mut watch = health.watch(request("task")).await.unwrap().into_inner();
        assert_eq!(next(&mut watch).await, Answer::ServiceUnknown as i32);
        assert!(health.check(request("task")).await.is_err_and(|s| s.code() == tonic::Code::NotFound));
        // Another service changing sends nothing; this one appearing does.
        let set = |pairs: &[(&str, bool)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>();
        statuses.0.send_replace(set(&[("", true)]));
        statuses.0.send_replace(set(&[("", true), ("task", true)]));
        assert_eq!(next(&mut watch).await, Answer::Serving as i32);
        statuses.0.send_replace(set(&[("", true)]));
        assert_eq!(
            next(&mut watch).await,
            Answer::ServiceUnknown as i32,
            "a service that goes is unknown again, not an end"
        );
        assert_eq!(health.check(request("")).await.unwrap().into_inner().status, Answer::Serving as i32);
    }
}
