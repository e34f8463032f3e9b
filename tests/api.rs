//! The admin API's answers to bad requests, and the CLI against a running node.

mod support;

use std::process::Command;

use serde_json::{json, Value};
use support::{TestCluster, BIN};

async fn get_as(cluster: &TestCluster, token: &str, path: &str) -> reqwest::Response {
    cluster
        .http
        .get(cluster.url("n1", path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn add_monitor_token(cluster: &TestCluster, name: &str) -> (u16, Value) {
    cluster
        .post("n1", "/v1/tokens", json!({"name": name, "role": "monitor"}))
        .await
}

async fn single_node_cluster() -> TestCluster {
    let mut cluster = TestCluster::new(1);
    let config = cluster.write_config("cluster.xml", 1, "secret");
    cluster.start("n1", &config).await;
    assert_eq!(
        cluster.post("n1", "/v1/cluster/init", json!({})).await.0,
        200
    );
    cluster.wait_for_agreement(&["n1"], &["n1"]).await;
    cluster
}

#[tokio::test]
async fn bad_tokens_roles_and_payloads_get_clear_errors() {
    let cluster = single_node_cluster().await;
    let http = &cluster.http;
    let url = |path: &str| cluster.url("n1", path);

    // Health checks need no token; everything else does.
    assert_eq!(http.get(url("/health")).send().await.unwrap().status(), 200);
    let response = http.get(url("/v1/cluster")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    assert!(
        body["message"].as_str().unwrap().contains("Bearer"),
        "{body}"
    );
    let response = get_as(&cluster, "not-a-token", "/v1/cluster").await;
    assert_eq!(response.status(), 401);

    // A monitor token reads but cannot administer.
    let (code, created) = add_monitor_token(&cluster, "grafana").await;
    assert_eq!(code, 200, "{created}");
    let monitor = created["token"].as_str().unwrap().to_string();
    let response = get_as(&cluster, &monitor, "/v1/cluster").await;
    assert_eq!(response.status(), 200);
    let response = get_as(&cluster, &monitor, "/metrics").await;
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("rampart_raft_is_leader{node=\"n1\"} 1"));
    let response = http
        .post(url("/v1/tokens"))
        .bearer_auth(&monitor)
        .json(&json!({"name": "escalate", "role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    // Malformed JSON, a wrong shape and an unknown role: 400 with a message, nothing committed.
    for (body, fragment) in [
        ("{\"name\": ", "EOF"),
        (
            "{\"nom\": \"x\", \"role\": \"monitor\"}",
            "missing field `name`",
        ),
        (
            "{\"name\": \"x\", \"role\": \"superuser\"}",
            "unknown variant `superuser`",
        ),
    ] {
        let response = http
            .post(url("/v1/tokens"))
            .bearer_auth(cluster.admin_token())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert!(
            answer["message"].as_str().unwrap().contains(fragment),
            "{body} → {answer}"
        );
    }
    // A name the state machine refuses: committed as a no-op, reported as a conflict.
    let (code, body) = add_monitor_token(&cluster, "../etc").await;
    assert_eq!(code, 409, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("invalid token name"));
    let tokens: Vec<Value> = cluster.get("n1", "/v1/tokens").await;
    assert_eq!(tokens.len(), 1, "{tokens:?}");

    // Revoked tokens stop working; unknown endpoints answer JSON 404.
    assert_eq!(cluster.delete("n1", "/v1/tokens/grafana").await.0, 200);
    let response = get_as(&cluster, &monitor, "/v1/cluster").await;
    assert_eq!(response.status(), 401);
    let response = get_as(&cluster, &cluster.admin_token(), "/v1/nope").await;
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "not_found"
    );
}

#[tokio::test]
async fn cli_shows_status_as_table_and_json() {
    let cluster = single_node_cluster().await;
    let config = cluster.dir.path().join("cluster.xml");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["--name", "n1"])
            .args(args)
            .output()
            .unwrap()
    };
    let table = run(&["status"]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.contains("leader n1"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("n1") && l.contains("leader")),
        "{text}"
    );

    let json_out = run(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(status["leader"], "n1");
    assert_eq!(status["members"].as_array().unwrap().len(), 1);

    // A wrong token is refused with the API's message and a failing exit code.
    let refused = run(&["--token", "nope", "status"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown or revoked token"));
}

/// Writes `xml` as cluster.xml and returns what `rampart node` printed on stderr,
/// after checking it failed.
fn node_refuses(dir: &std::path::Path, xml: &str) -> (String, std::path::PathBuf) {
    let config = dir.join("cluster.xml");
    std::fs::write(&config, xml).unwrap();
    let output = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("node")
        .output()
        .unwrap();
    assert!(!output.status.success());
    (String::from_utf8_lossy(&output.stderr).into_owned(), config)
}

#[test]
fn cli_reports_malformed_cluster_xml_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let (stderr, config) = node_refuses(
        dir.path(),
        "<cluster>\n  <lans>\n    <lan name=\"x\">\n      <node name=\"a\" addr=\"127.0.0.1\">\n    </lan>\n</cluster>\n",
    );
    let expected = format!("{}:5:", config.display());
    assert!(
        stderr.contains(&expected) && stderr.contains("malformed XML"),
        "{stderr}"
    );
    let (stderr, _) = node_refuses(
        dir.path(),
        "<cluster>\n  <lans>\n    <lan name=\"x\" colour=\"red\"/>\n  </lans>\n</cluster>\n",
    );
    assert!(
        stderr.contains(":3:5: unknown attribute 'colour' in <lan>"),
        "{stderr}"
    );
}
