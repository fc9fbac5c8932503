//! An OTLP/HTTP trace receiver for the traces suite (`tests/tests/traces.rs`): axum on
//! `127.0.0.1:0`, answering `POST /v1/traces` as a collector does, decoding each body as a real
//! `ExportTraceServiceRequest` (protobuf, the protocol's own message types) into flat spans.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;

/// One span as received, ids in lowercase hex (an absent parent is `""`).
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the resource the span came with.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// Attributes, values as text (`"3"` for an integer).
    pub attributes: HashMap<String, String>,
    /// `(trace id, span id)` of each link.
    pub links: Vec<(String, String)>,
    /// `STATUS_CODE_OK` = 1, `STATUS_CODE_ERROR` = 2.
    pub status_code: i32,
}

impl ReceivedSpan {
    /// The attribute `key` (panics naming the span when it is missing).
    pub fn attribute(&self, key: &str) -> &str {
        self.attributes
            .get(key)
            .unwrap_or_else(|| panic!("span {:?} has no attribute {key}: {self:?}", self.name))
    }
}

#[derive(Default)]
struct Log {
    spans: Vec<ReceivedSpan>,
    requests: usize,
    /// Bodies that did not decode, or came with another content type.
    rejected: usize,
}

/// The receiver; stopped on drop.
pub struct OtlpReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    server: tokio::task::JoinHandle<()>,
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

async fn receive(
    State(log): State<Arc<Mutex<Log>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
    let decoded = protobuf
        .then(|| ExportTraceServiceRequest::decode(body.as_ref()).ok())
        .flatten();
    let mut log = log.lock().expect("receiver log");
    log.requests += 1;
    let Some(request) = decoded else {
        log.rejected += 1;
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain")],
            b"not an OTLP protobuf trace export".to_vec(),
        );
    };
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .and_then(|a| a.get("service.name").cloned())
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                log.spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                        .collect(),
                    status_code: span.status.as_ref().map_or(0, |s| s.code),
                });
            }
        }
    }
    let response = ExportTraceServiceResponse::default().encode_to_vec();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        response,
    )
}

impl OtlpReceiver {
    /// Starts a receiver on a free port.
    pub async fn start() -> OtlpReceiver {
        let log = Arc::new(Mutex::new(Log::default()));
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state(log.clone());
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let addr = socket.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            axum::serve(socket, app)
                .await
                .expect("OTLP receiver serves");
        });
        OtlpReceiver { addr, log, server }
    }

    /// The base URL to configure (`telemetry.endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.log.lock().expect("receiver log").spans.clone()
    }

    /// Export requests received so far, and how many of them were not valid OTLP protobuf.
    pub fn requests(&self) -> (usize, usize) {
        let log = self.log.lock().expect("receiver log");
        (log.requests, log.rejected)
    }

    /// Waits until `done` holds for the spans received; panics after `timeout`, listing them.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} after {timeout:?}; spans received: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
