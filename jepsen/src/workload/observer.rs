//! Polls every node's view of the Raft cluster and records each change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rampart::api::views::ClusterStatus;

use crate::history::{Entry, History};
use crate::testbed::Testbed;

const POLL_EVERY: Duration = Duration::from_millis(200);

/// What a node said last: Raft state, term, leader (all `None`: no answer).
type Seen = (Option<String>, Option<u64>, Option<String>);

pub async fn observe(
    testbed: Arc<Testbed>,
    history: Arc<History>,
    http: reqwest::Client,
    token: String,
    until: tokio::time::Instant,
) {
    let mut last: BTreeMap<String, Seen> = BTreeMap::new();
    while tokio::time::Instant::now() < until {
        for server in &testbed.servers {
            let url = format!("http://{}/v1/cluster", server.api_addr());
            let status = async {
                let response = http
                    .get(&url)
                    .bearer_auth(&token)
                    .timeout(POLL_EVERY)
                    .send()
                    .await
                    .ok()?;
                response.json::<ClusterStatus>().await.ok()
            }
            .await;
            let seen = match status {
                Some(s) => (Some(s.raft_state), Some(s.term), s.leader),
                None => (None, None, None),
            };
            if last.get(&server.host.name) != Some(&seen) {
                history.record(Entry::Observe {
                    time_ms: history.now_ms(),
                    node: server.host.name.clone(),
                    raft_state: seen.0.clone(),
                    term: seen.1,
                    leader: seen.2.clone(),
                });
                last.insert(server.host.name.clone(), seen);
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
