//! The webhook, NATS and Kafka handlers: events/s from commit to JetStream ack, to Kafka ack
//! and to a local HTTP receiver, what pipelining JetStream acks buys, and what the Kafka
//! handler costs over the raw Kafka client.
//!
//! 1. The `nats` handler on its own: synthetic events published to a throwaway stream, with a
//!    `flush` (which waits for the outstanding acks) after every 1, 10 and 100 events: a flush
//!    per event is the same as waiting for each ack inside `handle`.
//!    The `kafka` handler on its own likewise, next to the raw client producing the same
//!    records in batches of the same size (`crate::kafka`).
//! 2. The whole path: a backlog of `--events` events (transactions of `--per-txn`) drained by
//!    the listener to the `nats` handler, timed until the stream holds them all; the same to
//!    the `kafka` handler (topics of 3 partitions), timed until the broker holds them all.
//! 3. The same backlog drained to the `webhook` handler posting to an HTTP receiver on
//!    127.0.0.1 (axum, answers 204 at once), with 1 and 4 workers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use listener::config::HandlerConfig;
use listener::service::registry_from_config;
use listener::sink::{AnySinkConfig, KafkaConfig, NatsConfig, WebhookConfig};
use listener::sink::{NatsOptions, NatsSink, SubjectTemplate};
use listener::{Event, Handler, Listener};
use tokio_util::sync::CancellationToken;

use crate::pipeline::{
    drop_publishing_database, listener_config, publishing_database, write_backlog,
};
use crate::store::ClusterArgs;

/// Flags of `bench sinks`.
#[derive(clap::Args, Debug)]
pub struct SinksArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The NATS server (JetStream enabled).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Events in the backlog each configuration drains.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Events per transaction of the backlog.
    #[arg(long, default_value_t = 10)]
    per_txn: u64,
    /// A Kafka broker (`host:port`) to use instead of starting a tansu broker for the run.
    #[arg(long)]
    kafka: Option<String>,
    /// The tansu binary started when `--kafka` is not given.
    #[arg(long, default_value = "tansu")]
    tansu: String,
}

fn synthetic(n: u64) -> anyhow::Result<Event> {
    Ok(serde_json::from_value(serde_json::json!({
        "position": n, "id": uuid::Uuid::now_v7().to_string(),
        "aggregate_type": "Loan", "aggregate_id": format!("loan-{}", n % 1000),
        "aggregate_version": 1 + n / 1000, "event_type": "Loan.Funded", "event_version": 1,
        "payload": {"amount": 100000, "rate": 7.5, "term_months": 12, "note": "benchmark"},
        "metadata": {}, "occurred_at": "2026-11-23T16:37:00Z",
        "recorded_at": "2026-11-23T16:37:00Z", "txid": n, "commit_lsn": "0/1"
    }))?)
}

