//! Listener traces: the same backlog drained from the slot to a no-op handler with telemetry
//! off and with telemetry on, every event sampled and exported over OTLP/HTTP to a receiver
//! started by the bench (in this process, decoding each export as a collector would), in the
//! same run; events/s of each and their ratio.
//!
//! Every event of the backlog carries a `traceparent` (so each handler span is parented on the
//! raising trace, the costlier path), and both configurations read the same WAL: all slots are
//! created before the writes. Each round drains with both configurations, alternating which
//! goes first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use listener::config::{SamplerKind, TelemetryConfig};
use listener::{Event, Filter, Handler, HandlerError, Listener, Registry, RetryPolicy};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{drop_publishing_database, listener_config, publishing_database};

/// Flags of `bench traces`.
#[derive(clap::Args, Debug)]
pub struct TracesArgs {
    #[command(flatten)]
    cluster: crate::store::ClusterArgs,
    /// Events in the backlog each configuration drains.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Rounds; each drains the backlog with tracing off and with tracing on.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Counts the events it is given.
struct Count(Arc<AtomicU64>);

#[async_trait::async_trait]
impl Handler for Count {
    async fn handle(&self, _event: &Event) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Spans received by the OTLP receiver.
#[derive(Default)]
struct Received {
    spans: AtomicU64,
    requests: AtomicU64,
}

async fn receive(State(received): State<Arc<Received>>, body: axum::body::Bytes) -> Vec<u8> {
    received.requests.fetch_add(1, Ordering::Relaxed);
    if let Ok(request) = ExportTraceServiceRequest::decode(body.as_ref()) {
        let spans: usize = request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        received.spans.fetch_add(spans as u64, Ordering::Relaxed);
    }
    // An empty ExportTraceServiceResponse: everything accepted.
    Vec::new()
}

/// Starts the OTLP/HTTP receiver on a free port; returns its base URL.
async fn start_receiver(received: Arc<Received>) -> anyhow::Result<String> {
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(received);
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(socket, app).await;
    });
    Ok(format!("http://{addr}"))
}

/// Raises `events` events in transactions of 1000, each raised in a trace of its own.
async fn write_traced_backlog(db: &tokio_postgres::Client, events: u64) -> anyhow::Result<()> {
    let mut written = 0u64;
    while written < events {
        let size = (events - written).min(1000);
        let batch = serde_json::Value::Array(
            (written..written + size)
                .map(|n| {
                    serde_json::json!({
                        "aggregate_type": "Loan",
                        "aggregate_id": format!("loan-{}", n % 1000),
                        "event_type": "Loan.Funded",
                        "payload": {"amount": 100000, "rate": 7.5, "term_months": 12},
                        "metadata": {"traceparent": format!("00-{:032x}-{:016x}-01", n + 1, n + 1)},
                    })
                })
                .collect(),
        );
        db.query("SELECT 1 FROM domain_events.raise_events($1)", &[&batch])
            .await
            .context("raise_events")?;
        written += size;
    }
    Ok(())
}

/// Drains `slot` to a counting handler, with `telemetry`; returns the events/s.
async fn drain(
    dsn: &str,
    dbname: &str,
    slot: &str,
    events: u64,
    telemetry: TelemetryConfig,
) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let mut registry = Registry::new();
    registry.register(
        "noop",
        [Filter::All],
        RetryPolicy::default(),
        Count(count.clone()),
    );
    let mut config = listener_config(dsn, dbname, slot);
    config.telemetry = telemetry;
    let listener = Listener::new(config, registry)?;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move { listener.run(token).await });
    while count.load(Ordering::Relaxed) < events {
        anyhow::ensure!(!task.is_finished(), "the listener stopped early");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    cancel.cancel();
    task.await.context("join")?.context("listener")?;
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// Runs the traces benchmark and prints its figures.
pub async fn run(a: TracesArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.rounds > 0 && a.events > 0,
        "--rounds and --events must be positive"
    );
    let dbname = format!("pgde_bench_traces_{}", std::process::id());
    let (admin, db) = publishing_database(&a.cluster.dsn, &dbname).await?;
    db.batch_execute("SELECT domain_events.maintain()")
        .await
        .context("setup")?;
    let mut slots = Vec::new();
    for round in 0..a.rounds {
        for traced in [false, true] {
            let slot = format!("bench_traces_{round}_{}", if traced { "on" } else { "off" });
            db.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .context("create slot")?;
            slots.push(slot);
        }
    }
    let started = Instant::now();
    write_traced_backlog(&db, a.events).await?;
    println!(
        "wrote {} traced events in {:.2?}; each configuration drains them from its own slot",
        a.events,
        started.elapsed()
    );
    let received = Arc::new(Received::default());
    let endpoint = start_receiver(received.clone()).await?;
    // Every span kept: a queue that holds a whole backlog's worth between exports.
    let on = TelemetryConfig {
        enabled: true,
        endpoint,
        sampler: SamplerKind::AlwaysOn,
        queue_size: 65_536,
        batch_size: 4096,
        export_interval_ms: 200,
        ..TelemetryConfig::default()
    };
    println!("| round | tracing off ev/s | tracing on ev/s | on / off | spans exported |");
    println!("|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for round in 0..a.rounds {
        let (off_slot, on_slot) = (&slots[2 * round], &slots[2 * round + 1]);
        let before = received.spans.load(Ordering::Relaxed);
        // Alternate which goes first, so that drift on the machine hits both alike.
        let runs = [
            (off_slot, TelemetryConfig::default()),
            (on_slot, on.clone()),
        ];
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut rates = [0.0; 2];
        for k in order {
            let (slot, telemetry) = &runs[k];
            rates[k] = drain(&a.cluster.dsn, &dbname, slot, a.events, telemetry.clone()).await?;
        }
        let [off, traced] = rates;
        // The listener flushed on stop: what it recorded has arrived.
        let spans = received.spans.load(Ordering::Relaxed) - before;
        let ratio = traced / off;
        ratios.push(ratio);
        println!("| {round} | {off:.0} | {traced:.0} | {ratio:.2} | {spans} |");
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "tracing on / off: median {:.2}, range {:.2}-{:.2} over {} rounds ({} export requests)",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
        ratios.len(),
        received.requests.load(Ordering::Relaxed)
    );
    for slot in &slots {
        db.execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .context("drop slot")?;
    }
    drop_publishing_database(&admin, db, &dbname).await
}
