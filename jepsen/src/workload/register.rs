//! Register workload on the Raft cluster state: concurrent reads, writes and
//! compare-and-sets on a few keys, through any node's admin API.
//!
//! Outcomes: a 2xx is `ok`; a refused compare-and-set (409) is `fail` (committed, no
//! effect); a read that failed is `fail` (reads have no effect); anything else for a
//! write or compare-and-set — timeout, no leader, lost connection — is `info`,
//! because the command may still commit.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::history::{History, OpKind};
use crate::testbed::Testbed;

pub const KEYS: [&str; 3] = ["r0", "r1", "r2"];
const OP_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RegisterClient {
    pub id: u64,
    /// Number of clients, to number processes: `id + clients × generation`.
    pub clients: u64,
    pub testbed: Arc<Testbed>,
    pub history: Arc<History>,
    pub http: reqwest::Client,
    pub token: String,
}

enum Outcome {
    Ok(Value),
    Fail,
    Info,
}

impl RegisterClient {
    /// Issues operations until `until`, pausing a little between them.
    pub async fn run(self, seed: u64, until: tokio::time::Instant) {
        let mut rng = StdRng::seed_from_u64(seed ^ (self.id.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        let mut generation = 0u64;
        while tokio::time::Instant::now() < until {
            let process = self.id + self.clients * generation;
            let key = *KEYS.choose(&mut rng).expect("keys");
            let server = self
                .testbed
                .servers
                .choose(&mut rng)
                .expect("servers")
                .api_addr();
            let roll: f64 = rng.gen();
            let (f, argument) = if roll < 0.5 {
                ("read", Value::Null)
            } else if roll < 0.75 {
                ("write", json!(rng.gen_range(0..5u64)))
            } else {
                let expected = rng.gen_range(0..5u64);
                (
                    "cas",
                    json!({"expected": expected, "new": rng.gen_range(0..5u64)}),
                )
            };
            if self.invoke(&server, process, f, key, argument).await {
                generation += 1;
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
        }
    }

    /// One operation, recorded; returns true when its outcome is unknown (`info`).
    pub async fn invoke(
        &self,
        server: &str,
        process: u64,
        f: &str,
        key: &str,
        argument: Value,
    ) -> bool {
        self.history
            .op(process, OpKind::Invoke, f, key, argument.clone());
        let outcome = self.send(server, f, key, &argument).await;
        let (kind, value) = match outcome {
            Outcome::Ok(value) => (OpKind::Ok, value),
            Outcome::Fail => (OpKind::Fail, Value::Null),
            Outcome::Info => (OpKind::Info, Value::Null),
        };
        self.history.op(process, kind, f, key, value);
        kind == OpKind::Info
    }

    async fn send(&self, server: &str, f: &str, key: &str, argument: &Value) -> Outcome {
        let base = format!("http://{server}/v1/registers/{key}");
        let request = match f {
            "read" => self.http.get(&base),
            "write" => self.http.put(&base).json(&json!({ "value": argument })),
            _ => self.http.post(format!("{base}/cas")).json(argument),
        };
        let response = request
            .bearer_auth(&self.token)
            .timeout(OP_TIMEOUT)
            .send()
            .await;
        match (f, response) {
            ("read", Ok(r)) if r.status().is_success() => match r.json::<Value>().await {
                Ok(body) => Outcome::Ok(body["value"].clone()),
                Err(_) => Outcome::Fail,
            },
            ("read", _) => Outcome::Fail,
            (_, Ok(r)) if r.status().is_success() => Outcome::Ok(Value::Null),
            ("cas", Ok(r)) if r.status().as_u16() == 409 => Outcome::Fail,
            _ => Outcome::Info,
        }
    }
}