async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Runs the sinks benchmark and prints its figures.
pub async fn run(a: SinksArgs) -> anyhow::Result<()> {
    let client = async_nats::connect(&a.nats)
        .await
        .with_context(|| format!("cannot connect to {}", a.nats))?;
    let js = async_nats::jetstream::new(client);
    let tag = std::process::id();

    // 1. The handler alone.
    println!("nats handler alone, {} synthetic events:", a.events);
    println!("| events per flush | events/s |");
    println!("|---:|---:|");
    for per_flush in [1u64, 10, 100] {
        let stream = format!("BENCH_{tag}_{per_flush}");
        let sink = NatsSink::new(NatsOptions {
            servers: vec![a.nats.clone()],
            subject: SubjectTemplate::parse(&format!(
                "bench{tag}x{per_flush}.{{aggregate_type}}.{{event_type}}"
            ))?,
            stream: stream.clone(),
            create_stream: true,
            duplicate_window: None,
            timeout: Duration::from_secs(10),
            credentials: None,
            max_attempts: 1,
        });
        // Connects and creates the stream outside the clock.
        sink.handle(&synthetic(0)?).await?;
        sink.flush().await?;
        let events: Vec<Event> = (1..=a.events).map(synthetic).collect::<Result<_, _>>()?;
        let started = Instant::now();
        for (i, event) in events.iter().enumerate() {
            sink.handle(event).await?;
            if (i as u64 + 1).is_multiple_of(per_flush) {
                sink.flush().await?;
            }
        }
        sink.flush().await?;
        let elapsed = started.elapsed();
        let stored = stream_messages(&js, &stream).await;
        anyhow::ensure!(stored == a.events + 1, "stream holds {stored} messages");
        println!(
            "| {per_flush} | {:.0} |",
            a.events as f64 / elapsed.as_secs_f64()
        );
        js.delete_stream(&stream).await.ok();
    }

    let broker = crate::kafka::Broker::start(a.kafka.as_deref(), &a.tansu).await?;
    let events: Vec<Event> = (1..=a.events).map(synthetic).collect::<Result<_, _>>()?;
    crate::kafka::handler_against_raw_client(&broker, &events, tag).await?;
    let kafka = broker.client().await?;

    // 2 and 3. The whole path from the slot.
    let dbname = format!("pgde_bench_sinks_{tag}");
    let (admin, db) = publishing_database(&a.cluster.dsn, &dbname).await?;
    let runs = ["nats_w1", "kafka_w1", "webhook_w1", "webhook_w4"];
    for slot in runs {
        // Slots first, all before the writes, so each run drains exactly the same WAL.
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&format!("bench_{slot}")],
        )
        .await
        .context("create slot")?;
    }
    write_backlog(&db, a.events, a.per_txn).await?;

    // An HTTP receiver that counts and answers 204.
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", socket.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(socket, app).await });

    println!(
        "the listener from the slot, {} events in transactions of {}:",
        a.events, a.per_txn
    );
    println!("| handler | workers | events/s |");
    println!("|---|---:|---:|");
    for slot in runs {
        let stream = format!("BENCH_{tag}_PIPE");
        let topic_prefix = format!("bench{tag}pipe");
        // Every backlog event is a Loan.
        let mut counter = crate::kafka::RecordCounter::new(&format!("{topic_prefix}.Loan"));
        let mut config = listener_config(&a.cluster.dsn, &dbname, &format!("bench_{slot}"));
        let (sink, workers): (AnySinkConfig, usize) = match slot {
            "nats_w1" => (
                NatsConfig {
                    servers: Some(vec![a.nats.clone()]),
                    stream: Some(stream.clone()),
                    subject: Some(format!("bench{tag}pipe.{{aggregate_type}}.{{event_type}}")),
                    ..NatsConfig::default()
                }
                .into(),
                1,
            ),
            "kafka_w1" => (
                KafkaConfig {
                    brokers: Some(vec![broker.address.clone()]),
                    topic: Some(format!("{topic_prefix}.{{aggregate_type}}")),
                    partitions: Some(3),
                    ..KafkaConfig::default()
                }
                .into(),
                1,
            ),
            "webhook_w1" => (WebhookConfig::new(url.clone()).into(), 1),
            _ => (WebhookConfig::new(url.clone()).into(), 4),
        };
        let kind = sink.kind();
        config.replication.workers = workers;
        config.handlers = vec![HandlerConfig::new(sink)];
        let registry = registry_from_config(&config)?;
        let listener = Listener::new(config, registry)?;
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        received.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let task = tokio::spawn(async move { listener.run(token).await });
        loop {
            let done = match kind {
                "nats" => stream_messages(&js, &stream).await,
                "kafka" => counter.count(&kafka).await?,
                _ => received.load(Ordering::Relaxed),
            };
            if done >= a.events {
                break;
            }
            anyhow::ensure!(!task.is_finished(), "the listener stopped early");
            // Counting Kafka records means fetching them: poll less often.
            let poll = if kind == "kafka" { 20 } else { 2 };
            tokio::time::sleep(Duration::from_millis(poll)).await;
        }
        let elapsed = started.elapsed();
        cancel.cancel();
        task.await??;
        println!(
            "| {} | {workers} | {:.0} |",
            kind,
            a.events as f64 / elapsed.as_secs_f64()
        );
        if kind == "nats" {
            js.delete_stream(&stream).await.ok();
        }
        db.execute(
            "SELECT pg_drop_replication_slot($1)",
            &[&format!("bench_{slot}")],
        )
        .await
        .context("drop slot")?;
    }
    server.abort();
    drop_publishing_database(&admin, db, &dbname).await
}
