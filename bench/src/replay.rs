//! Replay throughput: events/s from `domain_events.event` to a no-op handler through the
//! listener library's replay (`listener replay`), next to baselines over the same rows.
//!
//! It creates a throwaway database (dropped at the end), raises `--events` events with
//! `raise_events` batches (generated server-side) over `--aggregates` aggregates, vacuums the
//! table (so that no run pays for setting hint bits), then, `--rounds` times, alternately:
//! 1. `SELECT count(*)` of the table (the floor: a scan, nothing sent);
//! 2. `COPY (SELECT <the replay's columns> … ORDER BY position) TO STDOUT`, bytes received and
//!    dropped (the same rows sent to a client, no decoding, no handlers);
//! 3. the replay: one snapshot, batches fetched through a portal, decoded into events and
//!    dispatched to a no-op handler (flushed per batch).
//!
//! The medians are reported, with the replay's ratio to the COPY baseline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::TryStreamExt;
use listener::replay::{Replay, Selection};
use listener::{Event, Filter, Handler, HandlerError, Registry, RetryPolicy};
use tokio_util::sync::CancellationToken;

use crate::pipeline::param;
use crate::store::{connect, dsn_for, ClusterArgs};

/// Flags of `bench replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Events stored and replayed.
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Aggregates the events are spread over.
    #[arg(long, default_value_t = 1_000)]
    aggregates: i64,
    /// Measurements of each kind; the medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events per fetch of the replay.
    #[arg(long, default_value_t = listener::replay::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
}

/// The replay's select list (`listener::dead_letter`'s, which the replay reads), for COPY.
const COPY_BASELINE: &str = "COPY (SELECT position, id, aggregate_type, aggregate_id, \
    aggregate_version, event_type, event_version, payload::text, metadata::text, occurred_at, \
    recorded_at, txid::text FROM domain_events.event ORDER BY position) TO STDOUT";

/// Generates and raises events `$1 ..= $2` in one `raise_events` call.
const RAISE_RANGE: &str = "SELECT count(*) FROM domain_events.raise_events((
    SELECT jsonb_agg(jsonb_build_object(
        'aggregate_type', 'Loan',
        'aggregate_id', (g % $3)::text,
        'event_type', CASE g % 3 WHEN 0 THEN 'Loan.Created' WHEN 1 THEN 'Loan.Funded' ELSE 'Loan.Repaid' END,
        'payload', jsonb_build_object('amount', g, 'currency', 'EUR', 'term_months', 12),
        'metadata', jsonb_build_object('actor', 'bench')) ORDER BY g)
    FROM generate_series($1::bigint, $2::bigint) g))";

/// Counts events and does nothing else.
#[derive(Default)]
struct NoOp(Arc<AtomicU64>);

