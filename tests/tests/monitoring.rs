//! End-to-end test of the shipped monitoring (`deploy/`): a real Prometheus started on a free
//! port scrapes a listener under load and loads `deploy/prometheus/alerts.yml`; every PromQL
//! expression of the Grafana dashboard and of the alert rules is evaluated through Prometheus'
//! HTTP API and must parse and return series; a stalled handler makes the lag alert's expression
//! cross its threshold (and the alert go pending).
//!
//! It owns a slot, so it runs in the nextest group `serial-cluster`.

use std::time::{Duration, Instant};

use e2e::admin_support::free_port;
use e2e::listener_support::*;
use e2e::prometheus_support::{repo_root, without_threshold, Prometheus};
use e2e::TestDb;
use listener::{Event, Filter, Handler, HandlerError, Registry, RetryPolicy};
use serde_json::json;
use tokio::sync::watch;

const SLOT_WAIT: Duration = Duration::from_secs(120);
/// The lag alert's threshold in `alerts.yml`, plus a margin.
const STALL: Duration = Duration::from_secs(66);

/// Holds the events of type `Loan.Stalled` until released.
struct Stalls {
    released: watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl Handler for Stalls {
    async fn handle(&self, _event: &Event) -> Result<(), HandlerError> {
        let mut released = self.released.clone();
        released
            .wait_for(|r| *r)
            .await
            .map_err(|_| HandlerError::transient("the test ended"))?;
        Ok(())
    }
}

/// A publishing handler (it names a target) whose every fifth call fails transiently.
#[derive(Default)]
struct Publishes {
    calls: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl Handler for Publishes {
    async fn handle(&self, _event: &Event) -> Result<(), HandlerError> {
        let n = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % 5 == 4 {
            return Err(HandlerError::transient("downstream busy"));
        }
        Ok(())
    }

    fn target(&self) -> Option<String> {
        Some("events.{event_type}".into())
    }
}

/// Every `expr` of the dashboard's panels.
fn dashboard_expressions() -> Vec<String> {
    let path = repo_root().join("deploy/grafana/pg_domain_events.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_string())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    exprs
}

/// `(alert name, expression)` of every rule Prometheus loaded, checked against the file.
async fn alert_rules(prometheus: &Prometheus) -> Vec<(String, String)> {
    let file = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml");
    let in_file = file
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let (_, body) = e2e::admin_support::get(prometheus.port, "/api/v1/rules", None)
        .await
        .expect("rules");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let rules: Vec<(String, String)> = answer["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            assert_eq!(r["health"], "ok", "{r}");
            (
                r["name"].as_str().expect("name").to_string(),
                r["query"].as_str().expect("query").to_string(),
            )
        })
        .collect();
    assert_eq!(
        rules.len(),
        in_file,
        "every rule of alerts.yml loaded: {rules:?}"
    );
    rules
}

/// Queries `expr` until it returns series; panics after `timeout` with the last answer.
async fn wait_series(
    prometheus: &Prometheus,
    expr: &str,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = prometheus.query(expr).await;
        match &answer {
            Ok(series) if !series.is_empty() => return series.clone(),
            Err(err) => panic!("Prometheus refuses {expr}: {err}"),
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "{expr} returns no series after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_dashboard_and_alert_expression_and_the_lag_alert_fires() {
    let db = TestDb::new().await;
    let name = unique_name("mon");
    let _guard = SlotGuard(name.clone());
    let port = free_port();
    let (release, released) = watch::channel(false);
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    };
    let mut registry = Registry::new();
    registry.register(
        "stalls",
        ["Loan.Stalled".parse().expect("filter")],
        retry,
        Stalls { released },
    );
    registry.register("bus", [Filter::All], retry, Publishes::default());
    let mut config = config_for(&db, &name);
    config.admin.listen = Some(format!("127.0.0.1:{port}"));
    config.replication.status_interval_secs = 1;
    let listener = InProcess::start_with(config, registry);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let preloaded: String = db
        .client
        .query_one("SHOW shared_preload_libraries", &[])
        .await
        .expect("show")
        .get(0);
    let preloaded = preloaded.contains("pg_domain_events");

    let rules = repo_root().join("deploy/prometheus/alerts.yml");
    let prometheus = Prometheus::start(port, &rules).await;

    // Load: a writer raising small transactions until the test ends.
    let writer = {
        let client = db.connect().await;
        tokio::spawn(async move {
            for i in 0u64.. {
                let batch = json!([
                    {"aggregate_type": "Loan", "aggregate_id": format!("loan-{}", i % 7),
                     "event_type": "Loan.Funded", "payload": {"n": i}},
                    {"aggregate_type": "Loan", "aggregate_id": format!("loan-{}", i % 7),
                     "event_type": "Loan.Repaid", "payload": {"n": i}}
                ]);
                if client
                    .query("SELECT id FROM domain_events.raise_events($1)", &[&batch])
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // A stalled handler: its lag grows from now on.
    db.client
        .query(
            "SELECT domain_events.raise_event('Loan', 'stalled-1', 'Loan.Stalled')",
            &[],
        )
        .await
        .expect("raise");
    let stalled_at = Instant::now();

    // Every dashboard expression parses and returns series once a few scrapes are in.
    let wait = Duration::from_secs(30);
    for expr in dashboard_expressions() {
        // The raise-side figures are counted only by a server that preloads the library.
        if !preloaded && expr.contains("events_raised_total") {
            prometheus.query(&expr).await.expect("parses");
            continue;
        }
        wait_series(&prometheus, &expr, wait).await;
    }
    // Every alert expression parses; its measured side returns series (the disk alert reads
    // node_exporter's filesystem series, which this test does not run: promtool's unit tests
    // cover it).
    let alerts = alert_rules(&prometheus).await;
    assert!(alerts.len() >= 6, "{alerts:?}");
    for (alert, expr) in &alerts {
        prometheus
            .query(expr)
            .await
            .unwrap_or_else(|e| panic!("{alert}: {e}"));
        if alert == "PgDomainEventsStoreDiskHigh" {
            continue;
        }
        wait_series(&prometheus, without_threshold(expr), wait).await;
    }

    // The stalled handler's lag crosses the alert's threshold: its expression returns it, and
    // the alert goes pending.
    let (_, lag_expr) = alerts
        .iter()
        .find(|(a, _)| a == "PgDomainEventsHandlerLagHigh")
        .expect("the lag alert");
    assert!(
        prometheus.query(lag_expr).await.expect("query").is_empty(),
        "no lag alert before the threshold"
    );
    tokio::time::sleep(STALL.saturating_sub(stalled_at.elapsed())).await;
    let firing = wait_series(&prometheus, lag_expr, Duration::from_secs(15)).await;
    assert!(
        firing.iter().all(|s| s["metric"]["handler"] == "stalls"),
        "{firing:?}"
    );
    wait_series(
        &prometheus,
        "ALERTS{alertname=\"PgDomainEventsHandlerLagHigh\",handler=\"stalls\"}",
        Duration::from_secs(15),
    )
    .await;

    release.send(true).expect("release");
    writer.abort();
    listener.stop().await.expect("clean stop");
}
