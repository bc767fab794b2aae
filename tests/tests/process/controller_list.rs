//! An agent given several controller addresses registers with the one that answers, whatever
//! its place in the list, and keeps reporting to it.

use tidal_proto::v1::ClusterStatusRequest;
use tidal_tests::*;

#[tokio::test]
async fn an_agent_skips_controller_addresses_that_do_not_answer() {
    let _turn = tidal_tests::file_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let (_controller, live) = start_controller(work.path(), 30.0, &[]);
    let dead = format!("127.0.0.1:{}", free_port());
    let list = format!("{dead},{live}");
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let agent = start_agent(work.path(), AgentOpts { model_dir: &models, controller: Some(&list), extra: &[] });
    let ctl = controller_client(&live).await;
    wait_reporting(&ctl, &agent.node, "the agent registers and reports through the live controller").await;
    let s = ctl.clone().status(ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.nodes.len(), 1);
}
