//! End-to-end tests of the listener's OpenTelemetry traces: a real OTLP/HTTP receiver started
//! by the test (decoding the protocol's protobuf messages) gets the handler spans; a real
//! webhook receiver gets the handler span as the parent of its own work.

use std::time::Duration;

use e2e::cluster_support::free_port;
use e2e::listener_support::*;
use e2e::otlp_support::{OtlpReceiver, ReceivedSpan};
use e2e::sink_support::{handler, raise, Receiver};
use e2e::TestDb;
use listener::config::{Config, SamplerKind, TelemetryConfig};
use listener::service::registry_from_config;
use uuid::Uuid;

const SLOT_WAIT: Duration = Duration::from_secs(120);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const RAISING_SPAN: &str = "00f067aa0ba902b7";

/// A listener on `db` with one webhook handler `hook` (3 quick attempts) to `receiver`, and
/// telemetry on, exporting to `otlp` every 100 ms.
fn traced_config(db: &TestDb, name: &str, receiver: &Receiver, otlp: &OtlpReceiver) -> Config {
    let mut config = config_for(db, name);
    config.handlers = vec![handler(
        listener::sink::WebhookConfig::new(receiver.url()),
        "hook",
        3,
    )];
    config.telemetry = TelemetryConfig {
        enabled: true,
        endpoint: otlp.endpoint(),
        export_interval_ms: 100,
        ..TelemetryConfig::default()
    };
    config
}

/// Raises one `Loan.Traced` event for aggregate `id` inside the trace `traceparent`.
async fn raise_traced(db: &TestDb, id: &str, traceparent: &str) -> Uuid {
    db.client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL domain_events.traceparent = '{traceparent}'; \
             SELECT domain_events.raise_event('Loan', '{id}', 'Loan.Traced', '{{}}'); COMMIT"
        ))
        .await
        .expect("a traced raise");
    db.client
        .query_one(
            "SELECT id FROM domain_events.event WHERE aggregate_id = $1",
            &[&id],
        )
        .await
        .expect("the traced event")
        .get(0)
}

fn calls_of<'a>(spans: &'a [ReceivedSpan], event: Uuid, handler: &str) -> Vec<&'a ReceivedSpan> {
    let id = event.to_string();
    let mut calls: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            s.attributes.get("pg_domain_events.event.id") == Some(&id)
                && s.attributes
                    .get("pg_domain_events.handler")
                    .map(String::as_str)
                    == Some(handler)
        })
        .collect();
    calls.sort_by_key(|s| s.attribute("pg_domain_events.attempt").to_string());
    calls
}

