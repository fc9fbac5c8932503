//! Hot standby: two `listener` binaries on one subscription under a steady writer. The second
//! stands by (one INFO line naming the server process that holds the slot, `/health` and
//! `listener status` saying so); when the active one is SIGKILLed it takes over within 2 s,
//! and no event is lost.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::admin_support::{free_port, wait_health};
use e2e::listener_support::*;
use e2e::TestDb;

const SLOT_WAIT: Duration = Duration::from_secs(120);

/// Event ids the stdout handler of `process` wrote.
fn written_ids(process: &ListenerProcess) -> Vec<String> {
    process
        .lines()
        .iter()
        .map(|l| l["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_two_seconds_of_the_active_listeners_death_and_nothing_is_lost()
{
    let db = TestDb::new().await;
    let name = unique_name("standby");
    let _slot = SlotGuard(name.clone());
    let client = db.connect().await;
    let (active_port, standby_port) = (free_port(), free_port());

    let mut config = config_for(&db, &name);
    config.admin.listen = Some(format!("127.0.0.1:{active_port}"));
    let active_file = write_config(&config);
    config.admin.listen = Some(format!("127.0.0.1:{standby_port}"));
    let standby_file = write_config(&config);

    let mut active = ListenerProcess::spawn(&active_file, &[]);
    wait_slot_active(&client, &name, SLOT_WAIT).await;
    let active_walsender = slot_active_pid(&client, &name).await.expect("streaming");
    let mut standby = ListenerProcess::spawn(&standby_file, &[]);

    // The standby says so once, on /health too (200: it is healthy), and in `listener status`.
    let body = wait_health(standby_port, None, 200, Duration::from_secs(30)).await;
    assert_eq!(
        body,
        format!("standby: the slot is held by server process {active_walsender}\n")
    );
    let status = run_cli_ok(&["status"], &standby_file);
    let header: Vec<&str> = status.lines().next().expect("header").split('\t').collect();
    let row: Vec<&str> = status
        .lines()
        .find(|l| l.starts_with(&format!("{name}\t")))
        .unwrap_or_else(|| panic!("no row for {name}:\n{status}"))
        .split('\t')
        .collect();
    let column = |key: &str| row[header.iter().position(|h| *h == key).expect(key)];
    assert_eq!(
        column("active_pid"),
        active_walsender.to_string(),
        "{status}"
    );
    assert_ne!(column("standby_pids"), "-", "{status}");
    assert_eq!(
        wait_health(active_port, None, 200, SLOT_WAIT).await,
        "streaming\n"
    );

    // A steady writer: one event every 10 ms.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = tokio::spawn({
        let writing = Arc::clone(&writing);
        let writer_client = db.connect().await;
        async move {
            let mut raised = 0u32;
            while writing.load(Ordering::Relaxed) {
                writer_client
                    .execute(
                        "SELECT domain_events.raise_event('Loan', 'L-' || ($1::int % 7), \
                         'Loan.Changed', jsonb_build_object('n', $1::int))",
                        &[&(raised as i32)],
                    )
                    .await
                    .expect("raise");
                raised += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            raised
        }
    });
    active.wait_lines(50, Duration::from_secs(30)).await;
    // A few check intervals of standing by: still one line.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    active.kill9();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(30);
    let taken_over = loop {
        if let Some(pid) = slot_active_pid(&client, &name).await {
            if pid != active_walsender {
                break killed.elapsed();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no takeover; standby logs:\n{}",
            standby.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("takeover after SIGKILL of the active listener: {taken_over:?}");
    assert!(
        taken_over < Duration::from_secs(2),
        "took {taken_over:?}; standby logs:\n{}",
        standby.stderr()
    );
    assert_eq!(
        wait_health(standby_port, None, 200, SLOT_WAIT).await,
        "streaming\n"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    writing.store(false, Ordering::Relaxed);
    let raised = writer.await.expect("writer");
    let stored = stored_event_ids(&client).await;
    assert_eq!(stored.len(), raised as usize);

    // Nothing lost: what the active one wrote before its death and what the standby wrote
    // after covers every stored event (duplicates from the unconfirmed tail are allowed).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen: HashSet<String> = written_ids(&active)
            .into_iter()
            .chain(written_ids(&standby))
            .collect();
        let missing = stored.difference(&seen).count();
        if missing == 0 {
            let twice = written_ids(&active).len() + written_ids(&standby).len() - seen.len();
            eprintln!("{} events, 0 lost, {twice} delivered by both", stored.len());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} events never delivered; standby logs:\n{}",
            stored.len(),
            standby.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = standby.stderr();
    assert_eq!(
        logs.matches("standing by").count(),
        1,
        "one line while standing by; logs:\n{logs}"
    );
    assert!(
        !logs.contains("WARN"),
        "no warnings while standing by:\n{logs}"
    );
    standby.stop_ok().await;
}
