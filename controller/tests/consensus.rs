//! The consensus layer alone: three in-process replicas over the real gRPC transport.

use std::time::Duration;

use tidal_controller::consensus::ProposeError;
use tidal_controller::local::{start_local_group, wait_leader};
use tidal_proto::v1::{command::Change, Command, VariantSpec};

fn register(name: &str) -> Command {
    let variant = VariantSpec {
        name: "v".into(),
        model_file: "v.onnx".into(),
        accuracy: 70.0,
        input_shape: vec![3],
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    };
    Command { change: Some(Change::RegisterTask(tidal_common::task::single_stage(name, 100, vec![variant]))) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_refuse_writes_naming_the_leader_and_read_what_it_committed() {
    let dir = tempfile::tempdir().unwrap();
    let group = start_local_group(dir.path(), 3).unwrap();
    let leader = wait_leader(&group, Duration::from_secs(10)).await.expect("a leader");
    let leader_id = leader.status().id;
    let follower = group.iter().find(|h| h.status().id != leader_id).unwrap().clone();
    // A follower may not know the leader for a moment after the election.
    let mut refusal = follower.propose(register("x")).await;
    for _ in 0..50 {
        if refusal == Err(ProposeError::NotLeader(Some(leader_id))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        refusal = follower.propose(register("x")).await;
    }
    assert_eq!(refusal, Err(ProposeError::NotLeader(Some(leader_id))));
    // The status (and so the leader's address) is published at the end of the driver's step
    // that answered the refusal: it may lag the answer by that step.
    let mut address = follower.leader_address();
    for _ in 0..50 {
        if address.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        address = follower.leader_address();
    }
    assert_eq!(address, leader.peers.api(leader_id), "the follower knows where the leader serves");

    for i in 0..20 {
        leader.propose(register(&format!("t{i}"))).await.expect("the leader commits");
    }
    // After a read index, the follower's state holds everything committed before it.
    follower.read_index().await.expect("a read index through the leader");
    assert_eq!(follower.read(|s| s.tasks.len()), 20);
    assert!(follower.status().applied >= leader.status().commit.min(follower.status().commit));
    let refused = leader.propose(Command { change: None }).await;
    assert!(matches!(refused, Err(ProposeError::Rejected(_))), "an empty command is refused: {refused:?}");
}
