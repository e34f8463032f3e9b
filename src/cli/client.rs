//! A small client of the admin API for the CLI.

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::views::ErrorBody;

pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(api: String, token: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a plain HTTP client always builds");
        ApiClient {
            base: format!("http://{api}"),
            token,
            http,
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(self.url(path))).await
    }

    /// POST raw bytes (a package).
    pub async fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> anyhow::Result<T> {
        self.send(
            self.http
                .post(self.url(path))
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    /// PUT text (a configuration).
    pub async fn put_text<T: DeserializeOwned>(
        &self,
        path: &str,
        body: String,
    ) -> anyhow::Result<T> {
        self.send(
            self.http
                .put(self.url(path))
                .header("content-type", "application/xml")
                .body(body),
        )
        .await
    }

    /// GET raw bytes (a package, a configuration).
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        let status = response.status();
        let body = response.bytes().await.context("reading the API response")?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        Ok(body.to_vec())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the admin API at {} (is the node running?)",
                    self.base
                )
            })?;
        let status = response.status();
        let body = response.bytes().await.context("reading the API response")?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        serde_json::from_slice(&body).context("the API answered with unexpected JSON")
    }
}

fn api_error(status: reqwest::StatusCode, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => anyhow!("{} ({status})", error.message),
        Err(_) => anyhow!("{status}: {}", String::from_utf8_lossy(body)),
    }
}
