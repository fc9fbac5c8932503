//! Chaos: the listener binary killed with SIGKILL at seeded random moments while four writers
//! raise events, and PostgreSQL itself restarted (fast, then immediate) under a running listener.
//! Zero committed events may be lost; a redelivered event must belong to a transaction that was
//! not confirmed when the listener died.
//!
//! Sizes come from the environment for longer runs (docs/reliability.md):
//! `PGDE_CHAOS_EVENTS` (100000), `PGDE_CHAOS_KILLS` (10), `PGDE_CHAOS_SEED`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::cluster_support::PrivateCluster;
use e2e::listener_support::{
    config_for, confirmed_after_exit, unique_name, wait_slot_active, write_config, ListenerProcess,
    SlotGuard,
};
use e2e::{Seeded, TestDb};
use listener::Lsn;
use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

const WRITERS: usize = 4;
const AGGREGATES: u64 = 400;
const SLOT_WAIT: Duration = Duration::from_secs(60);

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One transaction of `size` events over random aggregates, shared by all writers so that
/// their transactions interleave on the same streams.
fn batch(rng: &mut Seeded, size: usize) -> Value {
    Value::Array(
        (0..size)
            .map(|_| {
                let aggregate = rng.between(0, AGGREGATES - 1);
                serde_json::json!({
                    "aggregate_type": "Account",
                    "aggregate_id": format!("acct-{aggregate}"),
                    "event_type": "Account.Credited",
                    "payload": {"amount": rng.between(1, 10_000)},
                })
            })
            .collect(),
    )
}

