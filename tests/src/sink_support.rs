//! Helpers for the webhook and NATS handler suites (`tests/tests/webhook.rs`,
//! `tests/tests/nats.rs`): a real HTTP receiver on 127.0.0.1 that verifies signatures and
//! answers as a test scripts it, handler entries with quick retries, and raising events in
//! batches. The NATS server itself is in [`crate::nats_support`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{KeyInit, Mac};
use listener::config::HandlerConfig;
use listener::sink::AnySinkConfig;
use serde_json::{json, Value};
use uuid::Uuid;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// The `X-Event-Id` header.
    pub event_id: String,
    /// The body, parsed.
    pub event: Value,
    /// All headers, lowercase names.
    pub headers: HashMap<String, String>,
    /// Whether `X-Signature` matched the HMAC of the body under the receiver's secret (`None`:
    /// the receiver has no secret).
    pub signature_ok: Option<bool>,
    /// The status the receiver answered.
    pub status: u16,
}

/// How the receiver answers: status and delay, given the request and how many requests
/// (this one included) it got for the same event id.
pub type Script = dyn Fn(&Received, usize) -> (u16, Duration) + Send + Sync;

struct ReceiverState {
    secret: Option<Vec<u8>>,
    script: Box<Script>,
    log: Mutex<Vec<Received>>,
}

/// A webhook receiver: axum on `127.0.0.1:0`, stopped on drop.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
    server: tokio::task::JoinHandle<()>,
}

/// `sha256=<hex HMAC-SHA256>` of `body`, computed here independently of the listener.
pub fn expected_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                v.to_str().unwrap_or("<binary>").to_string(),
            )
        })
        .collect();
    let signature_ok = state.secret.as_ref().map(|secret| {
        headers.get("x-signature").map(String::as_str)
            == Some(expected_signature(secret, &body).as_str())
    });
    let mut received = Received {
        event_id: headers.get("x-event-id").cloned().unwrap_or_default(),
        event: serde_json::from_slice(&body).unwrap_or(Value::Null),
        headers,
        signature_ok,
        status: 0,
    };
    let attempt = {
        let log = state.log.lock().expect("receiver log");
        1 + log
            .iter()
            .filter(|r| r.event_id == received.event_id)
            .count()
    };
    let (status, delay) = (state.script)(&received, attempt);
    // A bad signature is refused whatever the script says.
    let status = if signature_ok == Some(false) {
        401
    } else {
        status
    };
    received.status = status;
    state.log.lock().expect("receiver log").push(received);
    tokio::time::sleep(delay).await;
    StatusCode::from_u16(status).expect("status")
}

impl Receiver {
    /// Starts a receiver verifying signatures with `secret` (if any), answering by `script`.
    pub async fn start(
        secret: Option<&[u8]>,
        script: impl Fn(&Received, usize) -> (u16, Duration) + Send + Sync + 'static,
    ) -> Receiver {
        let state = Arc::new(ReceiverState {
            secret: secret.map(<[u8]>::to_vec),
            script: Box::new(script),
            log: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = socket.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            axum::serve(socket, app).await.expect("receiver serves");
        });
        Receiver {
            addr,
            state,
            server,
        }
    }

