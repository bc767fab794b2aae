//! The control plane's doors, tried as an adversarial client would against a cluster on mutual
//! TLS (one controller replica, one agent): every forged or unauthorised call is refused —
//! by the TLS handshake, or with UNAUTHENTICATED / PERMISSION_DENIED / INVALID_ARGUMENT — and
//! changes nothing (term, leader, membership, nodes, tasks, the agent's plan), while the
//! legitimate cluster keeps serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{Message as RaftMessage, MessageType};
use tidal_auth::{Role, Security, TlsArgs};
use tidal_common::variant::VariantConfig;
use tidal_proto::v1::agent_client::AgentClient;
use tidal_proto::v1::controller_client::ControllerClient;
use tidal_proto::v1::inference_client::InferenceClient;
use tidal_proto::v1::raft_transport_client::RaftTransportClient;
use tidal_proto::v1::{
    AgentStatusRequest, ApplyPlanRequest, ClusterStatus, ClusterStatusRequest, DrainNodeRequest, InferRequest,
    ListReplicasRequest, ListRevokedRequest, Plan, ProfilePoint, ProfileRequest, RaftBatch, RegisterNodeRequest,
    RegisterTaskRequest, RemoveNodeRequest, RemoveReplicaRequest, RevokeCertificateRequest, RevokedCertificate,
    StoreProfileRequest, VariantProfile, VariantSpec,
};
use tidal_tests::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

/// A CA and one certificate per role in `dir`.
fn certificates(dir: &Path, roles: &[Role]) -> PathBuf {
    let ca = dir.join("ca");
    tidal_auth::certs::init(&ca, "test", 1).expect("a CA");
    for role in roles {
        tidal_auth::certs::issue(&ca, role, &["127.0.0.1".into()], dir, 1).expect("a certificate");
    }
    ca.join("ca.pem")
}

fn tls_args(dir: &Path, role: &Role) -> TlsArgs {
    TlsArgs::issued(dir, role)
}

/// The flags a daemon needs to speak as `role`.
fn tls_flags(dir: &Path, role: &Role) -> Vec<String> {
    tls_args(dir, role).to_flags()
}

/// A channel to `addr` as `role`, retrying until it listens.
async fn channel_as(dir: &Path, role: &Role, addr: &str) -> Channel {
    let endpoint = Security::from_args(&tls_args(dir, role)).unwrap().endpoint(addr).unwrap();
    eventually(Duration::from_secs(20), "the server to listen", || {
        let endpoint = endpoint.clone();
        async move { endpoint.connect().await.ok() }
    })
    .await
}

/// A TLS channel that trusts the CA but shows no certificate of its own.
async fn anonymous(ca: &Path, addr: &str) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls)?.connect().await
}

fn plaintext(addr: &str) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().timeout(Duration::from_secs(2))
}

/// What must not change: the Raft view, and the state every door could touch.
#[derive(Debug, PartialEq)]
struct Observed {
    term: u64,
    leader: u64,
    voters: Vec<u64>,
    nodes: Vec<(String, String, u32)>,
    tasks: Vec<(String, u32)>,
    profiles: usize,
    agent_epoch: u64,
}