/// Raises `events` committed events in random-sized transactions (1–40 events, one in twenty
/// rolled back), pausing 0–8 ms between transactions so the run spans many kills. A commit that
/// fails with the connection (the server restarting) is retried on a new connection; whether it
/// landed is read back from the table at the end, which is the only truth the checks use.
async fn write(dsn: String, seed: u64, events: usize, stop: Arc<AtomicBool>) -> usize {
    let mut rng = Seeded(seed);
    let mut client: Option<Client> = None;
    let mut committed = 0;
    while committed < events && !stop.load(Ordering::Relaxed) {
        let c = match &mut client {
            Some(c) if !c.is_closed() => c,
            _ => match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
                Ok((c, connection)) => {
                    tokio::spawn(connection);
                    client.insert(c)
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let size = (rng.between(1, 40) as usize).min(events - committed);
        let rollback = rng.between(0, 19) == 0;
        let events_json = batch(&mut rng, size);
        let result = async {
            let tx = c.transaction().await?;
            tx.execute("SELECT domain_events.raise_events($1)", &[&events_json])
                .await?;
            if rollback {
                tx.rollback().await
            } else {
                tx.commit().await
            }
        }
        .await;
        match result {
            Ok(()) if !rollback => committed += size,
            Ok(()) => {}
            Err(_) => client = None,
        }
        tokio::time::sleep(Duration::from_millis(rng.between(0, 8))).await;
    }
    committed
}

/// `(id, commit_lsn, aggregate_id, aggregate_version)` of every complete line of a run.
fn deliveries(run: &ListenerProcess) -> Vec<(Uuid, Lsn, String, i64)> {
    run.lines()
        .iter()
        .map(|line| {
            (
                line["id"].as_str().expect("id").parse().expect("uuid"),
                line["commit_lsn"]
                    .as_str()
                    .expect("commit_lsn")
                    .parse()
                    .expect("lsn"),
                line["aggregate_id"].as_str().expect("aggregate_id").into(),
                line["aggregate_version"].as_i64().expect("version"),
            )
        })
        .collect()
}

async fn committed_ids(client: &Client) -> HashSet<Uuid> {
    client
        .query("SELECT id FROM domain_events.event", &[])
        .await
        .expect("read ids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until the runs together delivered every id of `committed`; returns each run's lines.
async fn wait_all_delivered(
    runs: &[ListenerProcess],
    committed: &HashSet<Uuid>,
    timeout: Duration,
) -> Vec<Vec<(Uuid, Lsn, String, i64)>> {
    let mut earlier: HashSet<Uuid> = HashSet::new();
    let mut finished: Vec<Vec<(Uuid, Lsn, String, i64)>> = Vec::new();
    for run in &runs[..runs.len() - 1] {
        let lines = deliveries(run);
        earlier.extend(lines.iter().map(|l| l.0));
        finished.push(lines);
    }
    let last = runs.last().expect("a run");
    let deadline = Instant::now() + timeout;
    loop {
        let lines = deliveries(last);
        let mut seen = earlier.clone();
        seen.extend(lines.iter().map(|l| l.0));
        let missing = committed.iter().filter(|id| !seen.contains(id)).count();
        if missing == 0 {
            finished.push(lines);
            return finished;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} committed events never delivered; logs:\n{}",
            committed.len(),
            last.stderr()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Within one run: commit order never goes back, and each aggregate's versions only grow.
fn assert_run_ordered(run: usize, lines: &[(Uuid, Lsn, String, i64)]) {
    for pair in lines.windows(2) {
        assert!(pair[0].1 <= pair[1].1, "run {run} out of commit order");
    }
    let mut last_version: HashMap<&str, i64> = HashMap::new();
    for (_, _, aggregate, version) in lines {
        let previous = last_version.insert(aggregate, *version);
        assert!(
            previous.is_none_or(|p| p < *version),
            "run {run}: {aggregate} version {version} after {previous:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_writers_and_repeated_sigkills_lose_no_committed_event() {
    let events: usize = env_or("PGDE_CHAOS_EVENTS", 100_000);
    let min_kills: usize = env_or("PGDE_CHAOS_KILLS", 10);
    let seed: u64 = env_or("PGDE_CHAOS_SEED", 0x00C0_FFEE);
    eprintln!("chaos: {events} events, at least {min_kills} kills, seed {seed}");

    let db = TestDb::new().await;
    let name = unique_name("chaos");
    let _slot = SlotGuard(name.clone());
    let config = write_config(&config_for(&db, &name));
    let mut runs = vec![ListenerProcess::spawn(&config, &[])];
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let share = events / WRITERS + usize::from(w < events % WRITERS);
            tokio::spawn(write(
                db.dsn.clone(),
                seed.wrapping_add(w as u64 + 1),
                share,
                stop.clone(),
            ))
        })
        .collect();

    // Kill at seeded moments until the writers are done and enough kills landed. Each run gets
    // to stream first: a kill before the slot is taken would test nothing.
    let mut rng = Seeded(seed);
    let mut confirmed_at_kill: Vec<Lsn> = Vec::new();
    let mut mid_write_kills = 0;
    while confirmed_at_kill.len() < min_kills || writers.iter().any(|w| !w.is_finished()) {
        wait_slot_active(&db.client, &name, SLOT_WAIT).await;
        tokio::time::sleep(Duration::from_millis(rng.between(100, 700))).await;
        let writing = writers.iter().any(|w| !w.is_finished());
        runs.last_mut().expect("run").kill9();
        confirmed_at_kill.push(confirmed_after_exit(&db.client, &name).await);
        mid_write_kills += usize::from(writing);
        runs.push(ListenerProcess::spawn(&config, &[]));
    }
    let mut written = 0;
    for writer in writers {
        written += writer.await.expect("writer");
    }
    assert_eq!(written, events);
    let committed = committed_ids(&db.client).await;
    assert_eq!(
        committed.len(),
        events,
        "the table holds what the writers committed"
    );

    let per_run = wait_all_delivered(&runs, &committed, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    let last = runs.last_mut().expect("run");
    last.stop_ok().await;

    let mut delivered: HashMap<Uuid, usize> = HashMap::new();
    for (run, lines) in per_run.iter().enumerate() {
        assert_run_ordered(run, lines);
        for (id, lsn, _, _) in lines {
            assert!(
                committed.contains(id),
                "run {run} delivered an uncommitted event"
            );
            *delivered.entry(*id).or_default() += 1;
            // What a killed run had confirmed is never handed out again.
            if run > 0 {
                let confirmed = confirmed_at_kill[run - 1];
                assert!(
                    *lsn >= confirmed,
                    "run {run} redelivered a transaction ({lsn}) confirmed before kill {} ({confirmed})",
                    run - 1
                );
            }
        }
    }
    let duplicates: usize = delivered.values().map(|n| n - 1).sum();
    let kills = confirmed_at_kill.len();
    assert!(
        mid_write_kills >= min_kills.min(kills) / 2,
        "only {mid_write_kills} of {kills} kills hit while events were being written"
    );
    eprintln!(
        "chaos: {events} committed, {} delivered ({duplicates} duplicates of unconfirmed \
         transactions), {kills} SIGKILLs ({mid_write_kills} while writing), 0 lost, {:.1} s",
        delivered.len(),
        elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_fast_and_immediate_restarts_under_a_running_listener_lose_nothing() {
    let cluster = PrivateCluster::start("restart");
    cluster.create_database("chaos").await;
    let admin = e2e::connect(&cluster.dsn("chaos")).await;
    let name = unique_name("pgrestart");
    let config = write_config(&cluster.listener_config("chaos", &name));
    let mut listener = ListenerProcess::spawn(&config, &[]);
    wait_slot_active(&admin, &name, SLOT_WAIT).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write(cluster.dsn("chaos"), 7, usize::MAX / 2, stop.clone()));
    let mut delivered = 0;
    let mut restarts = Vec::new();
    for mode in ["fast", "immediate"] {
        delivered = listener.wait_lines(delivered + 200, SLOT_WAIT).await.len();
        let down = Instant::now();
        cluster.restart(mode);
        // The same process streams again: events written after the restart arrive.
        delivered = listener.wait_lines(delivered + 200, SLOT_WAIT).await.len();
        restarts.push((mode, down.elapsed()));
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    assert!(
        listener.wait_exit(Duration::ZERO).await.is_none(),
        "the listener exited instead of reconnecting:\n{}",
        listener.stderr()
    );

    let admin = e2e::connect(&cluster.dsn("chaos")).await;
    let committed = committed_ids(&admin).await;
    let runs = [listener];
    let per_run = wait_all_delivered(&runs, &committed, Duration::from_secs(120)).await;
    let [mut listener] = runs;
    let lines = &per_run[0];
    let unique: HashSet<Uuid> = lines.iter().map(|l| l.0).collect();
    assert!(
        unique.is_subset(&committed),
        "an uncommitted event was delivered"
    );
    let logs = listener.stderr();
    assert!(
        logs.matches("reconnecting").count() >= 2,
        "expected a reconnect per restart; logs:\n{logs}"
    );
    listener.stop_ok().await;
    eprintln!(
        "restarts {restarts:?}: {} committed, {} delivered ({} redelivered after the crash), 0 lost",
        committed.len(),
        lines.len(),
        lines.len() - unique.len()
    );
}
