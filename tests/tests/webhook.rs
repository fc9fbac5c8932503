//! End-to-end tests of the `webhook` handler: the listener (library or binary) follows a real
//! slot and POSTs to a real HTTP receiver started by the test, which verifies the signature and
//! answers as each test scripts it (errors, slowness).

use std::collections::HashMap;
use std::time::Duration;

use e2e::listener_support::*;
use e2e::sink_support::*;
use e2e::TestDb;
use listener::service::registry_from_config;

const SLOT_WAIT: Duration = Duration::from_secs(120);
const SECRET: &[u8] = b"whsec-e2e-\xc3\xa9";

fn webhook(receiver: &Receiver, max_attempts: u32) -> listener::config::HandlerConfig {
    handler(
        listener::sink::WebhookConfig::new(receiver.url()),
        "hook",
        max_attempts,
    )
}

/// Starts the library with the configured handlers (plus the test collector).
fn start(config: listener::config::Config) -> InProcess {
    let registry = registry_from_config(&config).expect("registry");
    InProcess::start_with(config, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_signed_and_arrive_in_aggregate_order() {
    let db = TestDb::new().await;
    let name = unique_name("hook");
    let _slot = SlotGuard(name.clone());
    let receiver = Receiver::start(Some(SECRET), |_, _| (200, Duration::ZERO)).await;
    let mut config = config_for(&db, &name);
    config.replication.workers = 3;
    config.handlers = vec![e2e::sink_support::handler(
        listener::sink::WebhookConfig {
            secret_env: Some("PGDE_E2E_HOOK_SECRET".into()),
            timeout_ms: Some(5000),
            ..listener::sink::WebhookConfig::new(receiver.url())
        },
        "hook",
        3,
    )];
    let file = write_config(&config);
    let secret = std::str::from_utf8(SECRET).unwrap();
    let mut run = ListenerProcess::spawn(&file, &[("PGDE_E2E_HOOK_SECRET", secret)]);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let mut ids = Vec::new();
    for txn in 0..20 {
        let a = format!("loan-{}", txn % 4);
        let b = format!("loan-{}", (txn + 1) % 4);
        ids.extend(
            raise(
                &db.client,
                &[
                    ("Loan", &a, "Loan.Funded"),
                    ("Ticket", "t-1", "ticket.created"),
                    ("Loan", &b, "Loan.StatusChanged"),
                    ("Loan", &a, "Loan.Repaid"),
                ],
            )
            .await,
        );
    }
    // Raised inside a trace: the receiver gets its W3C trace context as a header.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    db.client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL domain_events.traceparent = '{traceparent}'; \
             SELECT domain_events.raise_event('Loan', 'traced', 'Loan.Traced', \
             '{{\"secret\": \"not for logs\"}}'); COMMIT"
        ))
        .await
        .expect("a traced raise");
    let traced: uuid::Uuid = db
        .client
        .query_one(
            "SELECT id FROM domain_events.event WHERE aggregate_id = 'traced'",
            &[],
        )
        .await
        .expect("the traced event")
        .get(0);
    ids.push(traced);
    receiver.wait_delivered(&ids, Duration::from_secs(60)).await;
    run.terminate();
    let status = run.wait_exit(Duration::from_secs(30)).await.expect("exits");
    assert!(status.success(), "{}", run.stderr());

    let requests = receiver.requests();
    assert_eq!(requests.len(), ids.len(), "one request per event");
    for r in &requests {
        let expected = (r.event_id == traced.to_string()).then_some(traceparent);
        assert_eq!(r.headers.get("traceparent").map(String::as_str), expected);
    }
    let mut versions: HashMap<(String, String), Vec<i64>> = HashMap::new();
    for r in &requests {
        assert_eq!(r.signature_ok, Some(true), "bad signature: {:?}", r.headers);
        assert_eq!(r.status, 200);
        assert_eq!(r.event["id"].as_str(), Some(r.event_id.as_str()));
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(
            r.headers["x-event-type"],
            r.event["event_type"].as_str().unwrap()
        );
        assert_eq!(
            r.headers["x-aggregate-type"],
            r.event["aggregate_type"].as_str().unwrap()
        );
        assert_eq!(r.event["payload"]["secret"], "not for logs");
        versions
            .entry((
                r.event["aggregate_type"].as_str().unwrap().into(),
                r.event["aggregate_id"].as_str().unwrap().into(),
            ))
            .or_default()
            .push(r.event["aggregate_version"].as_i64().unwrap());
    }
    assert_eq!(versions.len(), 6);
    for (aggregate, seen) in versions {
        let expected: Vec<i64> = (1..=seen.len() as i64).collect();
        assert_eq!(seen, expected, "{aggregate:?} out of order");
    }
    assert!(dead_letters(&db.client, &name).await.is_empty());
    assert!(
        !run.stderr().contains("not for logs"),
        "a payload reached the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_variable_stops_the_binary_naming_it_but_not_the_cli() {
    let db = TestDb::new().await;
    let name = unique_name("hooksecret");
    let receiver = Receiver::start(None, |_, _| (200, Duration::ZERO)).await;
    let mut config = config_for(&db, &name);
    config.handlers = vec![e2e::sink_support::handler(
        listener::sink::WebhookConfig {
            secret_env: Some("PGDE_E2E_UNSET_SECRET".into()),
            ..listener::sink::WebhookConfig::new(receiver.url())
        },
        "hook",
        3,
    )];
    let file = write_config(&config);
    let mut run = ListenerProcess::spawn(&file, &[]);
    let status = run
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits at startup");
    assert_eq!(status.code(), Some(2), "a configuration error");
    assert!(
        run.stderr().contains("PGDE_E2E_UNSET_SECRET"),
        "{}",
        run.stderr()
    );
    // Commands that do not run handlers do not need their secrets.
    let list = run_cli(&["dead-letters", "list"], &file);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_delivered() {
    let db = TestDb::new().await;
    let name = unique_name("hook5xx");
    let _slot = SlotGuard(name.clone());
    // 500, 429, 503, 408, then 200 for every event.
    let receiver = Receiver::start(None, |_, attempt| {
        let status = [500, 429, 503, 408]
            .get(attempt - 1)
            .copied()
            .unwrap_or(200);
        (status, Duration::ZERO)
    })
    .await;
    let mut config = config_for(&db, &name);
    config.handlers = vec![webhook(&receiver, 5)];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let first = raise(&db.client, &[("Loan", "1", "Loan.Funded")]).await;
    let second = raise(&db.client, &[("Loan", "1", "Loan.Repaid")]).await;
    receiver
        .wait_delivered(&[first[0], second[0]], Duration::from_secs(60))
        .await;
    listener
        .collector
        .wait_for(2, Duration::from_secs(30))
        .await;
    assert_eq!(receiver.attempts(first[0]), 5);
    assert_eq!(receiver.attempts(second[0]), 5);
    let order: Vec<String> = receiver
        .delivered()
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    assert_eq!(order, [first[0].to_string(), second[0].to_string()]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(dead_letters(&db.client, &name).await.is_empty());
    listener.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_dead_lettered_without_retries() {
    let db = TestDb::new().await;
    let name = unique_name("hook4xx");
    let _slot = SlotGuard(name.clone());
    let receiver = Receiver::start(None, |r, _| {
        let status = if r.event["event_type"] == "Loan.Rejected" {
            400
        } else {
            200
        };
        (status, Duration::ZERO)
    })
    .await;
    let mut config = config_for(&db, &name);
    config.handlers = vec![webhook(&receiver, 5)];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let rejected = raise(&db.client, &[("Loan", "1", "Loan.Rejected")]).await;
    let funded = raise(&db.client, &[("Loan", "2", "Loan.Funded")]).await;
    let letters = wait_dead_letters(&db.client, &name, 1, Duration::from_secs(60)).await;
    receiver
        .wait_delivered(&funded, Duration::from_secs(60))
        .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (handler, event_id, _, attempts, error) = &letters[0];
    assert_eq!(handler, "hook");
    assert_eq!(*event_id, rejected[0]);
    assert_eq!(*attempts, 1, "a 400 is not retried");
    assert!(error.contains("400"), "{error}");
    assert_eq!(receiver.attempts(rejected[0]), 1);
    listener.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_slower_than_the_timeout_is_retried_then_dead_lettered() {
    let db = TestDb::new().await;
    let name = unique_name("hookslow");
    let _slot = SlotGuard(name.clone());
    let receiver = Receiver::start(None, |r, _| {
        let delay = if r.event["event_type"] == "Loan.Slow" {
            Duration::from_secs(3)
        } else {
            Duration::ZERO
        };
        (200, delay)
    })
    .await;
    let mut config = config_for(&db, &name);
    config.handlers = vec![e2e::sink_support::handler(
        listener::sink::WebhookConfig {
            timeout_ms: Some(300),
            ..listener::sink::WebhookConfig::new(receiver.url())
        },
        "hook",
        2,
    )];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let slow = raise(&db.client, &[("Loan", "1", "Loan.Slow")]).await;
    let fast = raise(&db.client, &[("Loan", "2", "Loan.Funded")]).await;
    let letters = wait_dead_letters(&db.client, &name, 1, Duration::from_secs(60)).await;
    let (handler, event_id, _, attempts, error) = &letters[0];
    assert_eq!(handler, "hook");
    assert_eq!(*event_id, slow[0]);
    assert_eq!(*attempts, 2);
    assert!(error.contains("timed out"), "{error}");
    receiver
        .wait_delivered(&fast, Duration::from_secs(30))
        .await;
    assert_eq!(
        receiver.attempts(slow[0]),
        2,
        "retried once after the timeout"
    );
    listener.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_within_the_timeout_is_delivered() {
    let db = TestDb::new().await;
    let name = unique_name("hookpatient");
    let _slot = SlotGuard(name.clone());
    let receiver = Receiver::start(None, |_, _| (204, Duration::from_millis(400))).await;
    let mut config = config_for(&db, &name);
    config.handlers = vec![e2e::sink_support::handler(
        listener::sink::WebhookConfig {
            timeout_ms: Some(3000),
            ..listener::sink::WebhookConfig::new(receiver.url())
        },
        "hook",
        1,
    )];
    let listener = start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let ids = raise(
        &db.client,
        &[
            ("Loan", "1", "Loan.Funded"),
            ("Loan", "1", "Loan.Repaid"),
            ("Loan", "2", "Loan.Funded"),
        ],
    )
    .await;
    receiver.wait_delivered(&ids, Duration::from_secs(30)).await;
    listener
        .collector
        .wait_for(3, Duration::from_secs(30))
        .await;
    for id in &ids {
        assert_eq!(receiver.attempts(*id), 1);
    }
    assert!(dead_letters(&db.client, &name).await.is_empty());
    listener.stop().await.unwrap();
}
