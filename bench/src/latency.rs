//! Commit → handler latency of a listener at a fixed offered rate, with what the server was
//! doing when events waited: the pipeline bench's latency phases.
//!
//! A writer offers `rate` events/s in transactions of 50 for `seconds`; the handler records
//! when each event arrived (commit = the writer's COMMIT returned). Meanwhile a sampler reads
//! `pg_stat_activity` and `pg_stat_progress_vacuum` every 10 ms, so that each stall (events
//! waiting more than [`STALL`]) is printed with the server's background work at that moment.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use listener::config::Config;
use listener::{Event, Filter, Handler, HandlerError, Listener, Registry, RetryPolicy};
use tokio_util::sync::CancellationToken;

use crate::store::connect;

/// A latency above this is reported as a stall, with the server activity sampled meanwhile.
const STALL: Duration = Duration::from_millis(20);

/// Events per writer transaction.
const PER_TXN: u64 = 50;

/// What the server's processes were doing, sampled every 10 ms: background work that is not
/// idle (autovacuum workers with their relation and phase, the checkpointer while it writes,
/// walsenders that are not waiting for WAL).
const ACTIVITY: &str = "SELECT coalesce(string_agg(what, ', ' ORDER BY what), '') FROM ( \
     SELECT a.backend_type || coalesce(' ' || p.relid::regclass::text || ' (' || p.phase || ')', '') \
            || coalesce(' [' || a.wait_event || ']', '') AS what \
     FROM pg_stat_activity a LEFT JOIN pg_stat_progress_vacuum p ON p.pid = a.pid \
     WHERE a.backend_type = 'autovacuum worker' \
        OR (a.backend_type = 'checkpointer' AND a.wait_event IS DISTINCT FROM 'CheckpointerMain') \
        OR (a.backend_type = 'walsender' AND a.wait_event IS DISTINCT FROM 'WalSenderWaitForWAL' \
            AND a.wait_event IS DISTINCT FROM 'WalSenderMain') \
     UNION ALL \
     SELECT 'analyze ' || relid::regclass::text FROM pg_stat_progress_analyze) s";

/// Records when each event reached the handler.
#[derive(Default)]
struct Arrivals {
    count: AtomicU64,
    at: Mutex<Vec<(uuid::Uuid, Instant)>>,
}

struct Probe(Arc<Arrivals>);

#[async_trait::async_trait]
impl Handler for Probe {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let now = Instant::now();
        self.0.count.fetch_add(1, Ordering::Relaxed);
        self.0
            .at
            .lock()
            .map_err(|_| HandlerError::definite("poisoned"))?
            .push((event.id, now));
        Ok(())
    }
}

/// Sorted latencies of one phase.
pub(crate) struct Latencies(Vec<Duration>);

impl Latencies {
    fn pct(&self, p: f64) -> Duration {
        self.0[((self.0.len() as f64 * p) as usize).min(self.0.len() - 1)]
    }

