//! Listener pipeline: events/s from the WAL to a no-op handler through pgoutput, next to
//! `pg_recvlogical` reading the same WAL, and commit→handler latency at a fixed offered rate.
//!
//! It creates a throwaway database (dropped at the end), a publication and two slots created
//! before the writes, so both consumers read exactly the same WAL:
//! 1. `--events` events are raised (batches of 1000) while nobody reads;
//! 2. the listener library drains its slot to a no-op handler (timed until the last event);
//! 3. `pg_recvlogical` drains the other slot up to the same end LSN (`--endpos`, output discarded);
//! 4. a writer offers `--rate` events/s (transactions of 50) for `--seconds`, and the listener's
//!    handler records commit→handle latency (commit = the writer's COMMIT returned), three
//!    times ([`crate::latency`]): right after the backlog, in steady state (after `VACUUM
//!    (ANALYZE)` and `CHECKPOINT`), and in notify mode with `domain_events.notify = on`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use listener::config::{Config, HandlerConfig};
use listener::{Event, Filter, Handler, HandlerError, Listener, Registry, RetryPolicy};
use tokio_util::sync::CancellationToken;

use crate::store::{connect, dsn_for, ClusterArgs};

/// Flags of `bench pipeline`.
#[derive(clap::Args, Debug)]
pub struct PipelineArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Events in the backlog both consumers drain.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Offered rate of the latency phase, events/s.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Duration of the latency phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The pg_recvlogical binary, of the cluster's major (scripts/bench.sh passes the one of
    /// `PGDE_PG`).
    #[arg(
        long,
        env = "PGDE_PG_RECVLOGICAL",
        default_value = "/usr/lib/postgresql/15/bin/pg_recvlogical"
    )]
    recvlogical: String,
}

/// The value of `key` in a `key=value` connection string, or `default`.
pub(crate) fn param(dsn: &str, key: &str, default: &str) -> String {
    dsn.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(|| default.to_string())
}

/// Counts events; with `delay`, takes that long per event (a handler doing I/O).
#[derive(Default)]
struct Probe {
    count: AtomicU64,
    delay: Duration,
}

/// The registry owns its handlers; the benchmark keeps a second reference to read the counts.
struct Shared(Arc<Probe>);