    /// The URL to configure.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.state.log.lock().expect("receiver log").clone()
    }

    /// Requests answered 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// Requests for `event_id`.
    pub fn attempts(&self, event_id: Uuid) -> usize {
        let id = event_id.to_string();
        self.requests().iter().filter(|r| r.event_id == id).count()
    }

    /// Waits until the events `ids` were all delivered (answered 2xx); panics after `timeout`.
    pub async fn wait_delivered(&self, ids: &[Uuid], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let delivered: std::collections::HashSet<String> =
                self.delivered().into_iter().map(|r| r.event_id).collect();
            let missing = ids
                .iter()
                .filter(|id| !delivered.contains(&id.to_string()))
                .count();
            if missing == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{missing} of {} events not delivered after {timeout:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A handler entry delivering to `sink`, named `name`, with quick retries (`max_attempts`,
/// 10-100 ms).
pub fn handler(sink: impl Into<AnySinkConfig>, name: &str, max_attempts: u32) -> HandlerConfig {
    HandlerConfig {
        name: Some(name.to_string()),
        max_attempts,
        initial_backoff_ms: 10,
        max_backoff_ms: 100,
        ..HandlerConfig::new(sink)
    }
}

/// Raises one event per `(aggregate_type, aggregate_id, event_type)` in one transaction;
/// returns their ids in order.
pub async fn raise(
    client: &impl tokio_postgres::GenericClient,
    events: &[(&str, &str, &str)],
) -> Vec<Uuid> {
    let batch = Value::Array(
        events
            .iter()
            .map(|(aggregate_type, id, event_type)| {
                json!({"aggregate_type": aggregate_type, "aggregate_id": id,
                       "event_type": event_type, "payload": {"secret": "not for logs"}})
            })
            .collect(),
    );
    raise_batch(client, &batch).await
}

/// Raises the events of `batch` (a JSON array of `raise_events` items) in one transaction;
/// returns their ids in order.
pub async fn raise_batch(client: &impl tokio_postgres::GenericClient, batch: &Value) -> Vec<Uuid> {
    client
        .query("SELECT id FROM domain_events.raise_events($1)", &[batch])
        .await
        .expect("raise_events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Raises `txns` transactions of `per_txn` events over three aggregate types (`Loan`,
/// `Ticket`, `User`, event types `<type>.Changed`) and 7 aggregates each; returns the ids in
/// commit order.
pub async fn raise_mixed(
    client: &impl tokio_postgres::GenericClient,
    txns: usize,
    per_txn: usize,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for txn in 0..txns {
        let events: Vec<(String, String, String)> = (0..per_txn)
            .map(|n| {
                let i = txn * per_txn + n;
                let aggregate_type = ["Loan", "Ticket", "User"][i % 3];
                (
                    aggregate_type.to_string(),
                    format!("{}-{}", aggregate_type.to_lowercase(), i % 7),
                    format!("{aggregate_type}.Changed"),
                )
            })
            .collect();
        let refs: Vec<(&str, &str, &str)> = events
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        ids.extend(raise(client, &refs).await);
    }
    ids
}

/// Runs the "server unreachable" case of a handler that publishes to a server: a listener on
/// `db` with `handler` alone (its retries quick, its server address pointing at nothing)
/// receives two events, one transaction each. Each must be dead-lettered under the handler's
/// name after exactly `max_attempts` calls, with an error containing `error`, and the stream
/// must go on (the collector sees both).
pub async fn assert_unreachable_server_dead_letters(
    db: &crate::TestDb,
    handler: HandlerConfig,
    error: &str,
) {
    use crate::listener_support::*;
    let name = unique_name("down");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(db, &name);
    let (handler_name, max_attempts) = (handler.name(), handler.max_attempts as i32);
    config.handlers = vec![handler];
    let registry = listener::service::registry_from_config(&config).expect("registry");
    let listener = InProcess::start_with(config, registry);
    wait_slot_active(&db.client, &name, Duration::from_secs(120)).await;
    let first = raise(&db.client, &[("Loan", "1", "Loan.Funded")]).await;
    let second = raise(&db.client, &[("Loan", "2", "Loan.Funded")]).await;
    let letters = wait_dead_letters(&db.client, &name, 2, Duration::from_secs(60)).await;
    let got: Vec<(String, Uuid, i32)> = letters
        .iter()
        .map(|(handler, id, _, attempts, _)| (handler.clone(), *id, *attempts))
        .collect();
    assert_eq!(
        got,
        [
            (handler_name.clone(), first[0], max_attempts),
            (handler_name, second[0], max_attempts)
        ]
    );
    assert!(letters[0].4.contains(error), "{letters:?}");
    listener
        .collector
        .wait_for(2, Duration::from_secs(30))
        .await;
    listener.stop().await.unwrap();
}