#[async_trait::async_trait]
impl Handler for NoOp {
    async fn handle(&self, _event: &Event) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn rate(events: i64, d: Duration) -> f64 {
    events as f64 / d.as_secs_f64()
}

/// Runs the benchmark and prints its figures.
pub async fn run(a: ReplayArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.rounds >= 1 && a.events >= 1,
        "--rounds and --events must be positive"
    );
    let admin = connect(&a.cluster.dsn).await?;
    let dbname = format!("pgde_bench_replay_{}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .context("create database")?;
    let result = measure(&a, &dbname).await;
    admin
        .batch_execute(&format!("DROP DATABASE {dbname} WITH (FORCE)"))
        .await
        .context("drop database")?;
    result
}

async fn measure(a: &ReplayArgs, dbname: &str) -> anyhow::Result<()> {
    let db = connect(&dsn_for(&a.cluster.dsn, dbname)).await?;
    db.batch_execute("CREATE EXTENSION pg_domain_events")
        .await
        .context("CREATE EXTENSION pg_domain_events")?;

    let loading = Instant::now();
    const BATCH: i64 = 10_000;
    let mut first = 1;
    while first <= a.events {
        let last = (first + BATCH - 1).min(a.events);
        db.query_one(RAISE_RANGE, &[&first, &last, &a.aggregates])
            .await
            .context("raise_events")?;
        first = last + 1;
    }
    let load = loading.elapsed();
    db.batch_execute("VACUUM (ANALYZE) domain_events.event")
        .await
        .context("vacuum")?;
    let bytes: i64 = db
        .query_one(
            "SELECT sum(pg_column_size(payload) + pg_column_size(metadata))::bigint \
             FROM domain_events.event",
            &[],
        )
        .await?
        .get(0);
    println!(
        "loaded {} events over {} aggregates in {:.1} s ({:.0} ev/s); payload+metadata {:.0} B/event",
        a.events,
        a.aggregates,
        load.as_secs_f64(),
        rate(a.events, load),
        bytes as f64 / a.events as f64
    );

    let database = listener::config::DatabaseConfig {
        host: param(&a.cluster.dsn, "host", "127.0.0.1"),
        port: param(&a.cluster.dsn, "port", "5432")
            .parse()
            .context("port")?,
        user: param(&a.cluster.dsn, "user", "postgres"),
        dbname: dbname.to_string(),
        ..Default::default()
    };

    let (mut counts, mut copies, mut replays) = (Vec::new(), Vec::new(), Vec::new());
    let mut copied_bytes = 0u64;
    for round in 1..=a.rounds {
        let t = Instant::now();
        let n: i64 = db
            .query_one("SELECT count(*) FROM domain_events.event", &[])
            .await?
            .get(0);
        anyhow::ensure!(n == a.events, "count(*) = {n}");
        counts.push(t.elapsed());

        let t = Instant::now();
        let stream = db.copy_out(COPY_BASELINE).await.context("COPY")?;
        futures_util::pin_mut!(stream);
        copied_bytes = 0;
        while let Some(chunk) = stream.try_next().await.context("COPY data")? {
            copied_bytes += chunk.len() as u64;
        }
        copies.push(t.elapsed());

        let seen = Arc::new(AtomicU64::new(0));
        let mut registry = Registry::new();
        registry.register(
            "noop",
            [Filter::All],
            RetryPolicy::default(),
            NoOp(seen.clone()),
        );
        // The replay runs on the runtime `listener replay` uses (one thread, its own); the
        // `COPY` baseline above on this multi-thread one, where it is fastest.
        let replay =
            Replay::new(database.clone(), Selection::default()).with_batch_size(a.batch_size);
        let (summary, took) = tokio::task::spawn_blocking(move || {
            let runtime = listener::replay::runtime_builder()
                .enable_all()
                .build()
                .context("replay runtime")?;
            let t = Instant::now();
            let summary = runtime
                .block_on(replay.run(registry, CancellationToken::new()))
                .context("replay")?;
            anyhow::Ok((summary, t.elapsed()))
        })
        .await
        .context("replay thread")??;
        anyhow::ensure!(
            summary.succeeded() && seen.load(Ordering::Relaxed) == a.events as u64,
            "replay incomplete: {}",
            summary.render()
        );
        replays.push(took);
        println!(
            "round {round}: count(*) {:.3} s, COPY {:.3} s, replay {:.3} s ({:.0} ev/s)",
            counts[round - 1].as_secs_f64(),
            copies[round - 1].as_secs_f64(),
            took.as_secs_f64(),
            rate(a.events, took)
        );
    }
    let (count, copy, replay) = (median(counts), median(copies), median(replays));
    println!(
        "medians of {} round(s), {} events:\n\
         \x20 SELECT count(*)                  {:>9.0} ev/s ({:.3} s)\n\
         \x20 COPY … TO STDOUT (no decoding)   {:>9.0} ev/s ({:.3} s, {:.0} MB)\n\
         \x20 replay → no-op handler           {:>9.0} ev/s ({:.3} s)\n\
         \x20 replay / COPY = {:.2}   (target: replay ≥ 300,000 ev/s)",
        a.rounds,
        a.events,
        rate(a.events, count),
        count.as_secs_f64(),
        rate(a.events, copy),
        copy.as_secs_f64(),
        copied_bytes as f64 / 1e6,
        rate(a.events, replay),
        replay.as_secs_f64(),
        copy.as_secs_f64() / replay.as_secs_f64(),
    );
    Ok(())
}
