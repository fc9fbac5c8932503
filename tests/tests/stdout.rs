//! End-to-end tests of the `stdout` handler: the `listener` binary with three workers sharing
//! the handler, its standard output a real pipe that is closed or that nobody reads. An event is
//! confirmed only once its line is in the pipe; otherwise it is dead-lettered or delivered
//! again. The tests need `cargo build -p listener` first.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::listener_support::*;
use e2e::sink_support::raise_batch;
use e2e::TestDb;
use listener::Lsn;
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

const SLOT_WAIT: Duration = Duration::from_secs(120);
const DELIVERY_WAIT: Duration = Duration::from_secs(120);

/// A `raise_events` item of aggregate `(aggregate_type, aggregate_id)` with a payload of about
/// 1 KB.
fn padded(aggregate_type: &str, aggregate_id: String, i: usize) -> Value {
    json!({
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "event_type": format!("{aggregate_type}.Changed"),
        "payload": {"i": i, "pad": "x".repeat(1000)},
    })
}

/// Raises `txns` transactions of `per_txn` events over 21 aggregates (three types, seven ids
/// each); returns the ids.
async fn raise_mixed_padded(client: &Client, txns: usize, per_txn: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for txn in 0..txns {
        let events: Vec<Value> = (0..per_txn)
            .map(|n| {
                let i = txn * per_txn + n;
                let aggregate_type = ["Loan", "Ticket", "User"][i % 3];
                padded(
                    aggregate_type,
                    format!("{}-{}", aggregate_type.to_lowercase(), i % 7),
                    i,
                )
            })
            .collect();
        ids.extend(raise_batch(client, &Value::Array(events)).await);
    }
    ids
}

/// Raises `pairs` pairs of transactions: `big` events of one `Loan` aggregate, then one event of
/// a `Ticket` aggregate (one worker each, often not the same one: seven ids of each type take
/// turns); returns the ids.
async fn raise_pairs(client: &Client, pairs: usize, big: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for pair in 0..pairs {
        let events: Vec<Value> = (0..big)
            .map(|n| padded("Loan", format!("loan-{}", pair % 7), n))
            .collect();
        ids.extend(raise_batch(client, &Value::Array(events)).await);
        let event = padded("Ticket", format!("ticket-{}", (pair + 3) % 7), 0);
        ids.extend(raise_batch(client, &Value::Array(vec![event])).await);
    }
    ids
}

async fn current_lsn(client: &Client) -> Lsn {
    let lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("current lsn")
        .get(0);
    lsn.parse().expect("lsn")
}

/// The slot's confirmed position or the subscription row's, whichever is further: transactions
/// that committed before it count as delivered. Both must exist (the slot was created and
/// checkpointed by an earlier run): a missing one is a failure, not a position of 0/0.
async fn confirmed(client: &Client, name: &str) -> Lsn {
    let (slot, _) = slot_positions(client, name).await;
    let slot: Lsn = slot.parse().expect("lsn");
    let row: Lsn = subscription_lsn(client, name)
        .await
        .expect("the subscription row has a position")
        .parse()
        .expect("lsn");
    slot.max(row)
}

