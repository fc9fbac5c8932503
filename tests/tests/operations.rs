//! Operator commands of the listener binary: `status` and `slot drop`.

use std::time::Duration;

use e2e::listener_support::{
    config_for, run_cli_ok, subscription_lsn, unique_name, wait_slot_active, write_config,
    InProcess, SlotGuard,
};
use e2e::TestDb;

const SLOT_WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn status_reports_and_slot_drop_lets_the_next_run_start_afresh() {
    let db = TestDb::new().await;
    let name = unique_name("ops");
    let _slot = SlotGuard(name.clone());
    let config = config_for(&db, &name);
    let file = write_config(&config);

    let listener = InProcess::start(config.clone());
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    db.client
        .batch_execute("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created')")
        .await
        .expect("raise");
    listener
        .collector
        .wait_for(1, Duration::from_secs(30))
        .await;
    listener.stop().await.expect("stop");
    // Written while the listener was down: still in the slot, counted as behind.
    db.client
        .batch_execute("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Funded')")
        .await
        .expect("raise while stopped");

    let stdout = run_cli_ok(&["status"], &file);
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{name}\t")))
        .unwrap_or_else(|| panic!("no status line for {name}: {stdout}"));
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(fields[1], "replication", "{line}");
    assert_eq!(fields[4], "1", "one event behind: {line}");
    assert!(
        fields[5].parse::<i64>().expect("bytes behind") > 0,
        "{line}"
    );
    assert_eq!(fields[7], "false", "nobody streams: {line}");
    assert_eq!(fields[8], "reserved", "{line}");

    let stdout = run_cli_ok(&["slot", "drop"], &file);
    assert!(
        stdout.contains(&format!("dropped replication slot {name:?}")),
        "{stdout}"
    );
    assert!(stdout.contains("up to position"), "{stdout}");
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0);
    assert_eq!(subscription_lsn(&db.client, &name).await, None);

    // The next run creates a fresh slot instead of refusing to start, and streams from now.
    let listener = InProcess::start(config);
    wait_slot_active(&db.client, &name, SLOT_WAIT).await;
    db.client
        .batch_execute("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Paid')")
        .await
        .expect("raise after the drop");
    listener
        .collector
        .wait_for(1, Duration::from_secs(30))
        .await;
    let seen: Vec<String> = listener
        .collector
        .events()
        .iter()
        .map(|e| e.event_type.clone())
        .collect();
    assert_eq!(seen, ["Loan.Paid"]);
    listener.stop().await.expect("stop");

    // The new slot can be dropped the same way.
    run_cli_ok(&["slot", "drop"], &file);
}
