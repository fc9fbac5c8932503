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

/// `position:status` of the entries `outbox('sub', status, max, after)` lists.
fn outbox_page(status: &str, max: i32, after: Option<i64>) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT coalesce(string_agg(position || ':' || entry_status, ',' ORDER BY position), '') \
           FROM domain_events.outbox('sub', $1, $2, $3)",
        &[status.into(), max.into(), after.into()],
    )
    .unwrap()
    .unwrap()
}

#[pg_test]
fn outbox_pending_and_dead_lettered_pages_are_read_without_walking_the_history() {
    // 3000 handled events with a dead letter every 500th, then 7 pending: two of a
    // transaction that took its positions early and committed late, five recent ones.
    Spi::run(
        "INSERT INTO domain_events.event (position, id, aggregate_type, aggregate_id, \
            aggregate_version, event_type, txid) \
         SELECT g, gen_random_uuid(), 'Loan', g::text, 1, 'Loan.Created', \
                CASE WHEN g IN (1200, 1201) THEN '200' WHEN g > 2995 THEN '201' ELSE '100' END::xid8 \
           FROM generate_series(1, 3002) g; \
         INSERT INTO domain_events.dead_letter (subscription, handler, event_id, position, error, attempts) \
         SELECT 'sub', 'audit', id, position, 'down', 1 FROM domain_events.event \
          WHERE position % 500 = 0; \
         INSERT INTO domain_events.subscription (name, mode, position, lsn, delivered_snapshot) \
         VALUES ('sub', 'replication', 3002, '0/100', '150:150:'); \
         ANALYZE domain_events.event",
    )
    .unwrap();
    // Every page of each status is the `all` list filtered by that status.
    let all = outbox_page("all", 10000, None);
    for (status, after, max) in [
        ("pending", None, 100),
        ("pending", None, 2),
        ("pending", Some(1201), 3),
        ("pending", Some(3002), 100),
        ("dead_lettered", None, 100),
        ("dead_lettered", Some(1000), 2),
    ] {
        let expected: Vec<&str> = all
            .split(',')
            .filter(|e| {
                let (position, state) = e.split_once(':').unwrap();
                state == status && after.is_none_or(|a| position.parse::<i64>().unwrap() > a)
            })
            .take(max as usize)
            .collect();
        assert_eq!(
            outbox_page(status, max, after),
            expected.join(","),
            "{status} after {after:?}, {max} at most"
        );
    }
    assert_eq!(
        outbox_page("pending", 100, None),
        "1200:pending,1201:pending,2996:pending,2997:pending,2998:pending,2999:pending,\
         3001:pending,3002:pending"
    );
    // The position indexes serve the lookups of the page's own rows only, not a walk from
    // the first event to the first pending one (the transaction's own statistics so far).
    let read = || {
        count(
            "SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(c.oid)), 0)::bigint \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = 'domain_events' AND c.relkind = 'i' \
                AND c.relname LIKE 'event%\\_position\\_idx' AND c.relname NOT LIKE '%type%'",
        )
    };
    let before = read();
    outbox_page("pending", 100, None);
    outbox_page("dead_lettered", 100, None);
    let after = read();
    assert!(
        after - before < 100,
        "{} position index entries read for a page of each",
        after - before
    );
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