#[async_trait::async_trait]
impl Handler for Shared {
    async fn handle(&self, _event: &Event) -> Result<(), HandlerError> {
        if !self.0.delay.is_zero() {
            tokio::time::sleep(self.0.delay).await;
        }
        self.0.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

pub(crate) fn listener_config(dsn: &str, dbname: &str, slot: &str) -> Config {
    let mut config = Config::default();
    config.database.host = param(dsn, "host", "127.0.0.1");
    config.database.port = param(dsn, "port", "5432").parse().expect("port");
    config.database.user = param(dsn, "user", "postgres");
    config.database.dbname = dbname.to_string();
    config.replication.slot = slot.to_string();
    config.replication.publication = "bench".into();
    config.replication.create_slot = false;
    config.handlers = vec![HandlerConfig {
        name: None,
        events: vec!["*".into()],
        max_attempts: 1,
        initial_backoff_ms: 1,
        max_backoff_ms: 1,
        on_failure: Default::default(),
        ..HandlerConfig::default()
    }];
    config
}

/// Raises `events` events of [`batch`] in transactions of `per_txn` events.
pub(crate) async fn write_backlog(
    db: &tokio_postgres::Client,
    events: u64,
    per_txn: u64,
) -> anyhow::Result<()> {
    let mut written = 0;
    while written < events {
        let size = (events - written).min(per_txn) as usize;
        db.query(
            "SELECT 1 FROM domain_events.raise_events($1)",
            &[&batch(size, written)],
        )
        .await
        .context("raise_events")?;
        written += size as u64;
    }
    Ok(())
}

pub(crate) fn batch(size: usize, n: u64) -> serde_json::Value {
    serde_json::Value::Array(
        (0..size)
            .map(|i| {
                serde_json::json!({
                    "aggregate_type": "Loan",
                    "aggregate_id": format!("loan-{}", (n + i as u64) % 1000),
                    "event_type": "Loan.Funded",
                    "payload": {"amount": 100000, "rate": 7.5, "term_months": 12, "note": "benchmark"},
                })
            })
            .collect(),
    )
}

/// Creates database `dbname` on the cluster with the extension and publication `bench`; returns
/// a connection to `postgres` (to drop the database at the end) and one to the new database.
pub(crate) async fn publishing_database(
    cluster_dsn: &str,
    dbname: &str,
) -> anyhow::Result<(tokio_postgres::Client, tokio_postgres::Client)> {
    let admin = connect(&dsn_for(cluster_dsn, "postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .context("create database")?;
    let db = connect(&dsn_for(cluster_dsn, dbname)).await?;
    for sql in [
        "CREATE EXTENSION pg_domain_events",
        "CREATE PUBLICATION bench FOR TABLE domain_events.event \
         WITH (publish_via_partition_root = true, publish = 'insert')",
    ] {
        db.batch_execute(sql).await.context("setup")?;
    }
    Ok((admin, db))
}

/// Drops the database made by [`publishing_database`], once its own connection `db` is closed.
pub(crate) async fn drop_publishing_database(
    admin: &tokio_postgres::Client,
    db: tokio_postgres::Client,
    dbname: &str,
) -> anyhow::Result<()> {
    drop(db);
    // Lets the server notice the closed connection before the forced drop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin
        .batch_execute(&format!("DROP DATABASE {dbname} WITH (FORCE)"))
        .await
        .context("drop database")
}

/// Runs the pipeline benchmark and prints its figures.
pub async fn run(a: PipelineArgs) -> anyhow::Result<()> {
    let dbname = format!("pgde_bench_{}", std::process::id());
    let (admin, db) = publishing_database(&a.cluster.dsn, &dbname).await?;
    // One statement per call: a multi-statement string is one transaction, and a slot cannot be
    // created in a transaction that wrote.
    for sql in [
        "SELECT domain_events.maintain()",
        "SELECT pg_create_logical_replication_slot('bench_listener_' || pg_backend_pid(), 'pgoutput')",
    ] {
        db.batch_execute(sql).await.context("setup")?;
    }
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let slot = format!("bench_listener_{pid}");
    let recv_slot = format!("bench_recv_{pid}");
    db.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&recv_slot],
    )
    .await
    .context("second slot")?;

    // 1. Write the backlog.
    let started = Instant::now();
    write_backlog(&db, a.events, 1000).await?;
    let end_lsn: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    println!(
        "wrote {} events in {:.2?} ({:.0} ev/s)",
        a.events,
        started.elapsed(),
        a.events as f64 / started.elapsed().as_secs_f64()
    );

    // 2. The listener drains its slot.
    let probe = Arc::new(Probe::default());
    let mut registry = Registry::new();
    registry.register(
        "noop",
        [Filter::All],
        RetryPolicy::default(),
        Shared(probe.clone()),
    );
    let cancel = CancellationToken::new();
    let listener = Listener::new(listener_config(&a.cluster.dsn, &dbname, &slot), registry)?;
    let started = Instant::now();
    let token = cancel.clone();
    let task = tokio::spawn(async move { listener.run(token).await });
    while probe.count.load(Ordering::Relaxed) < a.events {
        anyhow::ensure!(!task.is_finished(), "the listener stopped early");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ours = started.elapsed();
    cancel.cancel();
    task.await.expect("join").context("listener")?;
    let ours_rate = a.events as f64 / ours.as_secs_f64();
    println!("listener (pgoutput → no-op handler): {ours:.2?}, {ours_rate:.0} ev/s");

    // 3. pg_recvlogical over the same WAL.
    let started = Instant::now();
    let status = tokio::process::Command::new(&a.recvlogical)
        .args([
            "-h",
            &param(&a.cluster.dsn, "host", "127.0.0.1"),
            "-p",
            &param(&a.cluster.dsn, "port", "5432"),
        ])
        .args([
            "-U",
            &param(&a.cluster.dsn, "user", "postgres"),
            "-d",
            &dbname,
            "-S",
            &recv_slot,
        ])
        .args(["--start", "--no-loop", "-f", "/dev/null", "-E", &end_lsn])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=bench",
            "-o",
            "messages=true",
        ])
        .status()
        .await
        .context("run pg_recvlogical")?;
    let theirs = started.elapsed();
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    let theirs_rate = a.events as f64 / theirs.as_secs_f64();
    println!("pg_recvlogical (same WAL, discarded): {theirs:.2?}, {theirs_rate:.0} ev/s");
    println!(
        "ratio listener / pg_recvlogical: {:.2}",
        ours_rate / theirs_rate
    );

    // 4. Latency at a fixed offered rate: right after the backlog (the server's autovacuum of
    //    the new rows and its checkpoint may run meanwhile), then in steady state (that work
    //    done beforehand), then in notify mode with wake-ups on.
    let writer_dsn = dsn_for(&a.cluster.dsn, &dbname);
    let mut config = listener_config(&a.cluster.dsn, &dbname, &slot);
    config.replication.ack_interval_ms = 100;
    let after_backlog = replication_phase(
        "replication, right after the backlog",
        &db,
        &slot,
        config.clone(),
        &writer_dsn,
        &a,
    )
    .await?;
    db.batch_execute("VACUUM (ANALYZE) domain_events.event")
        .await
        .context("vacuum")?;
    db.batch_execute("CHECKPOINT").await.context("checkpoint")?;
    let steady = replication_phase(
        "replication, steady state",
        &db,
        &slot,
        config.clone(),
        &writer_dsn,
        &a,
    )
    .await?;
    let mut notify = config;
    notify.replication.mode = listener::config::Mode::Notify;
    notify.replication.subscription = Some("bench_notify".into());
    let notified = crate::latency::phase(
        "notify mode (domain_events.notify = on), steady state",
        notify,
        &writer_dsn,
        "SET domain_events.notify = on",
        a.rate,
        a.seconds,
        || subscription_exists(&db, "bench_notify"),
    )
    .await?;
    println!(
        "| commit → handler at {} ev/s | p50, p99, p99.9, max |",
        a.rate
    );
    println!("|---|---|");
    println!(
        "| replication, right after the backlog | {} |",
        after_backlog.summary()
    );
    println!("| replication, steady state | {} |", steady.summary());
    println!("| notify mode, notify on | {} |", notified.summary());

    db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .context("drop slot")?;
    db.execute("SELECT pg_drop_replication_slot($1)", &[&recv_slot])
        .await
        .context("drop slot")?;
    drop_publishing_database(&admin, db, &dbname).await
}

/// Whether `slot` has confirmed the WAL up to `target` (the listener caught up).
/// A latency phase of the replication-mode listener on `slot`, started once the slot has
/// confirmed all WAL written before the phase.
async fn replication_phase(
    label: &str,
    db: &tokio_postgres::Client,
    slot: &str,
    config: Config,
    writer_dsn: &str,
    a: &PipelineArgs,
) -> anyhow::Result<crate::latency::Latencies> {
    let target: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let caught_up = || slot_caught_up(db, slot, &target);
    crate::latency::phase(label, config, writer_dsn, "", a.rate, a.seconds, caught_up).await
}

async fn slot_caught_up(
    db: &tokio_postgres::Client,
    slot: &str,
    target: &str,
) -> anyhow::Result<bool> {
    Ok(db
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &target],
        )
        .await
        .context("slot position")?
        .get(0))
}