/// Waits until no walsender streams from slot `name` (after its listener was killed).
async fn wait_slot_released(client: &Client, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active: bool = client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .expect("slot exists")
            .get(0);
        if !active {
            return;
        }
        assert!(Instant::now() < deadline, "slot {name} still active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the confirmed position did not move for `quiet`; returns it.
async fn settled(client: &Client, name: &str, quiet: Duration) -> Lsn {
    let mut last = confirmed(client, name).await;
    let mut since = Instant::now();
    while since.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = confirmed(client, name).await;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// The whole JSON lines in `bytes` (a last line torn by a kill is skipped).
fn whole_lines(bytes: &[u8]) -> Vec<Value> {
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    std::str::from_utf8(&bytes[..end])
        .expect("UTF-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn id_of(line: &Value) -> Uuid {
    line["id"].as_str().expect("id").parse().expect("uuid")
}

fn commit_of(line: &Value) -> Lsn {
    line["commit_lsn"]
        .as_str()
        .expect("commit_lsn")
        .parse()
        .expect("lsn")
}

/// Each aggregate's lines come in version order.
fn assert_aggregate_order(lines: &[Value]) {
    let mut last: HashMap<(&str, &str), i64> = HashMap::new();
    for line in lines {
        let key = (
            line["aggregate_type"].as_str().expect("aggregate_type"),
            line["aggregate_id"].as_str().expect("aggregate_id"),
        );
        let version = line["aggregate_version"]
            .as_i64()
            .expect("aggregate_version");
        if let Some(previous) = last.insert(key, version) {
            assert!(
                previous < version,
                "{key:?}: version {version} written after {previous}"
            );
        }
    }
}

/// Reads a pipe on a thread of its own until end of file, keeping what it read.
struct Drain {
    bytes: Arc<Mutex<Vec<u8>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Drain {
    /// Reads as fast as the writer writes.
    fn start(reader: std::io::PipeReader) -> Drain {
        Drain::paced(reader, 64 * 1024, Duration::ZERO)
    }

    /// Reads at most `chunk` bytes at a time, pausing `pause` after each read: a slow reader,
    /// with the pipe full most of the time.
    fn paced(mut reader: std::io::PipeReader, chunk: usize, pause: Duration) -> Drain {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        let thread = std::thread::spawn(move || {
            let mut chunk = vec![0u8; chunk];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
                }
                std::thread::sleep(pause);
            }
        });
        Drain { bytes, thread }
    }

    fn lines(&self) -> Vec<Value> {
        whole_lines(&self.bytes.lock().unwrap())
    }

    /// Everything, once every write end is closed.
    fn finish(self) -> Vec<Value> {
        self.thread.join().expect("drain thread");
        whole_lines(&self.bytes.lock().unwrap())
    }
}

/// Three workers share the handler while standard output is a pipe whose reader is gone: no line
/// can be written, so every event must be dead-lettered, none confirmed as delivered. (A worker's
/// failing flush must not take the other workers' lines with its own, leaving their flushes
/// nothing to write and nothing to fail.) Big transactions reach the workers in several reads,
/// so the workers have handled their events when the commit comes and flush together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_dead_letters_the_events_of_every_worker() {
    let db = TestDb::new().await;
    let name = unique_name("stdclosed");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.replication.workers = 3;
    // Heartbeats move the confirmed position past the last event's transaction.
    config.replication.heartbeat_interval_secs = 1;
    let file = write_config(&config);
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut process = ListenerProcess::spawn_with_stdout(&file, &[], Some(writer.into()));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;

    let ids = raise_mixed_padded(&db.client, 20, 150).await;
    let end = current_lsn(&db.client).await;
    wait_confirmed_past(&db.client, &name, end, DELIVERY_WAIT).await;
    let letters = dead_letters(&db.client, &name).await;
    let dead: HashSet<Uuid> = letters.iter().map(|l| l.1).collect();
    let lost: Vec<&Uuid> = ids.iter().filter(|id| !dead.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} events confirmed, yet neither written nor dead-lettered: {lost:?}",
        lost.len(),
        ids.len()
    );
    for letter in &letters {
        assert!(
            letter.4.contains("cannot write to standard output"),
            "{letter:?}"
        );
    }
    process.stop_ok().await;
}

/// Three workers share the handler while standard output is a pipe its reader reads slowly,
/// then not at all: writes wait, and confirmation with them.
///
/// The first run starts on a backlog (so transactions reach the workers back to back) with a
/// slow reader, and is killed: it must have confirmed no event whose line is not in the pipe.
/// (A flush that took another worker's finished lines with its own, then waited for the pipe,
/// left that worker's flush nothing to write: its transaction was confirmed with its lines
/// still unwritten.) The second run starts with a reader that does not read: it confirms
/// nothing more while the pipe is full; once the reader drains the pipe, it writes every
/// remaining event, each aggregate's in order, and confirms them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipe_holds_confirmation_back_until_the_lines_are_written() {
    let db = TestDb::new().await;
    let name = unique_name("stdfull");
    let _slot = SlotGuard(name.clone());
    let mut config = config_for(&db, &name);
    config.replication.workers = 3;
    let file = write_config(&config);
    // A run that only creates the slot.
    let mut setup = ListenerProcess::spawn(&file, &[]);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    setup.stop_ok().await;
    // About 1.5 MB of lines; a pipe holds 64 KB.
    let ids = raise_pairs(&db.client, 30, 40).await;
    let end = current_lsn(&db.client).await;

    let (reader, writer) = std::io::pipe().expect("pipe");
    let drain = Drain::paced(reader, 8 * 1024, Duration::from_millis(50));
    let mut first = ListenerProcess::spawn_with_stdout(&file, &[], Some(writer.into()));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    first.kill9();
    wait_slot_released(&db.client, &name).await;
    let held = confirmed(&db.client, &name).await;
    assert!(
        held < end,
        "everything was confirmed ({held}), though the reader could not have read it all"
    );
    let first_lines = drain.finish();
    assert_aggregate_order(&first_lines);
    let first_ids: HashSet<Uuid> = first_lines.iter().map(id_of).collect();

    let (reader, writer) = std::io::pipe().expect("pipe");
    let mut second = ListenerProcess::spawn_with_stdout(&file, &[], Some(writer.into()));
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    let paused = settled(&db.client, &name, Duration::from_secs(3)).await;
    assert!(
        paused < end,
        "everything was confirmed ({paused}) before the pipe was read"
    );
    let drain = Drain::start(reader);
    let deadline = Instant::now() + DELIVERY_WAIT;
    loop {
        let arrived: HashSet<Uuid> = drain.lines().iter().map(id_of).collect();
        if ids
            .iter()
            .all(|id| first_ids.contains(id) || arrived.contains(id))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events lost: {} of {} written; logs:\n{}",
            first_ids.union(&arrived).count(),
            ids.len(),
            second.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = drain.lines().iter().map(commit_of).max().expect("lines");
    wait_confirmed_past(&db.client, &name, last, DELIVERY_WAIT).await;
    second.stop_ok().await;
    let second_lines = drain.finish();
    assert_aggregate_order(&second_lines);

    // Every event of a transaction confirmed by the first run was in the pipe when it died.
    let commits: HashMap<Uuid, Lsn> = first_lines
        .iter()
        .chain(&second_lines)
        .map(|l| (id_of(l), commit_of(l)))
        .collect();
    let unwritten: Vec<&Uuid> = ids
        .iter()
        .filter(|id| commits[*id] < held && !first_ids.contains(*id))
        .collect();
    assert!(
        unwritten.is_empty(),
        "{} events confirmed (before {held}) without their line in the pipe: {unwritten:?}",
        unwritten.len()
    );
    eprintln!(
        "{} events: {} written by the first run (confirmed up to {held}), {} by the second",
        ids.len(),
        first_lines.len(),
        second_lines.len()
    );
}