/// The binary, configured by the file and the standard `OTEL_*` variables, exporting only at
/// shutdown (the export interval is ten minutes): a raise with a traceparent gives handler spans
/// in that trace, children of the raising span, one per attempt; the webhook receiver sees the
/// same trace with the handler call as parent; an event raised without one starts a new trace
/// under its transaction's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_calls_join_the_raising_trace_and_pass_it_on() {
    let db = TestDb::new().await;
    let name = unique_name("traces");
    let _slot = SlotGuard(name.clone());
    let otlp = OtlpReceiver::start().await;
    // The first call for the traced event fails (transient): two attempts, two spans.
    let receiver = Receiver::start(None, |r, attempt| {
        let traced = r.event["aggregate_id"] == "traced";
        (
            if traced && attempt == 1 { 503 } else { 200 },
            Duration::ZERO,
        )
    })
    .await;
    let mut config = traced_config(&db, &name, &receiver, &otlp);
    // Only at shutdown: the spans must be flushed on the way out.
    config.telemetry.export_interval_ms = 600_000;
    // Set by the OTEL_* variables below instead.
    config.telemetry.enabled = false;
    config.telemetry.endpoint = "http://127.0.0.1:1".into();
    let file = write_config(&config);
    let endpoint = otlp.endpoint();
    let mut run = ListenerProcess::spawn(
        &file,
        &[
            ("OTEL_TRACES_EXPORTER", "otlp"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "pgde-e2e-traces"),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
        ],
    );
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let traceparent = format!("00-{TRACE_ID}-{RAISING_SPAN}-01");
    let traced = raise_traced(&db, "traced", &traceparent).await;
    let untraced = raise(&db.client, &[("Loan", "untraced", "Loan.Plain")]).await[0];
    receiver
        .wait_delivered(&[traced, untraced], Duration::from_secs(60))
        .await;
    assert_eq!(otlp.requests(), (0, 0), "exported before shutdown");
    run.stop_ok().await;

    let spans = otlp
        .wait_for(
            "handler spans after shutdown",
            Duration::from_secs(10),
            |spans| spans.iter().any(|s| s.name == "handle hook"),
        )
        .await;
    assert_eq!(otlp.requests().1, 0, "every export is OTLP protobuf");
    assert!(spans.iter().all(|s| s.service == "pgde-e2e-traces"));
    let by_id = |id: &str| spans.iter().find(|s| s.span_id == id);

    // The traced event: one span per attempt, in the raising trace, children of the raise.
    let calls = calls_of(&spans, traced, "hook");
    assert_eq!(calls.len(), 2, "one span per attempt: {calls:#?}");
    for (n, call) in calls.iter().enumerate() {
        assert_eq!(call.name, "handle hook");
        assert_eq!(call.trace_id, TRACE_ID);
        assert_eq!(call.parent_span_id, RAISING_SPAN);
        assert_eq!(
            call.attribute("pg_domain_events.attempt"),
            (n + 1).to_string()
        );
        assert_eq!(call.attribute("pg_domain_events.event.type"), "Loan.Traced");
        assert_eq!(call.attribute("pg_domain_events.aggregate.type"), "Loan");
        assert_eq!(call.attribute("pg_domain_events.delivery"), "stream");
        // Linked to the span of the transaction that delivered it (a trace of its own).
        let (link_trace, link_span) = call.links.first().expect("a link to the transaction");
        let transaction = by_id(link_span).expect("the transaction span was exported");
        assert_eq!(&transaction.trace_id, link_trace);
        assert_eq!(transaction.name, "pg_domain_events transaction");
        assert_eq!(transaction.parent_span_id, "");
        assert_eq!(transaction.attribute("pg_domain_events.events"), "1");
    }
    assert_eq!(calls[0].attribute("pg_domain_events.outcome"), "transient");
    assert_eq!(calls[0].status_code, 2, "a failed call has an error status");
    assert_eq!(calls[1].attribute("pg_domain_events.outcome"), "ok");
    assert_eq!(calls[1].status_code, 1);

    // What the webhook receiver saw: the same trace, each request's parent its call's span.
    let requests = receiver.requests();
    let traced_requests: Vec<_> = requests
        .iter()
        .filter(|r| r.event_id == traced.to_string())
        .collect();
    assert_eq!(traced_requests.len(), 2);
    for (request, call) in traced_requests.iter().zip(&calls) {
        assert_eq!(
            request.headers.get("traceparent").map(String::as_str),
            Some(format!("00-{TRACE_ID}-{}-01", call.span_id).as_str()),
            "the consumer's parent is the handler call"
        );
    }

    // The untraced event: a new trace, under its transaction's root span.
    let calls = calls_of(&spans, untraced, "hook");
    assert_eq!(calls.len(), 1, "{calls:#?}");
    let call = calls[0];
    assert_ne!(call.trace_id, TRACE_ID);
    let transaction = by_id(&call.parent_span_id).expect("its transaction span");
    assert_eq!(transaction.name, "pg_domain_events transaction");
    assert_eq!(transaction.trace_id, call.trace_id);
    assert_eq!(
        transaction.parent_span_id, "",
        "a new trace starts at the transaction"
    );
    assert!(call.links.is_empty());
    let request = requests
        .iter()
        .find(|r| r.event_id == untraced.to_string())
        .expect("delivered");
    assert_eq!(
        request.headers.get("traceparent").map(String::as_str),
        Some(format!("00-{}-{}-01", call.trace_id, call.span_id).as_str())
    );
    // Spans carry ids and names, never the payload.
    assert!(spans
        .iter()
        .all(|s| s.attributes.values().all(|v| !v.contains("not for logs"))));
}

/// Sampling: `parentbased_always_off` records the calls of events raised in a sampled trace,
/// and starts no trace for the others (their calls are not exported, and nothing is for the
/// transactions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_follows_the_raising_trace() {
    let db = TestDb::new().await;
    let name = unique_name("tsample");
    let _slot = SlotGuard(name.clone());
    let otlp = OtlpReceiver::start().await;
    let receiver = Receiver::start(None, |_, _| (200, Duration::ZERO)).await;
    let mut config = traced_config(&db, &name, &receiver, &otlp);
    config.telemetry.sampler = SamplerKind::ParentbasedAlwaysOff;
    let registry = registry_from_config(&config).expect("registry");
    let run = InProcess::start_with(config, registry);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let untraced = raise(&db.client, &[("Loan", "plain", "Loan.Plain")]).await[0];
    let traced = raise_traced(&db, "sampled", &format!("00-{TRACE_ID}-{RAISING_SPAN}-01")).await;
    // Raised in a trace the raising side did not sample: not recorded either.
    let unsampled_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let unsampled = raise_traced(&db, "unsampled", unsampled_parent).await;
    receiver
        .wait_delivered(&[untraced, traced, unsampled], Duration::from_secs(60))
        .await;
    run.stop().await.expect("stops cleanly");

    // Stopping flushed whatever was recorded.
    let spans = otlp.spans();
    let hook = calls_of(&spans, traced, "hook");
    assert!(!hook.is_empty());
    assert!(hook
        .iter()
        .all(|s| s.trace_id == TRACE_ID && s.parent_span_id == RAISING_SPAN));
    assert!(calls_of(&spans, untraced, "hook").is_empty(), "{spans:#?}");
    assert!(calls_of(&spans, unsampled, "hook").is_empty(), "{spans:#?}");
    assert!(
        spans
            .iter()
            .all(|s| s.name != "pg_domain_events transaction"),
        "transactions start new traces, none sampled: {spans:#?}"
    );
    // The unsampled event's consumer still joins its trace (not sampled either).
    let request = receiver
        .requests()
        .into_iter()
        .find(|r| r.event_id == unsampled.to_string())
        .expect("delivered");
    let header = request.headers.get("traceparent").expect("passed on");
    assert!(
        header.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && header.ends_with("-00"),
        "{header}"
    );
}