/// Whether the notify-mode subscription `name` has started.
async fn subscription_exists(db: &tokio_postgres::Client, name: &str) -> anyhow::Result<bool> {
    Ok(db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM domain_events.subscription WHERE name = $1)",
            &[&name],
        )
        .await
        .context("subscription row")?
        .get(0))
}

/// Flags of `bench workers`.
#[derive(clap::Args, Debug)]
pub struct WorkersArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Events in the backlog each configuration drains (over 1000 aggregates).
    #[arg(long, default_value_t = 5_000)]
    events: u64,
    /// Handler delay of the slow configurations, in milliseconds.
    #[arg(long, default_value_t = 1)]
    delay_ms: u64,
}

/// Drains the same backlog with 1, 4 and 16 workers, with a no-op handler and with one that
/// takes `delay_ms` per event, and prints events/s for each.
pub async fn run_workers(a: WorkersArgs) -> anyhow::Result<()> {
    let dbname = format!("pgde_bench_workers_{}", std::process::id());
    let (admin, db) = publishing_database(&a.cluster.dsn, &dbname).await?;
    let delays = [Duration::ZERO, Duration::from_millis(a.delay_ms)];
    let mut runs = Vec::new();
    for delay in delays {
        for workers in [1usize, 4, 16] {
            let slot = format!("bench_w{workers}_d{}", delay.as_millis());
            // Slots first, all before the writes, so each run drains exactly the same WAL.
            db.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .context("create slot")?;
            runs.push((workers, delay, slot));
        }
    }
    write_backlog(&db, a.events, 1000).await?;
    println!(
        "listener workers: {} events over 1000 aggregates, drained from the slot by each configuration",
        a.events
    );
    println!("| workers | handler | events/s |");
    println!("|---:|---|---:|");
    for (workers, delay, slot) in &runs {
        let probe = Arc::new(Probe {
            delay: *delay,
            ..Probe::default()
        });
        let mut registry = Registry::new();
        registry.register(
            "probe",
            [Filter::All],
            RetryPolicy::default(),
            Shared(probe.clone()),
        );
        let mut config = listener_config(&a.cluster.dsn, &dbname, slot);
        config.replication.workers = *workers;
        let listener = Listener::new(config, registry)?;
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let started = Instant::now();
        let task = tokio::spawn(async move { listener.run(token).await });
        while probe.count.load(Ordering::Relaxed) < a.events {
            anyhow::ensure!(!task.is_finished(), "the listener stopped early");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = started.elapsed();
        cancel.cancel();
        task.await??;
        let handler = if delay.is_zero() {
            "no-op".to_string()
        } else {
            format!("{} ms per event", delay.as_millis())
        };
        println!(
            "| {workers} | {handler} | {:.0} |",
            a.events as f64 / elapsed.as_secs_f64()
        );
        db.execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .context("drop slot")?;
    }
    drop_publishing_database(&admin, db, &dbname).await
}