    /// `p50 …, p99 …, p99.9 …, max …` in milliseconds.
    pub(crate) fn summary(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            ms(self.pct(0.50)),
            ms(self.pct(0.99)),
            ms(self.pct(0.999)),
            ms(self.0.last().copied().unwrap_or_default())
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One latency phase: starts a listener with `config`, waits until it has caught up with the
/// WAL written so far (`caught_up`, when given, is polled until true), offers the load, and
/// prints and returns the latencies. `label` names the phase in the output.
pub(crate) async fn phase<F, Fut>(
    label: &str,
    config: Config,
    writer_dsn: &str,
    setup: &str,
    rate: u64,
    seconds: u64,
    caught_up: F,
) -> anyhow::Result<Latencies>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let arrivals = Arc::new(Arrivals::default());
    let mut registry = Registry::new();
    registry.register(
        "probe",
        [Filter::All],
        RetryPolicy::default(),
        Probe(arrivals.clone()),
    );
    let listener = Listener::new(config, registry)?;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move { listener.run(token).await });
    // Caught up: from here on, a delay is the latency of new events, not the listener's start
    // (its walsender decodes the WAL from the slot's restart point again, see
    // docs/benchmarks.md).
    let deadline = Instant::now() + Duration::from_secs(120);
    tokio::time::sleep(Duration::from_millis(200)).await;
    while !caught_up().await? {
        anyhow::ensure!(!task.is_finished(), "the listener stopped early");
        anyhow::ensure!(Instant::now() < deadline, "the listener did not catch up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let catch_up = started.elapsed();

    let mut writer = connect(writer_dsn).await?;
    if !setup.is_empty() {
        writer.batch_execute(setup).await.context("writer setup")?;
    }
    let sampler_db = connect(writer_dsn).await?;
    let samples: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let sampling = CancellationToken::new();
    let sampler = tokio::spawn({
        let samples = samples.clone();
        let stop = sampling.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.is_cancelled() {
                tick.tick().await;
                if let Ok(row) = sampler_db.query_one(ACTIVITY, &[]).await {
                    let what: String = row.get(0);
                    if let Ok(mut s) = samples.lock() {
                        s.push((Instant::now(), what));
                    }
                }
            }
        }
    });

    let interval = Duration::from_secs_f64(PER_TXN as f64 / rate as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut commits: HashMap<uuid::Uuid, Instant> = HashMap::new();
    let mut offered = 0u64;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        ticker.tick().await;
        let tx = writer.transaction().await.context("begin")?;
        let rows = tx
            .query(
                "SELECT id FROM domain_events.raise_events($1)",
                &[&crate::pipeline::batch(PER_TXN as usize, offered)],
            )
            .await
            .context("raise")?;
        tx.commit().await.context("commit")?;
        let at = Instant::now();
        for row in rows {
            commits.insert(row.get(0), at);
        }
        offered += PER_TXN;
    }
    let wait_until = Instant::now() + Duration::from_secs(30);
    while arrivals.count.load(Ordering::Relaxed) < offered && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sampling.cancel();
    let _ = sampler.await;
    cancel.cancel();
    task.await.expect("join").context("listener")?;

    let arrived = arrivals.at.lock().map(|a| a.clone()).unwrap_or_default();
    let mut by_commit: Vec<(Instant, Duration)> = arrived
        .iter()
        .filter_map(|(id, at)| {
            commits
                .get(id)
                .map(|c| (*c, at.saturating_duration_since(*c)))
        })
        .collect();
    anyhow::ensure!(!by_commit.is_empty(), "no event reached the handler");
    let mut sorted: Vec<Duration> = by_commit.iter().map(|(_, d)| *d).collect();
    sorted.sort();
    let latencies = Latencies(sorted);
    println!(
        "latency, {label}: {} events at {rate} ev/s offered ({:.0} ev/s achieved), listener caught \
         up {:.0} ms after its start: {}",
        latencies.0.len(),
        offered as f64 / seconds as f64,
        ms(catch_up),
        latencies.summary()
    );

    // Stalls: runs of transactions whose events waited more than STALL, with the server's
    // background work sampled between the first commit and the last arrival of the run.
    // One entry per transaction: its slowest event.
    by_commit.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    by_commit.dedup_by_key(|(c, _)| *c);
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let mut printed = 0;
    let mut i = 0;
    while i < by_commit.len() && printed < 10 {
        if by_commit[i].1 <= STALL {
            i += 1;
            continue;
        }
        let start = by_commit[i].0;
        let mut end = start + by_commit[i].1;
        let mut worst = by_commit[i].1;
        let mut txns = 0;
        while i < by_commit.len() && by_commit[i].1 > STALL {
            end = end.max(by_commit[i].0 + by_commit[i].1);
            worst = worst.max(by_commit[i].1);
            txns += 1;
            i += 1;
        }
        let mut seen: Vec<&str> = samples
            .iter()
            .filter(|(at, what)| *at >= start && *at <= end && !what.is_empty())
            .flat_map(|(_, what)| what.split(", "))
            .collect();
        seen.sort();
        seen.dedup();
        println!(
            "  stall at +{:.2} s: {txns} transaction(s) waited up to {:.0} ms; server meanwhile: {}",
            start.saturating_duration_since(t0).as_secs_f64(),
            ms(worst),
            if seen.is_empty() {
                "no background work seen".to_string()
            } else {
                seen.join(", ")
            }
        );
        printed += 1;
    }
    Ok(latencies)
}
