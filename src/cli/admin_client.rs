//! How CLI commands talk to a running veer: plain HTTP to the admin API.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Admin API base URL.
    #[arg(long, env = "VEER_ADMIN", default_value = "http://127.0.0.1:9901")]
    pub admin: String,
    /// File holding the admin bearer token (or set `VEER_TOKEN` to the token itself).
    #[arg(long, env = "VEER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// A client of one admin API.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// What the admin API answered: status and body text.
pub struct AdminReply {
    /// HTTP status.
    pub status: StatusCode,
    /// Body as text.
    pub body: String,
}

impl AdminReply {
    /// The `error` field of a JSON error body, or the raw body.
    pub fn error_message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| self.body.trim().to_string())
    }
}

impl AdminClient {
    /// A client for `args`; reads the token file now so a bad path fails early.
    pub fn new(args: &AdminArgs) -> Result<AdminClient, String> {
        let token = match &args.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("cannot read token file {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("VEER_TOKEN").ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()),
        };
        let http = Client::builder(TokioExecutor::new()).build_http();
        Ok(AdminClient { base: args.admin.trim_end_matches('/').to_string(), token, http })
    }

    /// GETs `path`.
    pub async fn get(&self, path: &str) -> Result<AdminReply, String> {
        self.send(Method::GET, path, None).await
    }

    /// POSTs `body` (JSON) to `path`.
    pub async fn post(&self, path: &str, body: Option<String>) -> Result<AdminReply, String> {
        self.send(Method::POST, path, body).await
    }

    async fn send(&self, method: Method, path: &str, body: Option<String>) -> Result<AdminReply, String> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("bad admin URL {url:?}: {e}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .map_err(|_| format!("{url}: timed out"))?
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
        Ok(AdminReply { status, body: String::from_utf8_lossy(&body).into_owned() })
    }
}
