//! Several subscriptions side by side: each listener has its own slot and its own row in
//! `domain_events.subscription`, sees every committed event, and advances independently.

use std::time::Duration;

use e2e::listener_support::{
    config_for, subscription_lsn, unique_name, wait_slot_active, InProcess, SlotGuard,
};
use e2e::TestDb;

const SLOT_WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn two_subscriptions_each_see_every_event_and_keep_their_own_position() {
    let db = TestDb::new().await;
    let (a, b) = (unique_name("sub_a"), unique_name("sub_b"));
    let _slots = (SlotGuard(a.clone()), SlotGuard(b.clone()));
    let first = InProcess::start(config_for(&db, &a));
    let second = InProcess::start(config_for(&db, &b));
    wait_slot_active(&db.client, &a, SLOT_WAIT).await;
    wait_slot_active(&db.client, &b, SLOT_WAIT).await;

    // Separate calls: statements sharing one query string share one transaction.
    for sql in [
        "SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created')",
        "BEGIN",
        "SELECT * FROM domain_events.raise_event('Loan', '2', 'Loan.Created')",
        "ROLLBACK",
        "SELECT * FROM domain_events.raise_events('[
             {\"aggregate_type\": \"Loan\", \"aggregate_id\": \"1\", \"event_type\": \"Loan.Funded\"},
             {\"aggregate_type\": \"ticket\", \"aggregate_id\": \"T-1\", \"event_type\": \"ticket.created\"}]')",
    ] {
        db.client.batch_execute(sql).await.expect(sql);
    }
    first.collector.wait_for(3, Duration::from_secs(30)).await;
    second.collector.wait_for(3, Duration::from_secs(30)).await;
    // Stop the second subscription; the first goes on alone.
    second.stop().await.expect("second stops cleanly");
    db.client
        .batch_execute("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Paid')")
        .await
        .expect("raise while the second is stopped");
    first.collector.wait_for(4, Duration::from_secs(30)).await;

    let types: Vec<String> = first
        .collector
        .events()
        .iter()
        .map(|e| e.event_type.clone())
        .collect();
    assert_eq!(
        types,
        ["Loan.Created", "Loan.Funded", "ticket.created", "Loan.Paid"]
    );
    first.stop().await.expect("first stops cleanly");

    // Each subscription row holds its own durable position; the stopped one is behind.
    let (lsn_a, lsn_b) = (
        subscription_lsn(&db.client, &a)
            .await
            .expect("row for the first"),
        subscription_lsn(&db.client, &b)
            .await
            .expect("row for the second"),
    );
    let ahead: bool = db
        .client
        .query_one(
            "SELECT $1::text::pg_lsn > $2::text::pg_lsn",
            &[&lsn_a, &lsn_b],
        )
        .await
        .expect("compare")
        .get(0);
    assert!(ahead, "first {lsn_a} should be past second {lsn_b}");
    let modes: Vec<String> = db
        .client
        .query(
            "SELECT mode FROM domain_events.subscription WHERE name = ANY($1) ORDER BY name",
            &[&vec![a.clone(), b.clone()]],
        )
        .await
        .expect("modes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(modes, ["replication", "replication"]);
}
