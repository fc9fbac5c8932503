// The outbox of a subscription (`domain_events.outbox`). Included into `tests.rs`'s `tests`
// module: `cargo pgrx test` calls the functions of the SQL schema `tests` only.
//
// Events are inserted with chosen transaction ids and the subscription rows with chosen
// snapshots, so each case states exactly which transactions the listener has handled.

/// Three events: position 1 by transaction 100 (a long transaction: it took its position
/// first and committed last), 2 by 101, 3 by 105; and a subscription row `sub` from `row_sql`
/// (the columns after `name`).
fn outbox_setup(columns: &str, values: &str) {
    Spi::run(
        "INSERT INTO domain_events.event (position, id, aggregate_type, aggregate_id, \
            aggregate_version, event_type, payload, txid) VALUES \
         (1, '00000000-0000-7000-8000-000000000001', 'Loan', '1', 1, 'Loan.Created', '{\"n\": 1}', '100'), \
         (2, '00000000-0000-7000-8000-000000000002', 'Loan', '2', 1, 'Loan.Created', '{\"n\": 2}', '101'), \
         (3, '00000000-0000-7000-8000-000000000003', 'Loan', '3', 1, 'Loan.Created', '{\"n\": 3}', '105')",
    )
    .unwrap();
    Spi::run(&format!(
        "INSERT INTO domain_events.subscription (name, {columns}) VALUES ('sub', {values})"
    ))
    .unwrap();
}

/// `position:status` of every entry `outbox('sub', status)` lists, comma-separated.
fn outbox_of(status: &str) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT coalesce(string_agg(position || ':' || entry_status, ',' ORDER BY position), '') \
           FROM domain_events.outbox('sub', $1)",
        &[status.into()],
    )
    .unwrap()
    .unwrap()
}

#[pg_test]
fn outbox_pending_in_replication_mode_follows_the_delivered_snapshot_not_positions() {
    // Transaction 101 is handled (confirmed position 2), 100 is still running in the
    // delivered snapshot: position 1 is pending although position 2 is delivered.
    outbox_setup(
        "mode, position, lsn, delivered_snapshot",
        "'replication', 2, '0/100', '100:102:100'",
    );
    assert_eq!(outbox_of("all"), "1:pending,2:delivered,3:pending");
    assert_eq!(outbox_of("pending"), "1:pending,3:pending");
    assert_eq!(outbox_of("delivered"), "2:delivered");
    // A pending snapshot whose WAL position is not confirmed yet proves nothing...
    Spi::run(
        "UPDATE domain_events.subscription SET pending_snapshot = '106:106:', \
         pending_lsn = '0/200'",
    )
    .unwrap();
    assert_eq!(outbox_of("pending"), "1:pending,3:pending");
    // ...once confirmed, every transaction visible in it was handled.
    Spi::run("UPDATE domain_events.subscription SET lsn = '0/200'").unwrap();
    assert_eq!(outbox_of("pending"), "");
    assert_eq!(outbox_of("all"), "1:delivered,2:delivered,3:delivered");
}

#[pg_test]
fn outbox_pending_in_notify_mode_follows_snapshot_transitions() {
    // Between transitions: what snapshot_prev sees was delivered.
    outbox_setup(
        "mode, position, snapshot_prev, transition",
        "'notify', 0, '100:102:100', 1",
    );
    assert_eq!(outbox_of("all"), "1:pending,2:delivered,3:pending");
    // A transition to a snapshot seeing 100 and 105, delivered up to position 1.
    Spi::run(
        "UPDATE domain_events.subscription SET snapshot_cur = '106:106:', position = 1, \
         transition = 2",
    )
    .unwrap();
    assert_eq!(outbox_of("all"), "1:delivered,2:delivered,3:pending");
    assert_eq!(outbox_of("pending"), "3:pending");
}

#[pg_test]
fn outbox_recovery_counts_only_the_catch_up_transactions() {
    // A replication subscription catching up after losing its slot: transition state as in
    // notify mode; ids from recovery_until on belong to the new slot and are not delivered yet.
    outbox_setup(
        "mode, position, lsn, delivered_snapshot, snapshot_prev, recovery_started_at, recovery_until",
        "'replication', 0, '0/100', '100:100:', '106:106:', now(), '104'",
    );
    assert_eq!(outbox_of("all"), "1:delivered,2:delivered,3:pending");
}

#[pg_test]
fn outbox_lists_dead_letters_with_handler_and_last_error() {
    outbox_setup(
        "mode, position, lsn, delivered_snapshot",
        "'replication', 3, '0/100', '106:106:'",
    );
    Spi::run(
        "INSERT INTO domain_events.dead_letter (subscription, handler, event_id, position, error, \
            attempts, last_failed_at) VALUES \
         ('sub', 'audit', '00000000-0000-7000-8000-000000000002', 2, 'first', 3, now() - interval '1 minute'), \
         ('sub', 'mailer', '00000000-0000-7000-8000-000000000002', 2, 'latest', 5, now()), \
         ('other', 'audit', '00000000-0000-7000-8000-000000000003', 3, 'not ours', 1, now())",
    )
    .unwrap();
    assert_eq!(outbox_of("all"), "1:delivered,2:dead_lettered,3:delivered");
    let (handler, error, attempts) = Spi::get_three::<String, String, i32>(
        "SELECT handler, last_error, attempts FROM domain_events.outbox('sub', 'dead_lettered')",
    )
    .unwrap();
    assert_eq!(
        (handler.as_deref(), error.as_deref(), attempts),
        (Some("mailer"), Some("latest"), Some(5))
    );
}

#[pg_test]
fn outbox_pages_by_position() {
    outbox_setup("mode, position, snapshot_prev", "'notify', 0, '100:100:'");
    let page = |after: &str| {
        Spi::get_one::<String>(&format!(
            "SELECT coalesce(string_agg(position::text, ',' ORDER BY position), '') \
               FROM domain_events.outbox('sub', 'all', 2, {after})"
        ))
        .unwrap()
        .unwrap()
    };
    assert_eq!(page("NULL"), "1,2");
    assert_eq!(page("2"), "3");
    assert_eq!(page("3"), "");
}

#[pg_test]
fn outbox_refuses_bad_arguments_with_a_sqlstate_detail_and_hint() {
    outbox_setup("mode, snapshot_prev", "'notify', '100:100:'");
    let bad_status = failure("SELECT * FROM domain_events.outbox('sub', 'sent')");
    assert!(
        bad_status.starts_with(
            "22023\ninvalid outbox status \"sent\"\nstatus must be pending, delivered, dead_lettered or all.\npending:"
        ),
        "{bad_status}"
    );
    let bad_limit = failure("SELECT * FROM domain_events.outbox('sub', 'all', 0)");
    assert!(
        bad_limit.starts_with("22023\ninvalid max_entries 0\nmax_entries must be between 1 and 10000.\nPage through"),
        "{bad_limit}"
    );
    let unknown = failure("SELECT * FROM domain_events.outbox('nope')");
    assert!(
        unknown.starts_with("42704\nsubscription \"nope\" does not exist\n"),
        "{unknown}"
    );
}

#[pg_test]
fn outbox_is_readable_by_domain_events_reader_only() {
    outbox_setup("mode, snapshot_prev", "'notify', '106:106:'");
    Spi::run("SET LOCAL ROLE domain_events_reader").unwrap();
    assert_eq!(outbox_of("all"), "1:delivered,2:delivered,3:delivered");
    Spi::run("RESET ROLE; SET LOCAL ROLE domain_events_writer").unwrap();
    assert!(failure("SELECT * FROM domain_events.outbox('sub')").starts_with("42501\n"));
}