async fn observe(ctl: &mut ControllerClient<Channel>, agent: &mut AgentClient<Channel>) -> Observed {
    let replicas = ctl.list_replicas(ListReplicasRequest {}).await.unwrap().into_inner();
    let status: ClusterStatus = ctl.status(ClusterStatusRequest {}).await.unwrap().into_inner();
    Observed {
        term: replicas.term,
        leader: replicas.leader,
        voters: replicas.replicas.iter().filter(|r| r.voter).map(|r| r.id).collect(),
        nodes: status.nodes.iter().map(|n| (n.node.clone(), n.address.clone(), n.cores)).collect(),
        tasks: status.tasks.iter().filter_map(|t| t.spec.as_ref()).map(|t| (t.name.clone(), t.slo_ms)).collect(),
        profiles: status.tasks.iter().map(|t| t.profiles.len()).sum(),
        agent_epoch: agent.status(AgentStatusRequest {}).await.unwrap().into_inner().applied_epoch,
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call must be refused").code()
}

#[test]
fn plaintext_is_asked_for_as_operators_write_it() {
    let _turn = tidal_tests::file_turn(module_path!());
    // Nothing listens at the address: past the flags, the call fails to connect.
    let status = |value: Option<&str>| {
        let mut cmd = std::process::Command::new(bin("tidalctl"));
        cmd.args(["--controller", "127.0.0.1:9", "status"]).env_remove("TIDAL_TLS_CA");
        cmd.env_remove("TIDAL_TLS_CERT").env_remove("TIDAL_TLS_KEY").env_remove("TIDAL_INSECURE_PLAINTEXT");
        if let Some(v) = value {
            cmd.env("TIDAL_INSECURE_PLAINTEXT", v);
        }
        let out = cmd.output().expect("tidalctl runs");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for yes in ["1", "true", "TRUE", "yes", "on"] {
        let err = status(Some(yes));
        assert!(!err.contains("no TLS configured") && !err.contains("invalid value"), "{yes}: {err}");
    }
    for no in [None, Some("0"), Some("false"), Some("off")] {
        assert!(status(no).contains("no TLS configured"), "{no:?}");
    }
    assert!(status(Some("maybe")).contains("invalid value"), "a value that is neither is refused, not taken as yes");
    // Plaintext switched off in the environment does not stand in the way of TLS flags; on,
    // it does, with a reason.
    let with_tls = |value: &str| {
        let out = std::process::Command::new(bin("tidalctl"))
            .args([
                "--controller",
                "127.0.0.1:9",
                "--tls-ca",
                "/nonexistent/ca.pem",
                "--tls-cert",
                "/nonexistent/c.pem",
            ])
            .args(["--tls-key", "/nonexistent/k.pem", "status"])
            .env("TIDAL_INSECURE_PLAINTEXT", value)
            .output()
            .expect("tidalctl runs");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(with_tls("0").contains("/nonexistent/ca.pem"), "the TLS files are read: {}", with_tls("0"));
    assert!(with_tls("1").contains("give one"), "{}", with_tls("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_door_of_the_control_plane_refuses_the_uninvited_and_nothing_changes() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    let (controller, node) = (Role::Controller(1), Role::Agent("node-a".into()));
    let (admin, reader, intruder) = (Role::Admin("ops".into()), Role::Reader("ro".into()), Role::Controller(2));
    let ca = certificates(&certs, &[controller.clone(), node.clone(), admin.clone(), reader.clone(), intruder.clone()]);
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();

    let ctl_args = tls_flags(&certs, &controller);
    let ctl_args: Vec<&str> = ctl_args.iter().map(String::as_str).collect();
    // Plans follow changes (a node, a task, a profile), not the clock, in this test.
    let (_controller, ctl_addr, peer_addr) = start_controller_with_peer_port(work.path(), 3600.0, &ctl_args);
    let agent_args = tls_flags(&certs, &node);
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let agent = start_agent_named(
        work.path(),
        "node-a",
        AgentOpts { model_dir: &models, controller: Some(&ctl_addr), extra: &agent_args },
    );

    // The legitimate cluster: the admin registers a task, the controller plans it, the agent
    // serves it to an anonymous client (inference is open).
    let mut ctl = ControllerClient::new(channel_as(&certs, &admin, &ctl_addr).await);
    let task = tidal_common::task::single_stage("classify", 1000, vec![r18.spec()]);
    eventually(Duration::from_secs(20), "the task to be registered", || {
        let mut ctl = ctl.clone();
        let task = task.clone();
        async move { ctl.register_task(RegisterTaskRequest { task: Some(task), ..Default::default() }).await.ok() }
    })
    .await;

    // tidalctl says what went wrong and what to do, one line, one exit code per kind: an
    // agent's certificate used for an admin call, a key that is not the certificate's own,
    // plaintext against a TLS port.
    let tidalctl = |flags: Vec<String>, args: &[&str]| {
        let out = std::process::Command::new(bin("tidalctl"))
            .env_remove("TIDAL_INSECURE_PLAINTEXT")
            .args(["--controller", &ctl_addr])
            .args(&flags)
            .args(args)
            .output()
            .expect("tidalctl runs");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let set_slo = ["task", "set-slo", "--task", "classify", "--slo-ms", "900"];
    let (exit, err) = tidalctl(tls_flags(&certs, &node), &set_slo);
    assert_eq!(exit, Some(4), "{err}");
    assert!(err.contains("refused tidalctl's certificate") && err.contains("--role admin"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let mut mismatched = tls_flags(&certs, &admin);
    let node_key = tls_flags(&certs, &node);
    let key_at = mismatched.iter().position(|f| f == "--tls-key").unwrap() + 1;
    mismatched[key_at] = node_key[node_key.iter().position(|f| f == "--tls-key").unwrap() + 1].clone();
    let (exit, err) = tidalctl(mismatched, &set_slo);
    assert_eq!(exit, Some(2), "{err}");
    assert!(err.contains("does not belong to the certificate"), "{err}");
    let (exit, err) = tidalctl(vec!["--insecure-plaintext".into()], &["status"]);
    assert_eq!(exit, Some(2), "a setting to change: {err}");
    assert!(err.contains("TLS"), "plaintext against a TLS port says so: {err}");

    // An HTTP/1.1 client over TLS (Python's own ssl and http.client, which requests and httpx
    // build on) on the inference port: it offers http/1.1 beside h2, and REST answers.
    let script = r#"
import http.client, json, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[2])
context.set_alpn_protocols(["http/1.1"])
host, port = sys.argv[1].rsplit(":", 1)
c = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
c.request("GET", "/v2/health/live")
r = c.getresponse()
print(json.dumps({"status": r.status, "body": json.loads(r.read()), "alpn": c.sock.selected_alpn_protocol()}))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &agent.addr])
        .arg(&ca)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "HTTP/1.1 over TLS: {}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got, serde_json::json!({"status": 200, "body": {"live": true}, "alpn": "http/1.1"}));
    let point = ProfilePoint {
        cores: 1,
        batch: 1,
        latency_p50_ms: 5.0,
        latency_p99_ms: 8.0,
        throughput_rps: 150.0,
        ..Default::default()
    };
    let profile = |cores: u32| VariantProfile {
        task: "classify".into(),
        variant: "resnet18".into(),
        node: "node-a".into(),
        points: vec![ProfilePoint { cores, ..point }, ProfilePoint { cores: 2, throughput_rps: 280.0, ..point }],
        ..Default::default()
    };
    ctl.store_profile(StoreProfileRequest { profile: Some(profile(1)) }).await.expect("an admin stores a profile");
    let mut agent_ctl = AgentClient::new(channel_as(&certs, &reader, &agent.control_addr).await);
    eventually(Duration::from_secs(60), "the agent to serve the latest plan", || {
        let (mut agent_ctl, mut ctl) = (agent_ctl.clone(), ctl.clone());
        async move {
            let plan = ctl.status(ClusterStatusRequest {}).await.ok()?.into_inner().plan?;
            let s = agent_ctl.status(AgentStatusRequest {}).await.ok()?.into_inner();
            let serving = !s.workers.is_empty() && s.workers.iter().all(|w| w.ready);
            (serving && s.applied_epoch == plan.epoch && !plan.assignments.is_empty()).then_some(())
        }
    })
    .await;
    let mut infer = InferenceClient::new(anonymous(&ca, &agent.addr).await.expect("inference takes anonymous TLS"));
    let request = InferRequest {
        task: "classify".into(),
        input: Some(sample(&r18.input_shape)),
        budget_ms: 0,
        ..Default::default()
    };
    infer.infer(request.clone()).await.expect("an anonymous client is served");
    let before = observe(&mut ctl, &mut agent_ctl).await;
    assert_eq!(before.leader, 1);

    // Raft's peer port: only a member, as itself.
    let heartbeat = |from: u64| {
        let mut m = RaftMessage::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        (m.from, m.to, m.term) = (from, 1, 101);
        RaftBatch { from, from_address: String::new(), messages: vec![m.write_to_bytes().unwrap()] }
    };
    let plain = RaftTransportClient::new(plaintext(&peer_addr).connect_lazy()).send(heartbeat(1)).await;
    assert!(plain.is_err(), "plaintext reaches no Raft");
    if let Ok(channel) = anonymous(&ca, &peer_addr).await {
        let refused = RaftTransportClient::new(channel).send(heartbeat(1)).await;
        assert!(refused.is_err(), "Raft needs a client certificate");
    }
    let raft_as = |role: &Role| {
        let (certs, peer) = (certs.clone(), peer_addr.clone());
        let role = role.clone();
        async move { RaftTransportClient::new(channel_as(&certs, &role, &peer).await) }
    };
    assert_eq!(code(raft_as(&admin).await.send(heartbeat(1)).await), Code::PermissionDenied, "an admin is no replica");
    assert_eq!(
        code(raft_as(&controller).await.send(heartbeat(1)).await),
        Code::PermissionDenied,
        "a copy of replica 1's own key may not speak to replica 1 as itself (term 101 would force an election)"
    );
    assert_eq!(
        code(raft_as(&intruder).await.send(heartbeat(1)).await),
        Code::PermissionDenied,
        "controller/2 may not speak as replica 1"
    );
    assert_eq!(
        code(raft_as(&intruder).await.send(heartbeat(2)).await),
        Code::PermissionDenied,
        "controller/2 is not a member"
    );

    // The controller's API: agents only as themselves, changes only by admins, all bounded.
    let mut as_node = ControllerClient::new(channel_as(&certs, &node, &ctl_addr).await);
    let register = |name: &str| RegisterNodeRequest {
        node: name.into(),
        address: "127.0.0.9:1".into(),
        control_address: "127.0.0.9:2".into(),
        cores: 64,
        ..Default::default()
    };
    assert_eq!(code(as_node.register_node(register("evil")).await), Code::PermissionDenied);
    let hijack = RegisterNodeRequest { cores: 1 << 20, ..register("node-a") };
    assert_eq!(code(as_node.register_node(hijack).await), Code::InvalidArgument, "cores are bounded");
    let task_of = |name: &str| tidal_common::task::single_stage(name, 100, vec![r18.spec()]);
    let new_task = RegisterTaskRequest { task: Some(task_of("other")), ..Default::default() };
    assert_eq!(code(as_node.register_task(new_task.clone()).await), Code::PermissionDenied);
    let mut as_reader = ControllerClient::new(channel_as(&certs, &reader, &ctl_addr).await);
    assert_eq!(code(as_reader.register_task(new_task).await), Code::PermissionDenied);
    let delete = tidal_proto::v1::DeleteTaskRequest { task: "classify".into() };
    assert_eq!(code(as_reader.delete_task(delete.clone()).await), Code::PermissionDenied, "only admins delete");
    assert_eq!(code(as_node.delete_task(delete).await), Code::PermissionDenied);
    assert_eq!(
        code(as_reader.remove_replica(RemoveReplicaRequest { id: 1, keep_certificate: false }).await),
        Code::PermissionDenied
    );
    as_reader.status(ClusterStatusRequest {}).await.expect("a reader reads");
    // Model files go to agents only.
    let fetch = tidal_proto::v1::FetchModelRequest { model_file: r18.model_file.clone(), sha256: String::new() };
    assert_eq!(code(as_reader.fetch_model(fetch.clone()).await), Code::PermissionDenied, "a reader takes no model");
    assert_eq!(code(ctl.fetch_model(fetch).await), Code::PermissionDenied, "nor does an admin");
    let huge = StoreProfileRequest { profile: Some(profile(1_000_000_000)) };
    assert_eq!(code(ctl.store_profile(huge).await), Code::InvalidArgument, "cores are bounded");
    let bad_name = RegisterTaskRequest { task: Some(task_of("../etc")), ..Default::default() };
    assert_eq!(code(ctl.register_task(bad_name).await), Code::InvalidArgument);
    let no_cert = anonymous(&ca, &ctl_addr).await;
    if let Ok(channel) = no_cert {
        let refused = ControllerClient::new(channel).status(ClusterStatusRequest {}).await;
        assert!(refused.is_err(), "the API needs a client certificate");
    }
    let plain = ControllerClient::new(plaintext(&ctl_addr).connect_lazy()).status(ClusterStatusRequest {}).await;
    assert!(plain.is_err(), "plaintext reaches no API");

    // The agent's control port: plans only from a controller, and bounded; profiling only
    // inside the model directory, of bounded inputs.
    let mut agent_as_admin = AgentClient::new(channel_as(&certs, &admin, &agent.control_addr).await);
    let wipe = |epoch: u64| ApplyPlanRequest {
        plan: Some(Plan { epoch, term: u64::MAX, ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(code(agent_as_admin.apply_plan(wipe(before.agent_epoch)).await), Code::PermissionDenied);
    // Plans only from a replica of the group the agent follows: controller/2 holds a
    // certificate of the cluster's CA but is no member, and its empty plan one epoch ahead
    // would stop the agent's workers and, at term 2^64−1, lock out the real leader's plans.
    let mut agent_as_intruder = AgentClient::new(channel_as(&certs, &intruder, &agent.control_addr).await);
    assert_eq!(
        code(agent_as_intruder.apply_plan(wipe(before.agent_epoch + 1)).await),
        Code::PermissionDenied,
        "controller/2 is not a member"
    );
    // A member too is held to a bounded step ahead of what the agent knows.
    let mut agent_as_member = AgentClient::new(channel_as(&certs, &controller, &agent.control_addr).await);
    assert_eq!(
        code(agent_as_member.apply_plan(wipe(u64::MAX)).await),
        Code::InvalidArgument,
        "an epoch far ahead would lock out every later plan"
    );
    let far_term = ApplyPlanRequest {
        plan: Some(Plan { epoch: before.agent_epoch + 1, term: before.term + 1000, ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(
        code(agent_as_member.apply_plan(far_term).await),
        Code::InvalidArgument,
        "a term far ahead would make the leader's plans look deposed"
    );
    let profile_of = |model_file: &str, input_shape: Vec<i64>| ProfileRequest {
        variant: Some(VariantSpec {
            name: "x".into(),
            model_file: model_file.into(),
            accuracy: 50.0,
            input_shape,
            tensor_names: Default::default(),
            tokenizer_file: String::new(),
            io: None,
            model_sha256: String::new(),
        }),
        cores: vec![1],
        batches: vec![1],
        duration_ms: 200,
        samples: vec![],
        text: None,
    };
    assert_eq!(code(agent_as_admin.profile(profile_of("/etc/shadow", vec![3])).await), Code::InvalidArgument);
    assert_eq!(code(agent_as_admin.profile(profile_of("../x.onnx", vec![3])).await), Code::InvalidArgument);
    assert_eq!(
        code(agent_as_admin.profile(profile_of("resnet18.onnx", vec![1 << 40])).await),
        Code::InvalidArgument,
        "an input of 2^40 elements"
    );
    assert_eq!(
        code(agent_as_admin.profile(profile_of("resnet18.onnx", vec![3, 64, 64])).await),
        Code::InvalidArgument,
        "the model takes 3×32×32"
    );
    assert_eq!(code(agent_ctl.profile(profile_of("resnet18.onnx", vec![3, 32, 32])).await), Code::PermissionDenied);
    let plain = AgentClient::new(plaintext(&agent.control_addr).connect_lazy()).status(AgentStatusRequest {}).await;
    assert!(plain.is_err(), "plaintext reaches no control port");

    // One profile at a time: a second, while the first measures, is refused.
    let long = ProfileRequest { duration_ms: 1500, ..profile_of("resnet18.onnx", vec![3, 32, 32]) };
    let (mut first, mut second) = (agent_as_admin.clone(), agent_as_admin.clone());
    let (measured, refused) = tokio::join!(first.profile(long.clone()), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        second.profile(long.clone()).await
    });
    measured.expect("the first profile is measured");
    assert_eq!(code(refused), Code::ResourceExhausted, "two profiles at once would share the cores");

    // Nothing changed, and the cluster still serves.
    let after = observe(&mut ctl, &mut agent_ctl).await;
    assert_eq!(after, before);
    infer.infer(request).await.expect("still served");

    // Revocation: a reader's certificate, revoked by an admin, opens no door any more — at the
    // controller at once, at the agent once its next telemetry answer brings the list — while
    // another reader's still does.
    let spare = Role::Reader("spare".into());
    tidal_auth::certs::issue(&certs.join("ca"), &spare, &["127.0.0.1".into()], &certs, 1).unwrap();
    let holder = |role: &Role| {
        let (cert, _) = tidal_auth::certs::paths(&certs, role);
        tidal_auth::Holder::of_pem(&std::fs::read(cert).unwrap()).unwrap()
    };
    let revoke = |serial: &str| RevokeCertificateRequest {
        certificate: Some(RevokedCertificate {
            serial: serial.into(),
            identity: "reader/ro".into(),
            reason: "test".into(),
        }),
    };
    assert_eq!(code(as_reader.revoke_certificate(revoke(&holder(&reader).serial)).await), Code::PermissionDenied);
    assert_eq!(code(ctl.revoke_certificate(revoke("not hex")).await), Code::InvalidArgument);
    let list = ctl.revoke_certificate(revoke(&holder(&reader).serial)).await.expect("an admin revokes").into_inner();
    assert_eq!(list.certificates.len(), 1);
    assert_eq!(
        code(as_reader.status(ClusterStatusRequest {}).await),
        Code::Unauthenticated,
        "revoked at the controller"
    );
    let mut as_spare = ControllerClient::new(channel_as(&certs, &spare, &ctl_addr).await);
    as_spare.status(ClusterStatusRequest {}).await.expect("another reader still reads");
    let listed = as_spare.list_revoked(ListRevokedRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.certificates[0].serial, holder(&reader).serial);
    eventually(Duration::from_secs(20), "the agent to refuse the revoked certificate", || {
        let mut agent_ctl = agent_ctl.clone();
        async move {
            let refused = agent_ctl.status(AgentStatusRequest {}).await.err()?;
            (refused.code() == Code::Unauthenticated).then_some(())
        }
    })
    .await;
    let mut agent_as_spare = AgentClient::new(channel_as(&certs, &spare, &agent.control_addr).await);
    agent_as_spare.status(AgentStatusRequest {}).await.expect("another reader still reads the agent");

    // A removed node's certificate is revoked with it: drained, planned out, removed, its
    // agent can no longer speak to the controller as that node.
    ctl.drain_node(DrainNodeRequest { node: "node-a".into(), undrain: false }).await.expect("drained");
    let removed = eventually(Duration::from_secs(30), "the drained node to be removed", || {
        let mut ctl = ctl.clone();
        async move { ctl.remove_node(RemoveNodeRequest { node: "node-a".into(), keep_certificate: false }).await.ok() }
    })
    .await
    .into_inner();
    assert_eq!(removed.revoked.expect("its certificate is revoked").serial, holder(&node).serial);
    assert_eq!(
        code(as_node.register_node(register("node-a")).await),
        Code::Unauthenticated,
        "the node's certificate is revoked"
    );

    // The audit trail: who changed what, and every refusal.
    let log = std::fs::read_to_string(work.path().join("controller.log")).unwrap();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("audit")).collect();
    let has = |words: &[&str]| audit.iter().any(|l| words.iter().all(|w| l.contains(w)));
    assert!(has(&["change committed", "admin/ops", "register task classify"]), "{audit:#?}");
    assert!(has(&["change committed", "admin/ops", "remove node node-a"]), "{audit:#?}");
    assert!(has(&["certificate revoked", "reader/ro"]), "{audit:#?}");
    assert!(has(&["call refused", "PermissionDenied"]), "{audit:#?}");
}

/// Agents started with an inference token serve only requests that carry it, and carry it
/// themselves when they forward a request to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inference_token_keeps_out_who_does_not_have_it() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let token_file = work.path().join("token");
    std::fs::write(&token_file, "s3cret-token-0123456789\n").unwrap();
    let token_flag = token_file.display().to_string();
    let extra = ["--inference-token-file", token_flag.as_str()];
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &extra });
    // `other` lets anyone read metadata (--public-metadata); inference still needs the token.
    let extra_public = [extra[0], extra[1], "--public-metadata"];
    let other = start_agent(work.path(), AgentOpts { model_dir: &models, controller: None, extra: &extra_public });
    // The task's only worker runs on `agent`; `other` forwards to it.
    let mut plan = plan_for(1, &agent.node, "classify", 2000, &[(&r18, 1000, 1)]);
    plan.node_addresses =
        [(agent.node.clone(), agent.addr.clone()), (other.node.clone(), other.addr.clone())].into_iter().collect();
    for a in [&agent, &other] {
        let request = ApplyPlanRequest { plan: Some(plan.clone()), ..Default::default() };
        agent_client(&a.control_addr).await.apply_plan(request).await.unwrap();
    }
    wait_ready(&agent.control_addr, 1).await;

    let mut infer = inference_client(&agent.addr).await;
    let request = |token: Option<&str>| {
        let mut r = tonic::Request::new(InferRequest {
            task: "classify".into(),
            input: Some(sample(&r18.input_shape)),
            budget_ms: 0,
            ..Default::default()
        });
        if let Some(t) = token {
            tidal_auth::Token::new(t).unwrap().attach(r.metadata_mut());
        }
        r
    };
    assert_eq!(code(infer.infer(request(None)).await), Code::Unauthenticated);
    assert_eq!(code(infer.infer(request(Some("s3cret-token-0123456780"))).await), Code::Unauthenticated);
    infer.infer(request(Some("s3cret-token-0123456789"))).await.expect("the token holder is served");
    // V2 over gRPC: every call asks for it; the standard health service does not (probes).
    {
        use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
        use tidal_proto::inference::{ModelMetadataRequest, ServerLiveRequest};
        let mut v2 = GrpcInferenceServiceClient::new(tidal_tests::channel(&agent.addr).await);
        let meta = ModelMetadataRequest { name: "classify".into(), version: String::new() };
        assert_eq!(code(v2.model_metadata(meta.clone()).await), Code::Unauthenticated, "a model's metadata");
        let mut with_token = tonic::Request::new(meta);
        tidal_auth::Token::new("s3cret-token-0123456789").unwrap().attach(with_token.metadata_mut());
        v2.model_metadata(with_token).await.expect("the token holder reads a model's metadata");
        assert_eq!(code(v2.server_live(ServerLiveRequest {}).await), Code::Unauthenticated, "the whole service");
        let mut health = tonic_health::pb::health_client::HealthClient::new(tidal_tests::channel(&agent.addr).await);
        let probe = tonic_health::pb::HealthCheckRequest { service: String::new() };
        health.check(probe).await.expect("grpc.health.v1 needs no token");
    }
    // V2's REST form on the same port asks for the same token.
    if tidal_tests::tls::test_ca().is_none() {
        let rest = |token: &'static str| {
            let addr = agent.addr.clone();
            async move {
                let auth = [("authorization", token)];
                http_exchange(&addr, "GET", "/v2/models/classify", if token.is_empty() { &[] } else { &auth }, b"")
                    .await
                    .0
            }
        };
        assert_eq!(rest("").await, 401);
        assert_eq!(rest("Bearer s3cret-token-0123456780").await, 401);
        assert_eq!(rest("Bearer s3cret-token-0123456789").await, 200);
    } else {
        eprintln!("NOT RUN: the REST part (plaintext HTTP here; TIDAL_TEST_TLS=1 is set)");
    }
    {
        use tidal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
        use tidal_proto::inference::{ModelConfigRequest, ModelInferRequest, ModelMetadataRequest, ServerLiveRequest};
        let mut v2 = GrpcInferenceServiceClient::new(tidal_tests::channel(&other.addr).await);
        let meta = ModelMetadataRequest { name: "classify".into(), version: String::new() };
        v2.model_metadata(meta).await.expect("--public-metadata: a model's metadata without the token");
        v2.model_config(ModelConfigRequest { name: "classify".into(), version: String::new() })
            .await
            .expect("--public-metadata: its configuration");
        v2.server_live(ServerLiveRequest {}).await.expect("--public-metadata: liveness");
        let infer = ModelInferRequest { model_name: "classify".into(), ..Default::default() };
        assert_eq!(code(v2.model_infer(infer).await), Code::Unauthenticated, "inference still needs the token");
        if tidal_tests::tls::test_ca().is_none() {
            let (read, _, _) = http_exchange(&other.addr, "GET", "/v2/models/classify", &[], b"").await;
            let (infer, _, _) = http_exchange(&other.addr, "POST", "/v2/models/classify/infer", &[], b"{}").await;
            assert_eq!((read, infer), (200, 401), "REST alike");
        }
    }
    // Triton's perf_analyzer against the --public-metadata agent: it reads the model's metadata
    // without its headers and sends the token (`-H`) with every inference, over gRPC and REST;
    // without the token it is refused.
    match tidal_tests::outside_clients() {
        Err(why) => eprintln!("NOT RUN: perf_analyzer with an inference token: {why}"),
        Ok(tools) => {
            for (protocol, header) in [
                ("grpc", Some("authorization:Bearer s3cret-token-0123456789")),
                ("http", Some("authorization:Bearer s3cret-token-0123456789")),
                ("grpc", None),
            ] {
                let mut cmd = std::process::Command::new("timeout");
                cmd.arg("120").arg(tools.join("bin/perf_analyzer"));
                cmd.args(["-m", "classify", "-u", &other.addr, "-i", protocol, "--measurement-mode", "count_windows"])
                    .args(["--measurement-request-count", "30", "--max-trials", "3", "-s", "100"]);
                if let Some(h) = header {
                    cmd.args(["-H", h]);
                }
                let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
                let printed =
                    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                if header.is_some() {
                    assert!(out.status.success(), "perf_analyzer {protocol} with the token:\n{printed}");
                    assert!(printed.contains("Inference count"), "{printed}");
                } else {
                    assert!(!out.status.success(), "perf_analyzer {protocol} without the token is refused:\n{printed}");
                    assert!(printed.contains("authorization: Bearer <token>"), "refused for the token:\n{printed}");
                }
            }
        }
    }
    let mut via_other = inference_client(&other.addr).await;
    assert_eq!(code(via_other.infer(request(None)).await), Code::Unauthenticated);
    let forwarded = via_other.infer(request(Some("s3cret-token-0123456789"))).await.expect("forwarded with the token");
    assert_eq!(forwarded.into_inner().node, agent.node, "served by the agent that runs the worker");
}

/// A stage is forwarded only to the agent the plan names at that address: a server there with
/// another identity of the cluster (here a real agent, but not the one the plan names — as a
/// stolen agent certificate, or a reader's, would be) is refused by the handshake and gets
/// neither the request nor its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_is_forwarded_only_to_the_agent_the_plan_names() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    let (a, b, pusher) = (Role::Agent("node-a".into()), Role::Agent("node-b".into()), Role::Controller(1));
    certificates(&certs, &[a.clone(), b.clone(), pusher.clone(), Role::Reader("client".into())]);
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let start = |role: &Role, name: &str| {
        let flags = tls_flags(&certs, role);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        start_agent_named(work.path(), name, AgentOpts { model_dir: &models, controller: None, extra: &flags })
    };
    let (agent_a, agent_b) = (start(&a, "node-a"), start(&b, "node-b"));
    let push = |agent: &Agent, plan: Plan| {
        let (certs, addr, role) = (certs.clone(), agent.control_addr.clone(), pusher.clone());
        async move {
            let request = ApplyPlanRequest { plan: Some(plan), ..Default::default() };
            AgentClient::new(channel_as(&certs, &role, &addr).await).apply_plan(request).await.unwrap();
        }
    };
    // The worker runs on node-b; node-a forwards to it.
    let mut plan = plan_for(1, "node-b", "classify", 2000, &[(&r18, 1000, 1)]);
    plan.node_addresses =
        [("node-a".into(), agent_a.addr.clone()), ("node-b".into(), agent_b.addr.clone())].into_iter().collect();
    push(&agent_b, plan.clone()).await;
    push(&agent_a, plan.clone()).await;
    let client = Role::Reader("client".into());
    let status_b = AgentClient::new(channel_as(&certs, &client, &agent_b.control_addr).await);
    wait_ready_through(status_b, 1).await;
    let mut infer = InferenceClient::new(channel_as(&certs, &client, &agent_a.addr).await);
    let request = || InferRequest {
        task: "classify".into(),
        input: Some(sample(&r18.input_shape)),
        budget_ms: 0,
        ..Default::default()
    };
    let served = infer.infer(request()).await.expect("forwarded to node-b");
    assert_eq!(served.into_inner().node, "node-b");

    // A plan that says node-c serves at node-b's address: node-b's certificate is not node-c's.
    let mut lying = plan_for(2, "node-c", "classify", 2000, &[(&r18, 1000, 1)]);
    lying.node_addresses =
        [("node-a".into(), agent_a.addr.clone()), ("node-c".into(), agent_b.addr.clone())].into_iter().collect();
    push(&agent_a, lying).await;
    let refused = infer.infer(request()).await;
    assert_eq!(code(refused), Code::Unavailable, "not forwarded to a server that is not node-c");
    // The truth again (node-b at its address) and node-a forwards again.
    let mut truth = plan_for(3, "node-b", "classify", 2000, &[(&r18, 1000, 1)]);
    truth.node_addresses = plan.node_addresses.clone();
    push(&agent_a, truth).await;
    let served = infer.infer(request()).await.expect("forwarded to node-b again");
    assert_eq!(served.into_inner().node, "node-b");
}

/// The clients users already run, against an agent over TLS, each as its documentation shows
/// (tests/clients/kserve_check.py): the KServe SDK's REST client over HTTP/1.1 and HTTP/2 and
/// its gRPC client (health, one and two samples, an unknown model), httpx and requests over
/// HTTP/1.1, and gRPC's own health and reflection clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kserve_sdk_httpx_requests_and_grpc_s_own_clients_call_a_tls_agent() {
    let _turn = tidal_tests::file_turn(module_path!());
    let tools = match tidal_tests::client_tools() {
        Ok(d) => d,
        Err(why) => return eprintln!("SKIPPED (not run): {why}"),
    };
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    let (node, pusher) = (Role::Agent("node-a".into()), Role::Controller(1));
    let ca = certificates(&certs, &[node.clone(), pusher.clone()]);
    let models = work.path().join("models");
    generate_models(&models, "resnet18", 32);
    let r18 = VariantConfig::load(&models, "resnet18").unwrap();
    let flags = tls_flags(&certs, &node);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent =
        start_agent_named(work.path(), "node-a", AgentOpts { model_dir: &models, controller: None, extra: &flags });
    let mut control = AgentClient::new(channel_as(&certs, &pusher, &agent.control_addr).await);
    let plan = plan_for(1, "node-a", "classify", 5000, &[(&r18, 1000, 1)]);
    control.apply_plan(ApplyPlanRequest { plan: Some(plan), ..Default::default() }).await.unwrap();
    wait_ready_through(control, 1).await;

    let shape = r18.input_shape.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg("180")
        .arg("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/kserve_check.py"))
        .args(["--url", &agent.addr, "--model", "classify", "--shape", &shape])
        .arg("--ca")
        .arg(&ca)
        .env("PYTHONPATH", tools.join("kserve"));
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kserve_check.py failed:\n{stderr}");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = got.as_object().unwrap();
    let failed: Vec<String> =
        checks.iter().filter(|(_, v)| v["ok"] != true).map(|(k, v)| format!("{k}: {}", v["error"])).collect();
    assert!(failed.is_empty(), "clients that failed:\n{}\n{stderr}", failed.join("\n"));
    for sdk in ["kserve_rest", "kserve_rest_h2", "kserve_grpc"] {
        for check in ["health", "infer_one", "infer_two", "unknown_model"] {
            assert!(checks.contains_key(&format!("{sdk}_{check}")), "{sdk}_{check} not run: {got}");
        }
        assert_eq!(got[format!("{sdk}_infer_two")]["shape"], serde_json::json!([2, 1000]), "{sdk}");
    }
    assert_eq!(got["kserve_rest_unknown_model"]["status"], 404);
    assert!(got["kserve_rest_unknown_model"]["body"]["error"].as_str().is_some_and(|e| e.contains("no-such-model")));
    assert_eq!(got["kserve_grpc_unknown_model"]["code"], "NOT_FOUND");
    assert_eq!(got["httpx"]["http_version"], "HTTP/1.1", "HTTP/1.1 over TLS (ALPN http/1.1)");
    for client in ["httpx", "requests"] {
        assert_eq!(got[client]["ready"], serde_json::json!({ "ready": true }), "{client}");
        assert_eq!(got[client]["shape"], serde_json::json!([1, 1000]), "{client}");
    }
    assert_eq!(
        got["grpc_health"]["statuses"],
        serde_json::json!({ "(server)": "SERVING", "classify": "SERVING", "no-such-service": "NOT_FOUND" })
    );
    let services = got["grpc_reflection"]["services"].as_array().unwrap();
    for service in ["inference.GRPCInferenceService", "grpc.health.v1.Health", "tidal.v1.Inference"] {
        assert!(services.iter().any(|s| s == service), "{service} listed: {services:?}");
    }
    assert!(!services.iter().any(|s| s == "tidal.v1.Controller"), "the inference port does not serve the controller's");
    for service in services {
        let methods = &got["grpc_reflection"]["methods"][service.as_str().unwrap()];
        assert!(methods.as_array().is_some_and(|m| !m.is_empty()), "{service} described by v1alpha: {methods}");
    }
    assert_eq!(got["grpc_reflection"]["methods"]["grpc.health.v1.Health"], serde_json::json!(["Check", "Watch"]));
    assert_eq!(got["grpc_reflection"]["unknown_symbol"], "NOT_FOUND");
    assert_eq!(got["grpc_reflection"]["answers"], 2, "the stream stays open after an unknown symbol");
}
