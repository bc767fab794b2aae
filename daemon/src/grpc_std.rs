//! The standard gRPC services every Tidal port serves beside its own: `grpc.health.v1.Health`
//! (for load balancers, `grpc_health_probe` and Kubernetes-style probes) and server reflection
//! (for `grpcurl` and other generic clients), v1 and v1alpha.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::server::Router;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
pub use tonic_health::ServingStatus;

/// Adds health (answering from `health`) and reflection (describing `descriptor_sets`, the
/// health and reflection services included) to a server.
pub fn add_standard(
    router: Router,
    health: &HealthReporter,
    descriptor_sets: &[&'static [u8]],
) -> Result<Router, tonic_reflection::server::Error> {
    let builder = || {
        descriptor_sets
            .iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, set| b.register_encoded_file_descriptor_set(set))
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let health_server = HealthServer::new(HealthService::from_health_reporter(health.clone()));
    Ok(router.add_service(health_server).add_service(builder().build_v1()?).add_service(builder().build_v1alpha()?))
}

/// A health reporter whose overall status ("") starts as NOT_SERVING: a daemon says it serves
/// once it does.
pub async fn reporter() -> HealthReporter {
    let health = HealthReporter::new();
    health.set_service_status("", ServingStatus::NotServing).await;
    health
}

/// Keeps `health` in step with `statuses` (service name → serving?), polled every `every`:
/// services that appear are added, those that disappear are removed (a check then answers
/// NOT_FOUND). Runs until the process ends.
pub async fn follow(
    mut health: HealthReporter,
    every: Duration,
    mut statuses: impl FnMut() -> BTreeMap<String, bool> + Send,
) {
    let mut known: BTreeMap<String, bool> = BTreeMap::new();
    loop {
        let now = statuses();
        for name in known.keys().filter(|k| !now.contains_key(*k)) {
            health.clear_service_status(name).await;
        }
        for (name, &serving) in now.iter().filter(|(k, v)| known.get(*k) != Some(*v)) {
            let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
            health.set_service_status(name, status).await;
        }
        known = now;
        tokio::time::sleep(every).await;
    }
}