/// Telemetry off (the default), even with an endpoint configured: nothing is exported, and the
/// webhook receiver gets the stored trace context as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_off_sends_nothing() {
    let db = TestDb::new().await;
    let name = unique_name("toff");
    let _slot = SlotGuard(name.clone());
    let otlp = OtlpReceiver::start().await;
    let receiver = Receiver::start(None, |_, _| (200, Duration::ZERO)).await;
    let mut config = traced_config(&db, &name, &receiver, &otlp);
    config.telemetry.enabled = false;
    let registry = registry_from_config(&config).expect("registry");
    let run = InProcess::start_with(config, registry);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let traceparent = format!("00-{TRACE_ID}-{RAISING_SPAN}-01");
    let traced = raise_traced(&db, "traced", &traceparent).await;
    let mut ids = raise(
        &db.client,
        &[("Loan", "a", "Loan.Plain"), ("Loan", "b", "Loan.Plain")],
    )
    .await;
    ids.push(traced);
    receiver.wait_delivered(&ids, Duration::from_secs(60)).await;
    run.stop().await.expect("stops cleanly");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(otlp.requests(), (0, 0), "spans sent with telemetry off");
    let request = receiver
        .requests()
        .into_iter()
        .find(|r| r.event_id == traced.to_string())
        .expect("delivered");
    assert_eq!(request.headers.get("traceparent"), Some(&traceparent));
}

/// A collector that is not there: delivery goes on at full speed, and the listener stops
/// cleanly (the last export gives up within its timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_collector_never_holds_up_delivery() {
    let db = TestDb::new().await;
    let name = unique_name("tgone");
    let _slot = SlotGuard(name.clone());
    let receiver = Receiver::start(None, |_, _| (200, Duration::ZERO)).await;
    let otlp = OtlpReceiver::start().await;
    let mut config = traced_config(&db, &name, &receiver, &otlp);
    drop(otlp);
    config.telemetry.endpoint = format!("http://127.0.0.1:{}", free_port());
    config.telemetry.export_interval_ms = 20;
    config.telemetry.export_timeout_ms = 1000;
    config.telemetry.queue_size = 16;
    config.telemetry.batch_size = 8;
    let registry = registry_from_config(&config).expect("registry");
    let run = InProcess::start_with(config, registry);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let mut ids = Vec::new();
    for txn in 0..20 {
        let id = format!("loan-{txn}");
        ids.extend(
            raise(
                &db.client,
                &[("Loan", &id, "Loan.A"), ("Loan", &id, "Loan.B")],
            )
            .await,
        );
    }
    receiver.wait_delivered(&ids, Duration::from_secs(60)).await;
    run.collector
        .wait_for(ids.len(), Duration::from_secs(30))
        .await;
    let started = std::time::Instant::now();
    run.stop().await.expect("stops cleanly");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopping took {:?}",
        started.elapsed()
    );
}

/// `listener replay` marks its spans: the handler calls are `replay` calls in the raising
/// trace, linked to the span of their replay batch, and flushed before the command exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_calls_are_marked_as_replayed() {
    let db = TestDb::new().await;
    let name = unique_name("treplay");
    let otlp = OtlpReceiver::start().await;
    let receiver = Receiver::start(None, |_, _| (200, Duration::ZERO)).await;
    let traced = raise_traced(&db, "replayed", &format!("00-{TRACE_ID}-{RAISING_SPAN}-01")).await;
    let mut config = traced_config(&db, &name, &receiver, &otlp);
    // Only the flush at the end of the command sends them.
    config.telemetry.export_interval_ms = 600_000;
    let file = write_config(&config);
    let out = tokio::task::spawn_blocking(move || {
        let out = run_cli(&["replay"], &file);
        drop(file);
        out
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let spans = otlp.spans();
    let calls = calls_of(&spans, traced, "hook");
    assert_eq!(calls.len(), 1, "{spans:#?}");
    let call = calls[0];
    assert_eq!(call.attribute("pg_domain_events.delivery"), "replay");
    assert_eq!(
        (call.trace_id.as_str(), call.parent_span_id.as_str()),
        (TRACE_ID, RAISING_SPAN)
    );
    let (_, batch_span) = call.links.first().expect("linked to its batch");
    let batch = spans
        .iter()
        .find(|s| &s.span_id == batch_span)
        .expect("the batch span");
    assert_eq!(batch.name, "pg_domain_events replay batch");
    assert_eq!(batch.attribute("pg_domain_events.delivery"), "replay");
    let request = receiver.requests().pop().expect("delivered");
    assert_eq!(
        request.headers.get("traceparent").map(String::as_str),
        Some(format!("00-{TRACE_ID}-{}-01", call.span_id).as_str())
    );
}
