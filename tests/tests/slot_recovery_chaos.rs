//! A lost slot under chaos: two writers commit all the time, a transaction holds a low position
//! open across each slot invalidation, and the listener binary is SIGKILLed at seeded moments —
//! while the slot is being invalidated, while it recovers from the event table, and while it
//! creates the new slot. No committed event may be lost, none uncommitted delivered.
//!
//! `PGDE_CHAOS_SEED` picks the kill moments (printed at the start).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::cluster_support::{invalidate_slot_until, PrivateCluster};
use e2e::listener_support::{unique_name, wait_slot_active, write_config, ListenerProcess};
use e2e::Seeded;
use listener::Lsn;
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

const ROUNDS: usize = 2;
const WAIT: Duration = Duration::from_secs(90);

/// Raises transactions of 1–8 events until `stop`, one in ten rolled back.
async fn write(dsn: String, seed: u64, stop: Arc<AtomicBool>) -> usize {
    let mut rng = Seeded(seed);
    let mut client = e2e::connect(&dsn).await;
    let mut committed = 0;
    while !stop.load(Ordering::Relaxed) {
        let size = rng.between(1, 8) as usize;
        let batch: Vec<Value> = (0..size)
            .map(|_| {
                json!({"aggregate_type": "Loan", "aggregate_id": format!("L-{}", rng.between(0, 49)),
                       "event_type": "Loan.Changed", "payload": {"n": committed}})
            })
            .collect();
        let txn = client.transaction().await.expect("begin");
        txn.execute(
            "SELECT domain_events.raise_events($1)",
            &[&Value::Array(batch)],
        )
        .await
        .expect("raise_events");
        if rng.between(0, 9) == 0 {
            txn.rollback().await.expect("rollback");
        } else {
            txn.commit().await.expect("commit");
            committed += size;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    committed
}

/// Makes checkpoints invalidate slot `name` (its `restart_lsn` held back by an open
/// transaction) — done when the slot is lost, or already dropped or replaced by the
/// listener's recovery, which a killed and restarted listener may reach first.
async fn invalidate_under_a_running_listener(client: &Client, name: &str) {
    let held: String = client
        .query_one(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("the slot exists")
        .get(0);
    let held: Lsn = held.parse().expect("lsn");
    invalidate_slot_until(client, name, |slot| match slot {
        None => true,
        Some((status, restart)) => {
            status.as_deref() == Some("lost")
                // A new slot starts at the WAL written since, far past the held one.
                || restart
                    .and_then(|r| r.parse::<Lsn>().ok())
                    .is_none_or(|r| r.0 > held.0 + (4 << 20))
        }
    })
    .await;
}

/// The subscription streams again: a walsender serves the slot and the row is not recovering.
async fn wait_streaming_again(client: &Client, name: &str, run: &ListenerProcess) {
    let deadline = Instant::now() + WAIT;
    loop {
        let streaming: bool = client
            .query_one(
                "SELECT coalesce(bool_and(l.slot_active AND NOT l.recovering), false) \
                 FROM domain_events.subscription_lag l WHERE l.name = $1",
                &[&name],
            )
            .await
            .expect("subscription_lag")
            .get(0);
        if streaming {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not streaming again; logs:\n{}",
            run.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn delivered(run: &ListenerProcess) -> Vec<Uuid> {
    run.lines()
        .iter()
        .map(|l| l["id"].as_str().expect("id").parse().expect("uuid"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_slots_under_writers_and_sigkills_lose_no_committed_event() {
    let seed: u64 = std::env::var("PGDE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x51_07);
    eprintln!("lost-slot chaos: {ROUNDS} rounds, seed {seed}");
    let mut rng = Seeded(seed);
    let cluster = PrivateCluster::start("lostchaos");
    cluster.create_database("lc").await;
    let dsn = cluster.dsn("lc");
    let client = e2e::connect(&dsn).await;
    let name = unique_name("lostchaos");
    let mut config = cluster.listener_config("lc", &name);
    config.replication.poll_interval_ms = 100;
    config.replication.status_interval_secs = 1;
    config.replication.heartbeat_interval_secs = 1;
    let file = write_config(&config);

    let mut runs = vec![ListenerProcess::spawn(&file, &[])];
    wait_slot_active(&client, &name, WAIT).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| tokio::spawn(write(dsn.clone(), seed + w + 1, Arc::clone(&stop))))
        .collect();
    let mut kills = 0;
    let mut held_ids = Vec::new();

    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A transaction takes a position and stays open while later ones commit above it.
        let long = e2e::connect(&dsn).await;
        long.batch_execute("BEGIN").await.expect("BEGIN");
        let held: Uuid = long
            .query_one(
                "SELECT id FROM domain_events.raise_event('Loan', 'held', 'Loan.Held')",
                &[],
            )
            .await
            .expect("raise in the open transaction")
            .get(0);
        held_ids.push(held);
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Invalidation and a kill at a seeded moment, concurrently.
        let invalidation = tokio::spawn({
            let (dsn, name) = (dsn.clone(), name.clone());
            async move {
                let client = e2e::connect(&dsn).await;
                invalidate_under_a_running_listener(&client, &name).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.between(200, 2500))).await;
        runs.last_mut().expect("a run").kill9();
        kills += 1;
        runs.push(ListenerProcess::spawn(&file, &[]));
        invalidation.await.expect("invalidation");

        // The held transaction commits after the loss; the listener is killed again while it
        // recovers or creates the new slot (which waits for that commit).
        tokio::time::sleep(Duration::from_millis(rng.between(100, 1500))).await;
        long.batch_execute("COMMIT").await.expect("COMMIT");
        tokio::time::sleep(Duration::from_millis(rng.between(0, 1500))).await;
        runs.last_mut().expect("a run").kill9();
        kills += 1;
        runs.push(ListenerProcess::spawn(&file, &[]));
        wait_streaming_again(&client, &name, runs.last().expect("a run")).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut committed_count = 0;
    for writer in writers {
        committed_count += writer.await.expect("writer");
    }

    let committed: HashSet<Uuid> = client
        .query("SELECT id FROM domain_events.event", &[])
        .await
        .expect("read ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        committed.len(),
        committed_count + ROUNDS,
        "writers and held events"
    );
    let deadline = Instant::now() + WAIT;
    let (seen, total) = loop {
        let all: Vec<Uuid> = runs.iter().flat_map(delivered).collect();
        let seen: HashSet<Uuid> = all.iter().copied().collect();
        let missing: Vec<&Uuid> = committed.difference(&seen).collect();
        if missing.is_empty() {
            break (seen, all.len());
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} committed events never delivered (held {:?} among them: {}); last logs:\n{}",
            missing.len(),
            committed.len(),
            held_ids,
            held_ids.iter().any(|h| missing.contains(&h)),
            runs.last().expect("a run").stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let uncommitted: Vec<&Uuid> = seen.difference(&committed).collect();
    assert!(
        uncommitted.is_empty(),
        "delivered but never committed: {uncommitted:?}"
    );
    let recoveries = runs
        .iter()
        .map(|r| r.stderr().matches("recovering from the lost slot").count())
        .sum::<usize>();
    assert!(recoveries >= ROUNDS, "{recoveries} recoveries logged");
    eprintln!(
        "lost-slot chaos: {} events committed, {ROUNDS} slots lost, {kills} SIGKILLs, \
         {recoveries} recoveries started, {} duplicates, 0 lost",
        committed.len(),
        total - seen.len()
    );
    runs.last_mut().expect("a run").stop_ok().await;
}
