//! Webhooks: each rollout transition POSTed as JSON to the `[[notify]]` URLs.
//!
//! Delivery is off the hot path and off the control loop: the controller hands the event to
//! a bounded queue without waiting (a full queue drops the event with a warning), and a task
//! delivers each one with bounded retries and backoff. A dead webhook can delay nothing but
//! its own deliveries.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::config::NotifyConfig;
use crate::journal::Event;

const QUEUE: usize = 1024;
const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Hands events to the delivery task.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Event>>,
}

impl Notifier {
    /// Starts delivering to `targets` (on the current tokio runtime); none means a no-op.
    pub fn spawn(targets: Vec<NotifyConfig>) -> Notifier {
        if targets.is_empty() {
            return Notifier { tx: None };
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(deliver_all(targets, rx));
        Notifier { tx: Some(tx) }
    }

    /// Queues `event` without blocking.
    pub fn notify(&self, event: &Event) {
        if let Some(tx) = &self.tx
            && let Err(e) = tx.try_send(event.clone())
        {
            warn!(route = %event.route, kind = event.kind.label(), error = %e, "webhook queue full or closed; event not sent");
        }
    }
}

async fn deliver_all(targets: Vec<NotifyConfig>, mut rx: mpsc::Receiver<Event>) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    while let Some(event) = rx.recv().await {
        let body = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
        for t in &targets {
            if t.events.is_empty() || t.events.iter().any(|k| k == event.kind.label()) {
                tokio::spawn(deliver(client.clone(), t.url.clone(), body.clone(), event.route.clone()));
            }
        }
    }
}

async fn deliver(client: Client<HttpConnector, Full<Bytes>>, url: http::Uri, body: Bytes, route: String) {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let req = Request::post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("veer/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body.clone()))
            .expect("valid request");
        match tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                debug!(%url, %route, "webhook delivered");
                return;
            }
            Ok(Ok(resp)) => warn!(%url, %route, attempt, status = %resp.status(), "webhook refused the event"),
            Ok(Err(e)) => warn!(%url, %route, attempt, error = %e, "webhook unreachable"),
            Err(_) => warn!(%url, %route, attempt, "webhook timed out"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    warn!(%url, %route, "webhook delivery given up after {ATTEMPTS} attempts");
}
