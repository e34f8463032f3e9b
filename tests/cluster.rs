//! The Raft control plane as separate processes of the real binary on 127.0.0.1.

mod support;

use std::time::{Duration, Instant};

use rampart::api::views::{ClusterStatus, TokenSummary};
use serde_json::json;
use support::{metric, port_is_free, wait_until, TestCluster, SNAPSHOT_EVERY};

/// Commits a write (an API token) through `node`; returns the HTTP status.
async fn commit_marker(cluster: &TestCluster, node: &str, marker: &str) -> u16 {
    cluster
        .post(
            node,
            "/v1/tokens",
            json!({"name": marker, "role": "monitor"}),
        )
        .await
        .0
}

async fn token_names(cluster: &TestCluster, node: &str) -> Vec<String> {
    let tokens: Vec<TokenSummary> = cluster.get(node, "/v1/tokens").await;
    tokens.into_iter().map(|t| t.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_leader_kill_recovers_and_changes_membership() {
    let mut cluster = TestCluster::new(4);
    let three = cluster.write_config("cluster.xml", 3, "secret");
    let four = cluster.write_config("cluster4.xml", 4, "secret");

    // Phase 1: three nodes form a cluster and commit, whichever node takes the write.
    for name in ["n1", "n2", "n3"] {
        cluster.start(name, &three).await;
    }
    let (code, body) = cluster.post("n1", "/v1/cluster/init", json!({})).await;
    assert_eq!(code, 200, "{body}");
    let leader = cluster
        .wait_for_agreement(&["n1", "n2", "n3"], &["n1", "n2", "n3"])
        .await;
    let follower = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != leader)
        .unwrap();
    assert_eq!(commit_marker(&cluster, follower, "via-follower").await, 200);
    assert_eq!(commit_marker(&cluster, &leader, "via-leader").await, 200);
    // A second init is refused and changes nothing.
    assert_eq!(
        cluster.post("n2", "/v1/cluster/init", json!({})).await.0,
        409
    );
    modules_follow_the_cluster_state(&cluster, follower).await;

    // Phase 2: kill -9 the leader; a new leader commits within 2 s.
    let before: ClusterStatus = cluster.status(follower).await;
    cluster.kill(&leader);
    let killed_at = Instant::now();
    let survivors: Vec<&str> = ["n1", "n2", "n3"]
        .into_iter()
        .filter(|n| *n != leader)
        .collect();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let code = commit_marker(&cluster, survivors[0], &format!("after-kill-{attempt}")).await;
        if code == 200 {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no commit after the leader died"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover = killed_at.elapsed();
    eprintln!("a new leader committed {failover:?} after kill -9 of {leader}");
    assert!(failover < Duration::from_secs(2), "took {failover:?}");
    let after = cluster.status(survivors[0]).await;
    assert!(after.term > before.term);
    assert_ne!(after.leader.as_deref(), Some(leader.as_str()));
    assert_eq!(
        commit_marker(&cluster, survivors[1], "while-down").await,
        200
    );

    // Phase 3: the killed node restarts from its RocksDB and catches up, including
    // what was committed while it was down.
    cluster.start(&leader, &three).await;
    wait_until(
        Duration::from_secs(15),
        "the restarted node catches up",
        || async {
            token_names(&cluster, &leader)
                .await
                .contains(&"while-down".to_string())
        },
    )
    .await;
    for marker in ["via-follower", "via-leader", "while-down"] {
        assert!(token_names(&cluster, &leader)
            .await
            .contains(&marker.to_string()));
    }
    cluster
        .wait_for_agreement(&["n1", "n2", "n3"], &["n1", "n2", "n3"])
        .await;

    // Phase 4: more commits than a snapshot interval, so the log n4 would need is
    // purged: n4 joins through any member and receives a snapshot.
    for i in 0..(2 * SNAPSHOT_EVERY) {
        assert_eq!(
            commit_marker(&cluster, "n1", &format!("bulk-{i}")).await,
            200
        );
    }
    wait_until(
        Duration::from_secs(10),
        "every member purged its log",
        || async {
            let mut purged = true;
            for name in ["n1", "n2", "n3"] {
                purged &= metric(&cluster.metrics(name).await, "rampart_raft_purged_index") > 0;
            }
            purged
        },
    )
    .await;
    cluster.start("n4", &four).await;
    let seed = cluster.spec("n3").raft_addr();
    let (code, body) = cluster
        .post("n4", "/v1/cluster/join", json!({ "seed": seed }))
        .await;
    assert_eq!(code, 200, "{body}");
    let leader = cluster
        .wait_for_agreement(&["n1", "n2", "n3", "n4"], &["n1", "n2", "n3", "n4"])
        .await;
    assert!(token_names(&cluster, "n4")
        .await
        .contains(&"while-down".to_string()));

    // Phase 5: the leader is removed, through a follower (a leader removing itself
    // steps down once the change is applied: nothing it proposes after may wait on
    // it), then a follower leaves by itself.
    let mut rest: Vec<&str> = ["n1", "n2", "n3", "n4"]
        .into_iter()
        .filter(|n| *n != leader)
        .collect();
    let (code, body) = cluster
        .delete(rest[0], &format!("/v1/nodes/{leader}"))
        .await;
    assert_eq!(code, 200, "{body}");
    cluster.wait_for_agreement(&rest, &rest).await;
    let status = cluster.status(rest[0]).await;
    assert!(status.members.iter().all(|m| m.name != leader));
    assert_eq!(commit_marker(&cluster, rest[2], "after-remove").await, 200);
    let leaver = rest.remove(1);
    let leave = std::process::Command::new(support::BIN)
        .arg("--config")
        .arg(if leaver == "n4" { &four } else { &three })
        .args(["--name", leaver, "cluster", "leave"])
        .output()
        .unwrap();
    assert!(
        leave.status.success(),
        "{}",
        String::from_utf8_lossy(&leave.stderr)
    );
    cluster.wait_for_agreement(&rest, &rest).await;
    assert_eq!(commit_marker(&cluster, rest[0], "after-leave").await, 200);

    // Phase 6: SIGTERM stops every node cleanly and releases its ports.
    for name in ["n1", "n2", "n3", "n4"] {
        assert!(
            cluster.terminate(name),
            "{name} did not exit cleanly on SIGTERM"
        );
        let spec = cluster.spec(name);
        assert!(
            port_is_free(spec.raft_port) && port_is_free(spec.api_port),
            "{name} kept a port"
        );
    }
}

/// A package installed through any node reaches every node's module folder; a light
/// module runs on one node, operated from another.
async fn modules_follow_the_cluster_state(cluster: &TestCluster, through: &str) {
    use rampart::module::package::{build_zip, Content};
    let file = |path: &str, mode, data: &str| {
        (
            path.to_string(),
            Content::File {
                mode,
                data: data.as_bytes().to_vec(),
            },
        )
    };
    let package = build_zip(
        "job",
        &[
            file(
                "conf/userconfig.xml",
                0o644,
                "<safe><service mode=\"light\"/></safe>",
            ),
            file("bin/start_prim", 0o755, "#!/bin/sh\nexit 0\n"),
        ],
    );
    let response = cluster
        .http
        .post(cluster.url(through, "/v1/modules"))
        .bearer_auth(cluster.admin_token())
        .body(package)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    for node in ["n1", "n2", "n3"] {
        let config = cluster
            .dir
            .path()
            .join(format!("data-{node}/modules/job/conf/userconfig.xml"));
        wait_until(
            Duration::from_secs(10),
            &format!("{node} has the package"),
            || async { config.exists() },
        )
        .await;
    }
    // Started on n2 through n1; n3 is refused (a light module runs on one node).
    let (code, body) = cluster
        .post("n1", "/v1/modules/job/start?node=n2", json!({}))
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = cluster
        .post("n1", "/v1/modules/job/start?node=n3", json!({}))
        .await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("already runs"),
        "{body}"
    );
    wait_until(
        Duration::from_secs(10),
        "job is ALONE on n2, seen from n1",
        || async {
            let status: serde_json::Value =
                cluster.get("n1", "/v1/modules/job/state?node=n2").await;
            status["state"] == "ALONE" && status["node"] == "n2"
        },
    )
    .await;
    let status: serde_json::Value = cluster.get("n1", "/v1/modules/job/state").await;
    assert_eq!(status["state"], "STOP", "n1 itself does not run it");
    assert_eq!(
        cluster
            .post("n3", "/v1/modules/job/stop?node=n2", json!({}))
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_secret_can_neither_join_nor_vote() {
    let mut cluster = TestCluster::new(4);
    let three = cluster.write_config("cluster.xml", 3, "secret");
    let intruder = cluster.write_config("intruder.xml", 4, "wrong-secret");
    let three_wrong = cluster.write_config("wrong3.xml", 3, "wrong-secret");
    for name in ["n1", "n2", "n3"] {
        cluster.start(name, &three).await;
    }
    assert_eq!(
        cluster.post("n1", "/v1/cluster/init", json!({})).await.0,
        200
    );
    let leader = cluster
        .wait_for_agreement(&["n1", "n2", "n3"], &["n1", "n2", "n3"])
        .await;

    // Joining: n4 holds another secret. Its request is refused at the handshake.
    cluster.start("n4", &intruder).await;
    let wrong_token = rampart::node::context::admin_token(b"another-secret-entirely-9876543210");
    let response = cluster
        .http
        .post(cluster.url("n4", "/v1/cluster/join"))
        .bearer_auth(wrong_token)
        .json(&json!({ "seed": cluster.spec("n1").raft_addr() }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("secret"),
        "{body}"
    );
    let status = cluster.status("n1").await;
    assert_eq!(status.members.len(), 3);

    // Voting: a member restarted with the wrong secret campaigns, but nobody hears it:
    // the others keep their leader and term, and it never learns of a leader.
    let victim = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != leader)
        .unwrap();
    let term_before = cluster.status(&leader).await.term;
    cluster.terminate(victim);
    cluster.start(victim, &three_wrong).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = cluster.status(&leader).await;
    assert_eq!(status.leader.as_deref(), Some(leader.as_str()));
    assert_eq!(
        status.term, term_before,
        "the isolated node disrupted the cluster"
    );
    let isolated: ClusterStatus = cluster
        .http
        .get(cluster.url(victim, "/v1/cluster"))
        .bearer_auth(rampart::node::context::admin_token(
            b"another-secret-entirely-9876543210",
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        isolated.leader, None,
        "the node with the wrong secret found a leader"
    );
    assert!(isolated.term > term_before, "it did campaign");
}
