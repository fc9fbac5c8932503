//! Backend tests: each runs inside a transaction that `cargo pgrx test` rolls back.
//! Commit-time behaviour (NOTIFY, visibility, replication) is tested end to end in `tests/`.

// `cargo pgrx test` calls the functions in the SQL schema `tests`, named after this module.
#[allow(clippy::module_inception)]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql)
            .expect(sql)
            .expect("a non-NULL value")
    }

    fn count(sql: &str) -> i64 {
        one::<i64>(sql)
    }

    /// The stream heads, as `<id><version>` in id order.
    fn heads() -> String {
        one::<String>(
            "SELECT string_agg(aggregate_id || version, ',' ORDER BY aggregate_id) FROM domain_events.aggregate",
        )
    }

    /// The events of `event_type` in position order, as `<id><version>:<payload's key>`.
    fn stored_in_position_order(event_type: &str, key: &str) -> String {
        one::<String>(&format!(
            "SELECT string_agg(aggregate_id || aggregate_version || ':' || (payload->>'{key}'), ',' ORDER BY position) \
               FROM domain_events.event WHERE event_type = '{event_type}'"
        ))
    }

    #[pg_test]
    fn raise_event_assigns_gap_free_versions_and_increasing_positions() {
        let v1 = one::<i64>(
            "SELECT aggregate_version FROM domain_events.raise_event('Loan', '42', 'Loan.Created')",
        );
        let v2 = one::<i64>("SELECT aggregate_version FROM domain_events.raise_event('Loan', '42', 'Loan.Funded', '{\"amount\": 100000}')");
        let other = one::<i64>(
            "SELECT aggregate_version FROM domain_events.raise_event('Loan', '43', 'Loan.Created')",
        );
        assert_eq!((v1, v2, other), (1, 2, 1));
        assert_eq!(
            one::<i64>("SELECT domain_events.aggregate_version('Loan', '42')"),
            2
        );
        assert_eq!(
            one::<i64>("SELECT domain_events.aggregate_version('Loan', 'nope')"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM (SELECT position, lag(position) OVER (ORDER BY position) AS prev FROM domain_events.event) p WHERE prev IS NOT NULL AND position <= prev"),
            0
        );
        assert_eq!(
            one::<String>("SELECT string_agg(event_type, ',' ORDER BY aggregate_version) FROM domain_events.aggregate_events('Loan', '42')"),
            "Loan.Created,Loan.Funded"
        );
    }

    /// One statement raising per row, streams interleaved: the way triggers and `INSERT …
    /// SELECT` users raise, where each call after a stream's first finds its head written by
    /// the call before it in the same statement.
    #[pg_test]
    fn per_row_raising_in_one_statement_versions_each_stream_in_call_order() {
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', 'a', 'Loan.Created')").unwrap();
        let versions = one::<String>(
            "SELECT string_agg(r.aggregate_version::text, ',' ORDER BY g) \
               FROM generate_series(1, 8) g, \
                    LATERAL domain_events.raise_event('Loan', CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, \
                        'Loan.Noted', jsonb_build_object('g', g)) r",
        );
        assert_eq!(versions, "1,2,2,3,3,4,4,5");
        // The heads, read by the very next statement, are at the streams' last events.
        assert_eq!(heads(), "a5,b4");
        // Stored rows: versions follow the raising order, positions grow with it, and the
        // columns the table fills itself (position, txid, recorded_at) are filled.
        assert_eq!(
            stored_in_position_order("Loan.Noted", "g"),
            "b1:1,a2:2,b2:3,a3:4,b3:5,a4:6,b4:7,a5:8"
        );
        assert!(one::<bool>(
            "SELECT bool_and(txid = pg_current_xact_id() AND recorded_at = now() AND occurred_at = now()) \
               FROM domain_events.event"
        ));
        // The batch statement moves a head this transaction already moved; the next single
        // event continues from where the batch left it.
        Spi::run(
            r#"SELECT * FROM domain_events.raise_events('[{"aggregate_type": "Loan", "aggregate_id": "a", "event_type": "Loan.Noted"},
                {"aggregate_type": "Loan", "aggregate_id": "a", "event_type": "Loan.Noted"}]')"#,
        )
        .unwrap();
        assert_eq!(
            one::<i64>("SELECT aggregate_version FROM domain_events.raise_event('Loan', 'a', 'Loan.Noted')"),
            8
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(aggregate_version::text, ',' ORDER BY position) FROM domain_events.event WHERE aggregate_id = 'a'"
            ),
            "1,2,3,4,5,6,7,8"
        );
    }

    /// A batch over existing streams, items interleaved: each stream numbered in item order,
    /// positions in item order, heads moved by their stream's events (read by the next
    /// statement and continued by the next raise); a batch naming one new stream goes whole
    /// through the batch statement and continues the streams this one moved.
    #[pg_test]
    fn a_batch_over_existing_streams_numbers_each_in_item_order() {
        for id in ["x", "y"] {
            Spi::run(&format!(
                "SELECT * FROM domain_events.raise_event('Loan', '{id}', 'Loan.Created')"
            ))
            .unwrap();
        }
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', 'x', 'Loan.Noted')").unwrap();
        let batch = |ids: &[&str]| {
            let items: Vec<String> = ids
                .iter()
                .enumerate()
                .map(|(n, id)| {
                    format!(r#"{{"aggregate_type": "Loan", "aggregate_id": "{id}", "event_type": "Loan.Batched", "payload": {{"n": {n}}}}}"#)
                })
                .collect();
            one::<String>(&format!(
                "SELECT string_agg(aggregate_version::text, ',' ORDER BY ord) \
                   FROM domain_events.raise_events('[{}]') WITH ORDINALITY AS r(id, position, aggregate_version, recorded_at, ord)",
                items.join(",")
            ))
        };
        assert_eq!(batch(&["y", "x", "y", "x", "x"]), "2,3,3,4,5");
        assert_eq!(heads(), "x5,y3");
        assert_eq!(
            stored_in_position_order("Loan.Batched", "n"),
            "y2:0,x3:1,y3:2,x4:3,x5:4"
        );
        assert!(one::<bool>(
            "SELECT bool_and(txid = pg_current_xact_id() AND recorded_at = now() AND position IS NOT NULL) \
               FROM domain_events.event"
        ));
        assert_eq!(
            one::<i64>("SELECT aggregate_version FROM domain_events.raise_event('Loan', 'x', 'Loan.Noted')"),
            6
        );
        assert_eq!(batch(&["x", "new", "y", "x"]), "7,1,4,8");
        assert_eq!(batch(&["new", "y"]), "2,5");
        assert_eq!(
            one::<String>(
                "SELECT string_agg(aggregate_id || ':' || versions, ',' ORDER BY aggregate_id) FROM ( \
                   SELECT aggregate_id, string_agg(aggregate_version::text, ' ' ORDER BY position) AS versions \
                     FROM domain_events.event GROUP BY aggregate_id) s"
            ),
            "new:1 2,x:1 2 3 4 5 6 7 8,y:1 2 3 4 5"
        );
    }

    /// Savepoints inside the raising statement (PL/pgSQL exception blocks called per row,
    /// next to raises of the statement itself): what a rolled-back block raised is gone, and
    /// the stream stays gap-free with its head at its last event.
    #[pg_test]
    fn exception_blocks_inside_a_raising_statement_keep_streams_gap_free() {
        Spi::run(
            "CREATE FUNCTION public.raise_or_fail(g int) RETURNS bigint LANGUAGE plpgsql AS $$ \
             DECLARE v bigint; \
             BEGIN \
               BEGIN \
                 SELECT aggregate_version INTO v FROM domain_events.raise_event('Loan', 'a', \
                   'Loan.Tried', jsonb_build_object('g', g)); \
                 IF g % 3 = 0 THEN RAISE EXCEPTION 'no %', g; END IF; \
                 RETURN v; \
               EXCEPTION WHEN raise_exception THEN RETURN -1; \
               END; \
             END $$",
        )
        .unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', 'a', 'Loan.Created')").unwrap();
        // Per row: one raise of the statement itself, then one in an exception block that
        // every third row rolls back.
        // The subquery (kept apart by OFFSET 0) calls both per row as the rows are produced,
        // whatever order the aggregate then sorts them in.
        let outcomes = one::<String>(
            "SELECT string_agg(outcome, ',' ORDER BY g) FROM ( \
               SELECT g, r.aggregate_version || '/' || public.raise_or_fail(g) AS outcome \
                 FROM generate_series(1, 6) g, \
                      LATERAL domain_events.raise_event('Loan', 'a', 'Loan.Noted', jsonb_build_object('g', g)) r \
               OFFSET 0) per_row",
        );
        assert_eq!(outcomes, "2/3,4/5,6/-1,7/8,9/10,11/-1");
        assert_eq!(
            one::<String>(
                "SELECT string_agg(aggregate_version::text, ',' ORDER BY position) \
                   FROM domain_events.event WHERE aggregate_id = 'a'"
            ),
            "1,2,3,4,5,6,7,8,9,10,11"
        );
        assert_eq!(
            one::<i64>("SELECT version FROM domain_events.aggregate WHERE aggregate_id = 'a'"),
            11
        );
        assert_eq!(
            count("SELECT count(*) FROM domain_events.event WHERE event_type = 'Loan.Tried'"),
            4
        );
    }

    /// Stream heads are moved by the raising functions only: raising again for a stream whose
    /// head was updated directly in the same transaction fails (`55000`) rather than number
    /// events from a head it no longer knows.
    #[pg_test(error = "the stream head of Loan/a was changed directly in this transaction")]
    fn a_head_updated_directly_while_raising_fails_the_transaction() {
        Spi::run(
            "SELECT count(*) FROM generate_series(1, 3) g, \
               LATERAL domain_events.raise_event('Loan', 'a', 'Loan.Noted', jsonb_build_object('g', g))",
        )
        .unwrap();
        Spi::run(
            "UPDATE domain_events.aggregate SET version = version + 10 WHERE aggregate_id = 'a'",
        )
        .unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', 'a', 'Loan.Noted')").unwrap();
    }

    /// A sync handler sees the stream head at the event it is given, however many events of
    /// the stream the statement raised before it.
    #[pg_test]
    fn sync_handlers_see_the_head_at_their_event() {
        Spi::run(
            "CREATE TABLE public.heads_seen (event_version bigint, head_version bigint); \
             CREATE FUNCTION public.note_head(event jsonb) RETURNS void LANGUAGE sql AS $$ \
               INSERT INTO public.heads_seen SELECT (event->>'aggregate_version')::bigint, \
                 (SELECT version FROM domain_events.aggregate \
                   WHERE aggregate_type = event->>'aggregate_type' AND aggregate_id = event->>'aggregate_id') $$; \
             SELECT domain_events.register_handler('heads', 'public.note_head(jsonb)', '{Loan.Noted}')",
        )
        .unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', 'a', 'Loan.Created')").unwrap();
        Spi::run(
            "SELECT count(*) FROM generate_series(1, 5) g, \
               LATERAL domain_events.raise_event('Loan', 'a', 'Loan.Noted', jsonb_build_object('g', g))",
        )
        .unwrap();
        assert_eq!(
            one::<String>(
                "SELECT string_agg(event_version || '=' || head_version, ',' ORDER BY event_version) FROM public.heads_seen"
            ),
            "2=2,3=3,4=4,5=5,6=6"
        );
    }

    /// Triggers someone adds to the event table fire for every raised event, however the
    /// extension stores it.
    #[pg_test]
    fn insert_triggers_added_to_the_event_table_fire_for_raised_events() {
        Spi::run(
            "CREATE TABLE public.seen (event_id uuid, aggregate_version bigint); \
             CREATE FUNCTION public.note_event() RETURNS trigger LANGUAGE plpgsql AS \
               $$BEGIN INSERT INTO public.seen VALUES (NEW.id, NEW.aggregate_version); RETURN NULL; END$$; \
             CREATE FUNCTION public.note_statement() RETURNS trigger LANGUAGE plpgsql AS \
               $$BEGIN INSERT INTO public.seen VALUES (NULL, NULL); RETURN NULL; END$$",
        )
        .unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', 'a', 'Loan.Created')").unwrap();
        Spi::run(
            "CREATE TRIGGER noted AFTER INSERT ON domain_events.event \
               FOR EACH ROW EXECUTE FUNCTION public.note_event(); \
             CREATE TRIGGER noted_statement AFTER INSERT ON domain_events.event \
               FOR EACH STATEMENT EXECUTE FUNCTION public.note_statement()",
        )
        .unwrap();
        Spi::run(
            "SELECT * FROM generate_series(1, 3) g, \
               LATERAL domain_events.raise_event('Loan', 'a', 'Loan.Noted', jsonb_build_object('g', g))",
        )
        .unwrap();
        assert_eq!(
            one::<String>(
                "SELECT string_agg(aggregate_version::text, ',' ORDER BY aggregate_version) FROM public.seen WHERE event_id IS NOT NULL"
            ),
            "2,3,4"
        );
        assert_eq!(
            count("SELECT count(*) FROM public.seen WHERE event_id IS NULL"),
            3
        );
        assert_eq!(
            count("SELECT count(*) FROM public.seen s JOIN domain_events.event e ON e.id = s.event_id"),
            3
        );
    }

    #[pg_test]
    fn stored_event_keeps_every_field() {
        Spi::run("SELECT * FROM domain_events.raise_event('ticket', 'T-1', 'ticket.created', '{\"status\": \"submitted\", \"ü\": [1, {\"x\": null}]}', '{\"actor\": \"dev-1\", \"source\": \"core\"}', 0, '2020-02-02 10:00:00+00', 3)").unwrap();
        let row = Spi::get_three::<String, String, i32>(
            "SELECT payload::text, metadata::text, event_version FROM domain_events.event",
        )
        .unwrap();
        assert_eq!(
            row.0.as_deref(),
            Some(r#"{"ü": [1, {"x": null}], "status": "submitted"}"#)
        );
        assert_eq!(
            row.1.as_deref(),
            Some(r#"{"actor": "dev-1", "source": "core"}"#)
        );
        assert_eq!(row.2, Some(3));
        assert!(one::<bool>("SELECT occurred_at = '2020-02-02 10:00:00+00' AND recorded_at = now() AND txid = pg_current_xact_id() AND substr(id::text, 15, 1) = '7' FROM domain_events.event"));
    }

    #[pg_test]
    fn uuid_and_bigint_ids_have_overloads() {
        Spi::run("SELECT * FROM domain_events.raise_event('User', '7b0c4a52-3d39-4a39-9a4b-2f7c1d1e0b11'::uuid, 'UserCreated', '{\"email\": \"ada@example.com\"}')").unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', 42::bigint, 'LoanStatusChanged', '{\"old_status\": \"submitted\", \"new_status\": \"approved\"}')").unwrap();
        assert_eq!(
            one::<String>(
                "SELECT string_agg(aggregate_id, ',' ORDER BY position) FROM domain_events.event"
            ),
            "7b0c4a52-3d39-4a39-9a4b-2f7c1d1e0b11,42"
        );
    }

    #[pg_test(error = "aggregate Loan/1 is at version 1, expected 0")]
    fn expected_version_mismatch_is_a_serialization_failure() {
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created', expected_version => 0)").unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created', expected_version => 0)").unwrap();
    }

    #[pg_test]
    fn expected_version_matching_is_accepted() {
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created', expected_version => 0)").unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Funded', expected_version => 1)").unwrap();
        assert_eq!(
            one::<i64>("SELECT domain_events.aggregate_version('Loan', '1')"),
            2
        );
    }

    #[pg_test]
    fn raise_events_versions_a_batch_in_order() {
        let versions = one::<String>(
            r#"SELECT string_agg(aggregate_version::text, ',') FROM domain_events.raise_events('[
                {"aggregate_type": "Loan", "aggregate_id": 7, "event_type": "Loan.Created", "expected_version": 0},
                {"aggregate_type": "Loan", "aggregate_id": "8", "event_type": "Loan.Created"},
                {"aggregate_type": "Loan", "aggregate_id": "7", "event_type": "Loan.Funded", "expected_version": 1, "payload": {"amount": 5}},
                {"aggregate_type": "Loan", "aggregate_id": "7", "event_type": "Loan.Paid", "occurred_at": "2026-01-02T03:04:05Z", "event_version": 2, "metadata": {"actor": 9}}
            ]')"#,
        );
        assert_eq!(versions, "1,1,2,3");
        assert!(one::<bool>("SELECT occurred_at = '2026-01-02T03:04:05Z' AND event_version = 2 FROM domain_events.event WHERE event_type = 'Loan.Paid'"));
        assert_eq!(
            count("SELECT count(*) FROM domain_events.raise_events('[]')"),
            0
        );
    }

    #[pg_test(error = "aggregate Loan/7 is at version 1, expected 0")]
    fn raise_events_checks_each_expected_version_against_the_batch() {
        Spi::run(r#"SELECT * FROM domain_events.raise_events('[
            {"aggregate_type": "Loan", "aggregate_id": "7", "event_type": "Loan.Created", "expected_version": 0},
            {"aggregate_type": "Loan", "aggregate_id": "7", "event_type": "Loan.Created", "expected_version": 0}]')"#).unwrap();
    }

    #[pg_test(error = "invalid events[1].event_type: \"bad name\" contains the character ' '")]
    fn raise_events_names_the_bad_item() {
        Spi::run(
            r#"SELECT * FROM domain_events.raise_events('[
            {"aggregate_type": "Loan", "aggregate_id": "7", "event_type": "Loan.Created"},
            {"aggregate_type": "Loan", "aggregate_id": "7", "event_type": "bad name"}]')"#,
        )
        .unwrap();
    }

    #[pg_test(error = "invalid events[0]: has the unknown key \"recorded_at\"")]
    fn raise_events_refuses_recorded_at() {
        Spi::run(r#"SELECT * FROM domain_events.raise_events('[{"aggregate_type": "Loan", "aggregate_id": "7", "event_type": "Loan.Created", "recorded_at": "2001-01-01T00:00:00Z"}]')"#).unwrap();
    }

    /// Deeper than the JSON parser's 128 levels: an invalid argument (22023) naming it, not an
    /// internal error raised before the function body runs.
    #[pg_test]
    fn json_nested_too_deeply_is_an_invalid_argument() {
        use pgrx::pg_sys::panic::CaughtError;
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        // One statement: after a caught error the transaction can only roll back. The other
        // arguments (metadata, batches, column_events) are covered end to end (hostile.rs).
        let sql = format!(
            "SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created', '{deep}')"
        );
        let caught = PgTryBuilder::new(|| {
            Spi::run(&sql).unwrap();
            None
        })
        .catch_others(|e| match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                Some((r.sql_error_code(), r.message().to_string()))
            }
            CaughtError::RustPanic { ereport, .. } => {
                Some((ereport.sql_error_code(), ereport.message().to_string()))
            }
        })
        .execute();
        let (code, message) = caught.expect("deep JSON must be refused");
        assert_eq!(
            code,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "{message}"
        );
        assert!(message.contains("nest at most 128 levels"), "{message}");
    }

    #[pg_test(error = "invalid payload: must be a JSON object, got an array")]
    fn payload_must_be_an_object() {
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created', '[1,2]')")
            .unwrap();
    }

    #[pg_test(error = "event_type must not be null")]
    fn null_event_type_is_refused() {
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', NULL)").unwrap();
    }

    #[pg_test(error = "invalid payload: is 24 bytes, above domain_events.max_payload_bytes (16)")]
    fn oversize_payload_is_refused() {
        Spi::run("SET domain_events.max_payload_bytes = 16").unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created', '{\"note\": \"0123456789ab\"}')").unwrap();
    }

    #[pg_test]
    fn disabled_store_records_nothing() {
        Spi::run("SET domain_events.enabled = off").unwrap();
        assert_eq!(
            count("SELECT count(*) FROM domain_events.raise_event('Loan', '1', 'Loan.Created')"),
            0
        );
        assert_eq!(count("SELECT count(*) FROM domain_events.event"), 0);
        assert_eq!(count("SELECT count(*) FROM domain_events.aggregate"), 0);
    }

    #[pg_test(error = "the event store is read-only (domain_events.enabled = read_only)")]
    fn read_only_store_refuses_to_raise() {
        Spi::run("SET domain_events.enabled = read_only").unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created')").unwrap();
    }

    #[pg_test]
    fn session_settings_fill_metadata() {
        Spi::run("SET LOCAL domain_events.actor = 'user-17'").unwrap();
        Spi::run("SET LOCAL domain_events.correlation_id = 'req-1'").unwrap();
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created', '{}', '{\"correlation_id\": \"given\"}')").unwrap();
        assert_eq!(
            one::<String>("SELECT metadata::text FROM domain_events.event"),
            r#"{"actor": "user-17", "correlation_id": "given"}"#
        );
    }

    #[pg_test]
    fn payloads_and_metadata_are_stored_as_given_by_every_raising_path() {
        // Every JSON shape jsonb keeps, read in place and copied into the store.
        let payload = r#"{"n": 1e2, "big": 123456789012345678901234567890.50, "neg": -0.5,
            "s": "ünï \"quoted\" \\ \n\t\u0001 😀", "nested": {"a": [1, [2, {"b": null}], true, false]},
            "empty": {}, "list": [], "": "empty key"}"#;
        let metadata = r#"{"actor": 7, "source": "test", "extra": {"deep": [1, 2]}}"#;
        Spi::run(&format!(
            "SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Noted', '{payload}', '{metadata}')"
        ))
        .unwrap();
        Spi::run(&format!(
            "SELECT * FROM domain_events.raise_events(jsonb_build_array(\
               jsonb_build_object('aggregate_type', 'Loan', 'aggregate_id', 2, 'event_type', 'Loan.Noted', \
                 'payload', '{payload}'::jsonb, 'metadata', '{metadata}'::jsonb), \
               jsonb_build_object('aggregate_type', 'Loan', 'aggregate_id', '3', 'event_type', 'Loan.Noted')))"
        ))
        .unwrap();
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM domain_events.event WHERE aggregate_id IN ('1', '2') \
                 AND payload = '{payload}'::jsonb AND metadata = '{metadata}'::jsonb"
            )),
            2
        );
        assert_eq!(
            count("SELECT count(*) FROM domain_events.event WHERE aggregate_id = '3' AND payload = '{}' AND metadata = '{}'"),
            1
        );
    }

    #[pg_test]
    fn a_sync_handler_gets_the_stored_event_with_every_key() {
        Spi::run(
            "CREATE TABLE public.seen (event jsonb); \
             CREATE FUNCTION public.keep(event jsonb) RETURNS void LANGUAGE sql \
               AS $$ INSERT INTO public.seen VALUES (event) $$; \
             SELECT domain_events.register_handler('keep', 'public.keep(jsonb)', '{Loan.*}')",
        )
        .unwrap();
        Spi::run("SET LOCAL domain_events.correlation_id = 'req-9'").unwrap();
        Spi::run("SELECT * FROM domain_events.raise_events('[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"7\", \"event_type\": \"Loan.Funded\", \"payload\": {\"amount\": 12.50, \"tags\": [\"a\"]}, \"occurred_at\": \"2026-01-02T03:04:05.123456Z\"}]')").unwrap();
        assert_eq!(
            one::<String>("SELECT string_agg(k, ',' ORDER BY k) FROM public.seen, jsonb_object_keys(event) k"),
            "aggregate_id,aggregate_type,aggregate_version,event_type,event_version,id,metadata,occurred_at,payload,position,recorded_at,txid"
        );
        assert!(one::<bool>(
            "SELECT (s.event->>'id')::uuid = e.id AND (s.event->'position')::bigint = e.position \
               AND s.event->>'aggregate_type' = e.aggregate_type AND s.event->>'aggregate_id' = e.aggregate_id \
               AND (s.event->'aggregate_version')::bigint = e.aggregate_version \
               AND s.event->>'event_type' = e.event_type AND (s.event->'event_version')::int = e.event_version \
               AND s.event->'payload' = e.payload AND s.event->'metadata' = e.metadata \
               AND s.event->'metadata'->>'correlation_id' = 'req-9' \
               AND (s.event->>'occurred_at')::timestamptz = e.occurred_at \
               AND (s.event->>'recorded_at')::timestamptz = e.recorded_at \
               AND (s.event->'txid')::text::xid8 = e.txid \
               AND jsonb_typeof(s.event->'position') = 'number' \
             FROM public.seen s JOIN domain_events.event e ON true"
        ));
    }

    #[pg_test(error = "domain_events.event is append-only: UPDATE is not allowed")]
    fn events_cannot_be_updated() {
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created')").unwrap();
        Spi::run("UPDATE domain_events.event SET payload = '{\"forged\": true}'").unwrap();
    }

    #[pg_test(error = "domain_events.event is append-only: DELETE is not allowed")]
    fn events_cannot_be_deleted() {
        Spi::run("SELECT * FROM domain_events.raise_event('Loan', '1', 'Loan.Created')").unwrap();
        Spi::run("DELETE FROM domain_events.event").unwrap();
    }

    #[pg_test(error = "domain_events.event is append-only: TRUNCATE is not allowed")]
    fn partitions_cannot_be_truncated() {
        Spi::run("SELECT * FROM domain_events.import_events('[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"1\", \"event_type\": \"Loan.Created\", \"recorded_at\": \"2001-05-05T00:00:00Z\"}]')").unwrap();
        Spi::run("TRUNCATE domain_events.event_p200105").unwrap();
    }

    #[pg_test]
    fn imports_create_partitions_for_any_month() {
        Spi::run(r#"SELECT * FROM domain_events.import_events('[
            {"aggregate_type": "Loan", "aggregate_id": "1", "event_type": "Loan.Created", "recorded_at": "1999-03-15T12:00:00Z"},
            {"aggregate_type": "Loan", "aggregate_id": "1", "event_type": "Loan.Funded", "recorded_at": "2099-11-30T23:59:59.999999Z"},
            {"aggregate_type": "Loan", "aggregate_id": "1", "event_type": "Loan.Paid"}]')"#).unwrap();
        assert_eq!(
            one::<String>("SELECT string_agg(tableoid::regclass::text, ',' ORDER BY aggregate_version) FROM domain_events.event"),
            format!(
                "domain_events.event_p199903,domain_events.event_p209911,domain_events.event_p{}",
                one::<String>("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMM')")
            )
        );
    }

    #[pg_test]
    fn maintain_moves_stray_rows_out_of_the_default_partition() {
        Spi::run("INSERT INTO domain_events.event (id, aggregate_type, aggregate_id, aggregate_version, event_type, recorded_at) VALUES (gen_random_uuid(), 'Loan', 'x', 1, 'Loan.Created', '1987-06-05 00:00:00+00')").unwrap();
        assert_eq!(count("SELECT count(*) FROM domain_events.event_default"), 1);
        let moved = one::<String>("SELECT string_agg(action || ':' || partition_name, ',') FROM domain_events.maintain() WHERE action = 'moved'");
        assert_eq!(moved, "moved:event_p198706");
        assert_eq!(count("SELECT count(*) FROM domain_events.event_default"), 0);
        assert_eq!(count("SELECT count(*) FROM domain_events.event_p198706"), 1);
    }

    #[pg_test]
    fn on_demand_partition_takes_its_rows_from_the_default_partition() {
        Spi::run("INSERT INTO domain_events.event (id, aggregate_type, aggregate_id, aggregate_version, event_type, recorded_at) VALUES (gen_random_uuid(), 'Loan', 'x', 1, 'Loan.Created', '1987-06-05 00:00:00+00')").unwrap();
        Spi::run("SELECT * FROM domain_events.import_events('[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"y\", \"event_type\": \"Loan.Created\", \"recorded_at\": \"1987-06-20T00:00:00Z\"}]')").unwrap();
        assert_eq!(count("SELECT count(*) FROM domain_events.event_default"), 0);
        assert_eq!(count("SELECT count(*) FROM domain_events.event_p198706"), 2);
    }

    #[pg_test]
    fn maintain_premakes_and_applies_retention_by_whole_partitions() {
        Spi::run("SET domain_events.premake_months = 2").unwrap();
        // CREATE EXTENSION premade them (and the maintenance worker may run too): check the outcome.
        Spi::run("SELECT * FROM domain_events.maintain()").unwrap();
        assert!(one::<bool>("SELECT to_regclass('domain_events.event_p' || to_char((now() + interval '2 months') AT TIME ZONE 'UTC', 'YYYYMM')) IS NOT NULL"));
        Spi::run(r#"SELECT * FROM domain_events.import_events('[
            {"aggregate_type": "Loan", "aggregate_id": "1", "event_type": "Loan.Created", "recorded_at": "2001-01-15T00:00:00Z"},
            {"aggregate_type": "Loan", "aggregate_id": "1", "event_type": "Loan.Funded", "recorded_at": "2002-01-15T00:00:00Z"}]')"#).unwrap();
        Spi::run("SET domain_events.retention = '12 months'").unwrap();
        Spi::run("SET domain_events.retention_action = 'drop'").unwrap();
        let dropped = one::<String>("SELECT string_agg(partition_name, ',' ORDER BY partition_name) FROM domain_events.maintain() WHERE action = 'dropped'");
        assert_eq!(dropped, "event_p200101,event_p200201");
        assert_eq!(count("SELECT count(*) FROM domain_events.event"), 0);
        Spi::run("SELECT * FROM domain_events.import_events('[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"1\", \"event_type\": \"Loan.Paid\", \"recorded_at\": \"2003-01-15T00:00:00Z\"}]')").unwrap();
        Spi::run("SET domain_events.retention_action = 'detach'").unwrap();
        let detached = one::<String>("SELECT string_agg(partition_name, ',') FROM domain_events.maintain() WHERE action = 'detached'");
        assert_eq!(detached, "archived_p200301");
        assert_eq!(
            count("SELECT count(*) FROM domain_events.archived_p200301"),
            1
        );
    }

    #[pg_test]
    fn a_maintenance_worker_runs_in_each_listed_database() {
        // The test cluster preloads the library with maintenance_databases = 'postgres, pgrx_tests'.
        let workers = "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_stat_activity \
                       WHERE backend_type = 'pg_domain_events maintenance'";
        for _ in 0..300 {
            // Activity statistics are a snapshot per transaction unless cleared.
            Spi::run("SELECT pg_stat_clear_snapshot()").unwrap();
            if Spi::get_one::<String>(workers).ok().flatten().as_deref()
                == Some("pgrx_tests,postgres")
            {
                // pg_class, not to_regclass: a catalog scan sees other sessions' commits, whereas
                // the syscache of this long-running statement could keep a negative entry.
                assert!(one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'event_p' || to_char((now() + interval '2 months') AT TIME ZONE 'UTC', 'YYYYMM'))"));
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!(
            "expected maintenance workers in postgres and pgrx_tests, saw {:?}",
            Spi::get_one::<String>(workers)
        );
    }

    fn capture_setup() {
        Spi::run("CREATE TABLE loans (id bigint PRIMARY KEY, status text, amount numeric, updated_at timestamptz DEFAULT now())").unwrap();
        Spi::run("SELECT domain_events.track('loans', 'Loan', ignore_columns => '{updated_at}', column_events => '{\"status\": \"Loan.StatusChanged\"}')").unwrap();
    }

    #[pg_test]
    fn tracked_tables_raise_created_updated_and_deleted() {
        capture_setup();
        Spi::run("INSERT INTO loans VALUES (42, 'submitted', 100)").unwrap();
        Spi::run("UPDATE loans SET updated_at = now() + interval '1 s'").unwrap(); // ignored column only
        Spi::run("UPDATE loans SET status = 'approved'").unwrap();
        Spi::run("UPDATE loans SET amount = 120, status = 'funded'").unwrap();
        Spi::run("DELETE FROM loans").unwrap();
        assert_eq!(
            one::<String>("SELECT string_agg(event_type || '@' || aggregate_version || ' ' || payload::text, ' | ' ORDER BY position) FROM domain_events.event"),
            r#"Loan.Created@1 {"id": 42, "amount": 100, "status": "submitted"} | Loan.StatusChanged@2 {"new_status": "approved", "old_status": "submitted"} | Loan.Updated@3 {"amount": {"new": 120, "old": 100}} | Loan.StatusChanged@4 {"new_status": "funded", "old_status": "approved"} | Loan.Deleted@5 {"id": 42, "amount": 120, "status": "funded"}"#
        );
        assert_eq!(
            one::<String>("SELECT DISTINCT metadata->>'table' FROM domain_events.event"),
            "public.loans"
        );
    }

    #[pg_test]
    fn tracking_survives_added_columns_and_can_be_removed() {
        capture_setup();
        Spi::run("ALTER TABLE loans ADD COLUMN note text").unwrap();
        Spi::run("INSERT INTO loans (id, status, amount, note) VALUES (1, 'new', 1, 'hello')")
            .unwrap();
        assert_eq!(
            one::<String>("SELECT payload->>'note' FROM domain_events.event"),
            "hello"
        );
        assert_eq!(
            count("SELECT count(*) FROM domain_events.tracked_tables"),
            1
        );
        Spi::run("SELECT domain_events.untrack('loans')").unwrap();
        Spi::run("INSERT INTO loans (id, status, amount) VALUES (2, 'new', 1)").unwrap();
        assert_eq!(count("SELECT count(*) FROM domain_events.event"), 1);
        assert_eq!(
            count("SELECT count(*) FROM domain_events.tracked_tables"),
            0
        );
    }

    #[pg_test]
    fn composite_and_uuid_ids_are_supported() {
        Spi::run("CREATE TABLE lines (order_id uuid, n int, qty int, PRIMARY KEY (order_id, n))")
            .unwrap();
        Spi::run("SELECT domain_events.track('lines', 'OrderLine', id_columns => '{order_id,n}', columns => '{qty}')").unwrap();
        Spi::run("INSERT INTO lines VALUES ('7b0c4a52-3d39-4a39-9a4b-2f7c1d1e0b11', 3, 1)")
            .unwrap();
        assert_eq!(
            one::<String>("SELECT aggregate_id || ' ' || payload::text FROM domain_events.event"),
            r#"7b0c4a52-3d39-4a39-9a4b-2f7c1d1e0b11:3 {"qty": 1}"#
        );
    }

    #[pg_test(error = "table public.loans has no column \"nope\"")]
    fn tracking_an_unknown_column_names_the_table() {
        Spi::run("CREATE TABLE loans (id bigint PRIMARY KEY)").unwrap();
        Spi::run("SELECT domain_events.track('loans', 'Loan', id_column => 'nope')").unwrap();
    }

    #[pg_test(error = "table public.loans is not tracked")]
    fn untracking_an_untracked_table_is_an_error() {
        Spi::run("CREATE TABLE loans (id bigint PRIMARY KEY)").unwrap();
        Spi::run("SELECT domain_events.untrack('loans')").unwrap();
    }

    #[pg_test(error = "table public.loans id column \"id\" must not be null")]
    fn a_null_id_is_refused_with_the_table_name() {
        Spi::run("CREATE TABLE loans (id bigint, status text)").unwrap();
        Spi::run("SELECT domain_events.track('loans', 'Loan')").unwrap();
        Spi::run("INSERT INTO loans VALUES (NULL, 'x')").unwrap();
    }

    /// Runs `sql` in a subtransaction: `ok`, or the SQLSTATE and message it failed with.
    fn outcome(sql: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.outcome(q text) RETURNS text LANGUAGE plpgsql AS $$ \
             BEGIN EXECUTE q; RETURN 'ok'; \
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ' ' || SQLERRM; END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.outcome($1)", &[sql.into()])
            .unwrap()
            .unwrap()
    }

    const FUNDED_SCHEMA: &str = r#"{"type": "object", "required": ["amount"], "additionalProperties": false, "properties": {"amount": {"type": "integer", "minimum": 1}, "currency": {"enum": ["EUR", "USD"]}}}"#;

    fn register_funded() {
        Spi::run(&format!(
            "SELECT domain_events.register_schema('Loan.Funded', 1, '{FUNDED_SCHEMA}')"
        ))
        .unwrap();
    }

    #[pg_test]
    fn a_schema_registered_in_this_transaction_is_enforced_by_every_raising_path() {
        register_funded();
        let ok = outcome(
            "SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"amount\": 5}')",
        );
        assert_eq!(ok, "ok");
        let bad = outcome("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"amount\": \"SECRET-5\"}')");
        assert_eq!(
            bad,
            r#"23514 payload does not match the schema of Loan.Funded version 1: "/amount" (type)"#
        );
        let batch = outcome("SELECT domain_events.raise_events('[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"2\", \"event_type\": \"Loan.Funded\", \"payload\": {\"amount\": 1}}, {\"aggregate_type\": \"Loan\", \"aggregate_id\": \"2\", \"event_type\": \"Loan.Funded\", \"payload\": {\"amount\": 0, \"extra\": \"SECRET\"}}]')");
        assert_eq!(
            batch,
            r#"23514 events[1].payload does not match the schema of Loan.Funded version 1: "/amount" (minimum), "/extra" (additionalProperties)"#
        );
        let import = outcome("SELECT domain_events.import_events('[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"3\", \"event_type\": \"Loan.Funded\"}]')");
        assert_eq!(
            import,
            r#"23514 events[0].payload does not match the schema of Loan.Funded version 1: "/amount" (required)"#
        );
        // Another version has no schema: not checked in the default mode.
        assert_eq!(
            outcome("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"amount\": \"x\"}', event_version => 2)"),
            "ok"
        );
        // Table capture checks the events it raises.
        Spi::run("CREATE TABLE loans (id bigint PRIMARY KEY, amount numeric)").unwrap();
        Spi::run("SELECT domain_events.register_schema('Loan.Created', 1, '{\"properties\": {\"amount\": {\"maximum\": 100}}}')")
            .unwrap();
        Spi::run("SELECT domain_events.track('loans', 'Loan')").unwrap();
        assert_eq!(outcome("INSERT INTO loans VALUES (1, 50)"), "ok");
        assert_eq!(
            outcome("INSERT INTO loans VALUES (2, 5000)"),
            r#"23514 events[0].payload does not match the schema of Loan.Created version 1: "/amount" (maximum)"#
        );
        assert_eq!(
            count("SELECT count(*) FROM domain_events.event WHERE event_type IN ('Loan.Funded', 'Loan.Created')"),
            3
        );
    }

    #[pg_test]
    fn a_rolled_back_registration_is_no_longer_enforced() {
        Spi::run("CREATE OR REPLACE FUNCTION pg_temp.register_and_fail() RETURNS void LANGUAGE plpgsql AS $$ \
                  BEGIN PERFORM domain_events.register_schema('Loan.Funded', 1, '{\"required\": [\"amount\"]}'); \
                  PERFORM domain_events.raise_event('Loan', '1', 'Loan.Funded', '{}'); END $$").unwrap();
        assert!(outcome("SELECT pg_temp.register_and_fail()").starts_with("23514 "));
        assert_eq!(
            outcome("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{}')"),
            "ok"
        );
        assert_eq!(count("SELECT count(*) FROM domain_events.event_schema"), 0);
    }

    #[pg_test]
    fn strict_mode_refuses_event_types_without_a_schema_and_off_checks_nothing() {
        register_funded();
        Spi::run("SET LOCAL domain_events.schema_validation = strict").unwrap();
        assert_eq!(
            outcome("SELECT domain_events.raise_event('Loan', '1', 'Loan.Closed')"),
            "23514 payload: Loan.Closed version 1 has no registered schema (domain_events.schema_validation = strict)"
        );
        assert_eq!(
            outcome(
                "SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"amount\": 2}')"
            ),
            "ok"
        );
        Spi::run("SET LOCAL domain_events.schema_validation = off").unwrap();
        assert_eq!(
            outcome("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"amount\": \"x\"}')"),
            "ok"
        );
    }

    #[pg_test]
    fn registration_refuses_bad_schemas_and_keeps_versions_immutable() {
        register_funded();
        // The identical schema again (as a migration run twice would) is accepted.
        assert!(!one::<bool>(&format!(
            "SELECT domain_events.register_schema('Loan.Funded', 1, '{FUNDED_SCHEMA}')"
        )));
        assert_eq!(
            outcome(
                "SELECT domain_events.register_schema('Loan.Funded', 1, '{\"type\": \"object\"}')"
            ),
            "23505 a different schema is already registered for Loan.Funded version 1"
        );
        assert_eq!(
            outcome("UPDATE domain_events.event_schema SET schema = '{}'"),
            "55000 domain_events.event_schema: a registered schema version is immutable"
        );
        let bad = outcome("SELECT domain_events.register_schema('Loan.Funded', 2, '{\"properties\": {\"amount\": {\"type\": \"integr\"}}}')");
        assert!(
            bad.starts_with(
                "22023 invalid schema: is not a valid JSON Schema at /properties/amount/type"
            ),
            "{bad}"
        );
        let draft = outcome("SELECT domain_events.register_schema('Loan.Funded', 2, '{\"$schema\": \"http://json-schema.org/draft-04/schema#\"}')");
        assert!(
            draft.starts_with("22023 invalid schema: declares the unknown draft"),
            "{draft}"
        );
        let remote = outcome("SELECT domain_events.register_schema('Loan.Funded', 2, '{\"$ref\": \"https://example.com/loan.json\"}')");
        assert!(
            remote.starts_with("22023 invalid schema: cannot be compiled")
                && remote.contains("https://example.com/loan.json"),
            "{remote}"
        );
        assert_eq!(
            outcome("SELECT domain_events.register_schema('Loan.Funded', 0, '{}')"),
            "22023 invalid event_version: 0 is not a schema version (1 or more)"
        );
        assert_eq!(count("SELECT count(*) FROM domain_events.event_schema"), 1);
    }

    #[pg_test]
    fn a_schema_is_dropped_only_while_no_event_uses_it() {
        register_funded();
        Spi::run("SELECT domain_events.register_schema('Loan.Funded', 2, '{}')").unwrap();
        Spi::run("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"amount\": 3}')")
            .unwrap();
        assert_eq!(
            outcome("SELECT domain_events.drop_schema('Loan.Funded', 1)"),
            "2BP01 the schema of Loan.Funded version 1 is in use by stored events"
        );
        assert_eq!(
            outcome("SELECT domain_events.drop_schema('Loan.Funded', 3)"),
            "42704 no schema is registered for Loan.Funded version 3"
        );
        assert_eq!(
            outcome("SELECT domain_events.drop_schema('Loan.Funded', 2)"),
            "ok"
        );
        assert_eq!(
            one::<String>("SELECT string_agg(event_type || ' v' || event_version || ' ' || latest, ',') FROM domain_events.event_schemas"),
            "Loan.Funded v1 true"
        );
    }

    #[pg_test]
    fn compatibility_names_what_a_new_version_breaks() {
        register_funded();
        assert_eq!(
            one::<String>(
                r#"SELECT string_agg(location || ' ' || change, '; ' ORDER BY location, change) FROM domain_events.check_schema_compatibility('Loan.Funded', '{"type": "object", "required": ["amount", "currency"], "properties": {"amount": {"type": "integer", "minimum": 1}, "currency": {"enum": ["EUR"]}}}')"#
            ),
            "/currency enum values removed; /currency required property added"
        );
        assert_eq!(
            outcome("SELECT * FROM domain_events.check_schema_compatibility('Loan.Closed', '{}')"),
            "42704 no schema is registered for Loan.Closed"
        );
    }

    // Handlers in the database.

    /// Runs `sql` in a subtransaction: `ok`, or the SQLSTATE, message, detail, hint and
    /// context it failed with, one per line.
    fn failure(sql: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.failure(q text) RETURNS text LANGUAGE plpgsql AS $$ \
             DECLARE s text; m text; d text; h text; c text; \
             BEGIN EXECUTE q; RETURN 'ok'; \
             EXCEPTION WHEN OTHERS THEN \
               GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, \
                 h = PG_EXCEPTION_HINT, c = PG_EXCEPTION_CONTEXT; \
               RETURN concat_ws(E'\\n', s, m, d, h, c); END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.failure($1)", &[sql.into()])
            .unwrap()
            .unwrap()
    }

    /// `public.calls` records every handler call: handler, event id, type, and whether the
    /// event's row was visible to it.
    fn handler_setup() {
        Spi::run(
            "CREATE TABLE public.calls (n serial, handler text, event_id uuid, event_type text, \
               aggregate_version bigint, stored boolean, causation text, correlation text); \
             CREATE FUNCTION public.record(handler text, event jsonb) RETURNS void \
               LANGUAGE sql AS $$ INSERT INTO public.calls (handler, event_id, event_type, \
                 aggregate_version, stored, causation, correlation) \
               SELECT handler, (event->>'id')::uuid, event->>'event_type', \
                 (event->>'aggregate_version')::bigint, \
                 EXISTS (SELECT 1 FROM domain_events.event e WHERE e.id = (event->>'id')::uuid \
                          AND e.position = (event->>'position')::bigint), \
                 event->'metadata'->>'causation_id', event->'metadata'->>'correlation_id' $$; \
             CREATE FUNCTION public.first(event jsonb) RETURNS void LANGUAGE sql \
               AS $$ SELECT public.record('first', event) $$; \
             CREATE FUNCTION public.second(event jsonb) RETURNS void LANGUAGE sql \
               AS $$ SELECT public.record('second', event) $$; \
             CREATE FUNCTION public.third(event jsonb) RETURNS integer LANGUAGE plpgsql \
               AS $$ BEGIN PERFORM public.record('third', event); RETURN NULL; END $$;",
        )
        .unwrap();
    }

    fn calls() -> String {
        one::<String>("SELECT coalesce(string_agg(handler || ':' || event_type, ',' ORDER BY n), '') FROM public.calls")
    }

    #[pg_test]
    fn registration_refuses_bad_input_and_writes_nothing() {
        handler_setup();
        Spi::run("CREATE FUNCTION public.wrong(event text) RETURNS void LANGUAGE sql AS 'SELECT 1'; \
                  CREATE FUNCTION public.many(event jsonb) RETURNS SETOF int LANGUAGE sql AS 'SELECT 1'; \
                  CREATE PROCEDURE public.proc(event jsonb) LANGUAGE sql AS 'SELECT 1'")
            .unwrap();
        let cases = [
            ("'h', 'public.nope(jsonb)', '{*}'", "42883 function \"public.nope(jsonb)\" does not exist"),
            ("'h', 'public.wrong(text)', '{*}'", "42P13 function public.wrong(text) cannot be a handler: it must take exactly one argument, of type jsonb"),
            ("'h', 'public.many(jsonb)', '{*}'", "42P13 function public.many(jsonb) cannot be a handler: it returns a set"),
            ("'h', 'public.proc(jsonb)', '{*}'", "42P13 function public.proc(jsonb) cannot be a handler: it is not a plain function (a procedure, aggregate or window function)"),
            ("'h', 'public.first(jsonb)', '{Loan.}'", "22023 invalid events[1]: \"Loan.\" is not an event filter"),
            ("'h', 'public.first(jsonb)', '{Loan.*,\"Lo an.*\"}'", "22023 invalid events[2]: \"Lo an\" contains the character ' '"),
            ("'h', 'public.first(jsonb)', '{}'", "22023 invalid events: has 0 filters"),
            ("'h', 'public.first(jsonb)', '{NULL}'", "22004 events[1] must not be null"),
            ("'h', 'public.first(jsonb)', NULL", "22004 events must not be null"),
            ("'h', 'public.first(jsonb)', '{*}', mode => 'later'", "22023 invalid mode: \"later\" is not a handler mode"),
            ("'h', 'public.first(jsonb)', '{*}', log_level => 'debug'", "22023 invalid log_level: \"debug\" is not a log level"),
            ("'bad name', 'public.first(jsonb)', '{*}'", "22023 invalid name: \"bad name\" contains the character ' '"),
            ("NULL, 'public.first(jsonb)', '{*}'", "22004 name must not be null"),
        ];
        for (args, expected) in cases {
            let got = outcome(&format!("SELECT domain_events.register_handler({args})"));
            assert_eq!(got, expected, "{args}");
        }
        assert_eq!(count("SELECT count(*) FROM domain_events.handler"), 0);
        Spi::run("SELECT domain_events.register_handler('audit', 'public.first(jsonb)', '{*}')")
            .unwrap();
        assert_eq!(
            outcome(
                "SELECT domain_events.register_handler('audit', 'public.second(jsonb)', '{*}')"
            ),
            "42710 a handler named \"audit\" is already registered"
        );
        assert_eq!(
            one::<String>("SELECT format('%s %s %s %s %s %s', mode, function, events, priority, log_level, managed_by) FROM domain_events.handler"),
            "sync first(jsonb) {*} 100 errors sql"
        );
        assert_eq!(
            outcome("SELECT domain_events.enable_handler('nope')"),
            "42704 no handler named \"nope\" is registered"
        );
        assert_eq!(
            outcome("SELECT domain_events.unregister_handler('nope')"),
            "42704 no handler named \"nope\" is registered"
        );
    }

    #[pg_test]
    fn sync_handlers_run_after_the_row_is_stored_in_priority_order_on_every_raising_path() {
        handler_setup();
        Spi::run(
            "SELECT domain_events.register_handler('third', 'public.third(jsonb)', '{Loan.Funded}', priority => 5); \
             SELECT domain_events.register_handler('second', 'public.second(jsonb)', '{*}', priority => 1); \
             SELECT domain_events.register_handler('first', 'public.first(jsonb)', '{Loan.*}', priority => 1); \
             SELECT domain_events.register_handler('later', 'public.first(jsonb)', '{Loan.*}', mode => 'async'); \
             SELECT domain_events.register_handler('off', 'public.first(jsonb)', '{*}', enabled => false)",
        )
        .unwrap();
        Spi::run("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded')").unwrap();
        assert_eq!(
            calls(),
            "first:Loan.Funded,second:Loan.Funded,third:Loan.Funded"
        );
        Spi::run("DELETE FROM public.calls").unwrap();
        Spi::run("SELECT * FROM domain_events.raise_events('[{\"aggregate_type\": \"User\", \"aggregate_id\": \"7\", \"event_type\": \"User.Created\"}, {\"aggregate_type\": \"Loan\", \"aggregate_id\": \"1\", \"event_type\": \"Loan.Repaid\"}]')").unwrap();
        assert_eq!(
            calls(),
            "second:User.Created,first:Loan.Repaid,second:Loan.Repaid"
        );
        Spi::run("DELETE FROM public.calls").unwrap();
        Spi::run(
            "CREATE TABLE public.loans (id bigint PRIMARY KEY, status text); \
                  SELECT domain_events.track('public.loans', 'Loan'); \
                  INSERT INTO public.loans VALUES (9, 'new')",
        )
        .unwrap();
        assert_eq!(calls(), "first:Loan.Created,second:Loan.Created");
        // Every handler saw its event's row, with the version it was stored at.
        assert_eq!(
            count("SELECT count(*) FROM public.calls WHERE NOT stored"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM public.calls WHERE aggregate_version IS NULL"),
            0
        );
        // Imported history does not run them.
        Spi::run("DELETE FROM public.calls").unwrap();
        Spi::run("SELECT * FROM domain_events.import_events('[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"5\", \"event_type\": \"Loan.Funded\"}]')").unwrap();
        assert_eq!(calls(), "");
        // domain_events.enabled = off skips the raise and its handlers.
        Spi::run("SET LOCAL domain_events.enabled = off").unwrap();
        Spi::run("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded')").unwrap();
        assert_eq!(calls(), "");
    }

    #[pg_test]
    fn a_failing_handler_aborts_the_raise_with_its_own_error_and_a_context_line() {
        handler_setup();
        Spi::run(
            "CREATE FUNCTION public.require_amount(event jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN IF NOT (event->'payload' ? 'amount') THEN \
               RAISE EXCEPTION 'Loan.Funded needs an amount' USING ERRCODE = 'check_violation', \
                 DETAIL = 'payload has no amount', HINT = 'send the funded amount'; \
             END IF; END $$; \
             SELECT domain_events.register_handler('audit', 'public.first(jsonb)', '{*}', priority => 1); \
             SELECT domain_events.register_handler('require_amount', 'public.require_amount(jsonb)', '{Loan.Funded}', priority => 2)",
        )
        .unwrap();
        let got = failure(
            "SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"rate\": 7.5}')",
        );
        // (The detail may carry a Rust backtrace when the test cluster enables them.)
        assert!(
            got.starts_with("23514\nLoan.Funded needs an amount\npayload has no amount")
                && got.contains("\nsend the funded amount\n"),
            "{got}"
        );
        assert!(
            got.contains("sync handler \"require_amount\" handling event ")
                && got.contains(" (Loan.Funded, Loan 1 version 1)"),
            "{got}"
        );
        // Nothing of the raise remains: not the event, not the stream head, not the audit row.
        assert_eq!(count("SELECT count(*) FROM domain_events.event"), 0);
        assert_eq!(count("SELECT count(*) FROM domain_events.aggregate"), 0);
        assert_eq!(calls(), "");
        assert_eq!(
            outcome(
                "SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"amount\": 1}')"
            ),
            "ok"
        );
        // The same through a batch and through table capture.
        let batch = failure("SELECT domain_events.raise_events('[{\"aggregate_type\": \"Loan\", \"aggregate_id\": \"2\", \"event_type\": \"Loan.Funded\"}]')");
        assert!(
            batch.starts_with("23514\nLoan.Funded needs an amount\n"),
            "{batch}"
        );
        // A dropped function fails the raise clearly instead of skipping the handler.
        Spi::run("DROP FUNCTION public.require_amount(jsonb)").unwrap();
        let dropped = outcome(
            "SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"amount\": 1}')",
        );
        assert!(
            dropped.starts_with(
                "42883 sync handler \"require_amount\" cannot run: its function (OID "
            ),
            "{dropped}"
        );
    }

    #[pg_test]
    fn cascaded_events_carry_causation_and_correlation_and_stop_at_the_depth_limit() {
        handler_setup();
        Spi::run(
            "CREATE FUNCTION public.schedule(event jsonb) RETURNS void LANGUAGE sql AS $$ \
               SELECT domain_events.raise_event('Payment', event->>'aggregate_id', 'Payment.ScheduleCreated') $$; \
             SELECT domain_events.register_handler('schedule', 'public.schedule(jsonb)', '{Loan.Funded}'); \
             SELECT domain_events.register_handler('audit', 'public.first(jsonb)', '{Payment.*}')",
        )
        .unwrap();
        let funded = one::<pgrx::Uuid>("SELECT id FROM domain_events.raise_event('Loan', '1', 'Loan.Funded', metadata => '{\"correlation_id\": \"req-7\"}')");
        assert_eq!(
            one::<String>("SELECT causation || ' ' || correlation FROM public.calls"),
            format!("{funded} req-7")
        );
        Spi::run("DELETE FROM public.calls").unwrap();
        let funded = one::<pgrx::Uuid>(
            "SELECT id FROM domain_events.raise_event('Loan', '2', 'Loan.Funded')",
        );
        assert_eq!(
            one::<String>("SELECT causation || ' ' || correlation FROM public.calls"),
            format!("{funded} {funded}")
        );
        // A handler reacting to its own events recurses until the limit.
        Spi::run(
            "CREATE FUNCTION public.echo(event jsonb) RETURNS void LANGUAGE sql AS $$ \
               SELECT domain_events.raise_event('Loop', '1', 'Loop.Again') $$; \
             SELECT domain_events.register_handler('echo', 'public.echo(jsonb)', '{Loop.*}'); \
             SET LOCAL domain_events.handler_max_depth = 3",
        )
        .unwrap();
        let got = outcome("SELECT domain_events.raise_event('Loop', '1', 'Loop.Start')");
        assert_eq!(
            got,
            "54001 sync handlers raised events 3 levels deep (domain_events.handler_max_depth = 3)"
        );
        assert_eq!(
            count("SELECT count(*) FROM domain_events.event WHERE aggregate_type = 'Loop'"),
            0
        );
    }

    #[pg_test]
    fn registry_changes_take_effect_at_the_next_statement() {
        handler_setup();
        let raise =
            || Spi::run("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded')").unwrap();
        raise();
        Spi::run("SELECT domain_events.register_handler('first', 'public.first(jsonb)', '{*}')")
            .unwrap();
        raise();
        assert!(one::<bool>("SELECT domain_events.disable_handler('first')"));
        assert!(!one::<bool>(
            "SELECT domain_events.disable_handler('first')"
        ));
        raise();
        assert!(one::<bool>("SELECT domain_events.enable_handler('first')"));
        raise();
        Spi::run("SELECT domain_events.unregister_handler('first')").unwrap();
        raise();
        assert_eq!(calls(), "first:Loan.Funded,first:Loan.Funded");
        // A rolled-back registration is gone again.
        assert!(outcome(
            "SELECT domain_events.register_handler('second', 'public.second(jsonb)', '{*}'), 1/0"
        )
        .starts_with("22012 "));
        raise();
        assert_eq!(calls(), "first:Loan.Funded,first:Loan.Funded");
    }

    #[pg_test]
    fn executions_are_counted_even_when_their_transaction_rolls_back() {
        handler_setup();
        Spi::run(
            "CREATE FUNCTION public.refuse(event jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN IF event->'payload'->>'ok' IS NULL THEN RAISE EXCEPTION 'refused %', event->>'aggregate_id'; END IF; END $$; \
             SELECT domain_events.register_handler('refuse_counted', 'public.refuse(jsonb)', '{*}'); \
             SELECT domain_events.register_handler('logged_all', 'public.first(jsonb)', '{*}', log_level => 'all')",
        )
        .unwrap();
        // The failure rolls back its (sub)transaction; the counters keep it.
        assert!(
            outcome("SELECT domain_events.raise_event('Loan', 'L-9', 'Loan.Funded')")
                .starts_with("P0001 refused L-9")
        );
        Spi::run("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"ok\": 1}')")
            .unwrap();
        assert_eq!(
            one::<String>("SELECT format('%s %s %s %s %s', calls, successes, failures, last_error, last_error_at IS NOT NULL AND max_duration > '0' AND total_duration >= max_duration) FROM domain_events.handler_stats WHERE name = 'refuse_counted'"),
            "2 1 1 refused L-9 t"
        );
        // log_level all: the successful execution is in the log, in the raising transaction.
        assert_eq!(
            one::<String>("SELECT format('%s %s %s %s', handler, mode, outcome, attempt) FROM domain_events.handler_log"),
            "logged_all sync success 1"
        );
        Spi::run("SET LOCAL domain_events.handler_stats = off").unwrap();
        Spi::run("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded', '{\"ok\": 1}')")
            .unwrap();
        assert_eq!(
            count("SELECT calls FROM domain_events.handler_stats WHERE name = 'refuse_counted'"),
            2
        );
    }

    #[pg_test]
    fn run_async_handler_runs_a_registered_async_handler_for_the_listener() {
        handler_setup();
        Spi::run(
            "SELECT domain_events.register_handler('later', 'public.first(jsonb)', '{Loan.*}', \
               mode => 'async', log_level => 'all'); \
             SELECT domain_events.register_handler('now', 'public.second(jsonb)', '{*}')",
        )
        .unwrap();
        // The async one does not run in the raising transaction.
        Spi::run("SELECT domain_events.raise_event('Loan', '1', 'Loan.Funded')").unwrap();
        assert_eq!(calls(), "second:Loan.Funded");
        // Its listener lane starts at the registration; sync handlers have none.
        assert_eq!(
            one::<String>("SELECT string_agg(name || ' ' || mode || ' ' || transition || ' ' || (snapshot_prev IS NOT NULL), ',') FROM domain_events.subscription"),
            "handler:later notify 1 true"
        );
        // What the listener calls, with the event as it sends it.
        let event = one::<String>(
            "SELECT json_build_object('id', id, 'position', position, 'aggregate_type', \
               aggregate_type, 'aggregate_id', aggregate_id, 'aggregate_version', \
               aggregate_version, 'event_type', event_type, 'event_version', event_version, \
               'payload', payload, 'metadata', metadata)::text FROM domain_events.event",
        );
        Spi::run_with_args(
            "SELECT domain_events.run_async_handler('later', $1::jsonb)",
            &[event.clone().into()],
        )
        .unwrap();
        assert_eq!(calls(), "second:Loan.Funded,first:Loan.Funded");
        assert_eq!(
            count("SELECT count(*) FROM public.calls WHERE handler = 'first' AND stored"),
            1
        );
        assert_eq!(
            one::<String>("SELECT format('%s %s %s %s', handler, mode, outcome, attempt) FROM domain_events.handler_log"),
            "later async success 1"
        );
        assert_eq!(
            count("SELECT calls FROM domain_events.handler_stats WHERE name = 'later'"),
            1
        );
        // A disabled one still completes the event the listener is handling.
        Spi::run("SELECT domain_events.disable_handler('later')").unwrap();
        Spi::run_with_args(
            "SELECT domain_events.run_async_handler('later', $1::jsonb)",
            &[event.into()],
        )
        .unwrap();
        assert_eq!(
            count("SELECT count(*) FROM public.calls WHERE handler = 'first'"),
            2
        );
        // Only async handlers registered in SQL, and only events with the listener's keys.
        assert_eq!(
            outcome("SELECT domain_events.run_async_handler('now', '{}')"),
            "42704 no async handler named \"now\" is registered"
        );
        assert_eq!(
            outcome("SELECT domain_events.run_async_handler('nope', '{}')"),
            "42704 no async handler named \"nope\" is registered"
        );
        assert_eq!(
            outcome("SELECT domain_events.run_async_handler('later', '{\"id\": 1}')"),
            "22023 invalid event: \"id\" is not a UUID"
        );
        assert_eq!(
            outcome("SELECT domain_events.run_async_handler(NULL, '{}')"),
            "22004 handler must not be null"
        );
        // Unregistering removes the lane: its subscription, position row and dead letters.
        Spi::run(
            "INSERT INTO domain_events.subscription (name, mode) VALUES ('handler:later/later', 'notify'); \
             INSERT INTO domain_events.dead_letter (subscription, handler, event_id, position, error, attempts) \
               SELECT 'handler:later', 'later', id, position, 'failed', 5 FROM domain_events.event",
        )
        .unwrap();
        Spi::run("SELECT domain_events.unregister_handler('later')").unwrap();
        assert_eq!(count("SELECT count(*) FROM domain_events.subscription"), 0);
        assert_eq!(count("SELECT count(*) FROM domain_events.dead_letter"), 0);
        // Registering the name again starts a fresh lane.
        Spi::run(
            "SELECT domain_events.register_handler('later', 'public.first(jsonb)', '{*}', mode => 'async')",
        )
        .unwrap();
        assert_eq!(
            count("SELECT count(*) FROM domain_events.subscription WHERE name = 'handler:later' AND position = 0"),
            1
        );
    }

    #[pg_test]
    fn raised_events_and_store_operations_are_counted_and_refused_ones_are_not() {
        let raised = |event_type: &str| {
            count(&format!(
                "SELECT COALESCE(sum(events), 0)::bigint FROM domain_events.raise_stats \
                 WHERE aggregate_type = 'Counted' AND event_type = '{event_type}'"
            ))
        };
        let operations = || count("SELECT operations FROM domain_events.store_stats");
        let before = operations();
        Spi::run("SELECT domain_events.raise_event('Counted', '1', 'Counted.Opened')").unwrap();
        Spi::run(
            r#"SELECT * FROM domain_events.raise_events('[
                {"aggregate_type": "Counted", "aggregate_id": "2", "event_type": "Counted.Opened", "payload": {}},
                {"aggregate_type": "Counted", "aggregate_id": "2", "event_type": "Counted.Closed", "payload": {}},
                {"aggregate_type": "Counted", "aggregate_id": "3", "event_type": "Counted.Opened", "payload": {}}]')"#,
        )
        .unwrap();
        assert_eq!((raised("Counted.Opened"), raised("Counted.Closed")), (3, 1));
        assert!(operations() >= before + 2);
        // A refused statement stores nothing and counts nothing.
        assert!(outcome(
            "SELECT domain_events.raise_event('Counted', '1', 'Counted.Opened', expected_version => 7)"
        )
        .starts_with("40001"));
        assert_eq!(raised("Counted.Opened"), 3);
        // Cumulative buckets ending with +Inf, which holds every operation.
        assert!(one::<bool>(
            "SELECT bucket_le[cardinality(bucket_le)] = 'Infinity' \
               AND bucket_operations[cardinality(bucket_operations)] = operations \
               AND bucket_operations[1] <= bucket_operations[2] AND total_seconds > 0 \
              FROM domain_events.store_stats"
        ));
    }

    #[pg_test]
    fn a_traceparent_from_the_setting_or_metadata_is_stored_and_a_malformed_one_refused() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        Spi::run(&format!("SET LOCAL domain_events.traceparent = '{tp}'")).unwrap();
        let stored = |id: &str| {
            one::<String>(&format!("SELECT metadata->>'traceparent' FROM domain_events.event WHERE aggregate_type = 'Traced' AND aggregate_id = '{id}'"))
        };
        Spi::run("SELECT domain_events.raise_event('Traced', '1', 'Traced.Done')").unwrap();
        assert_eq!(stored("1"), tp);
        // Metadata wins over the setting.
        let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        Spi::run(&format!("SELECT domain_events.raise_event('Traced', '2', 'Traced.Done', '{{}}', '{{\"traceparent\": \"{own}\"}}')")).unwrap();
        assert_eq!(stored("2"), own);
        let before = count("SELECT count(*) FROM domain_events.event");
        Spi::run("SET LOCAL domain_events.traceparent = '00-zz-00f067aa0ba902b7-01'").unwrap();
        assert!(
            outcome("SELECT domain_events.raise_event('Traced', '3', 'Traced.Done')")
                .starts_with("22023 invalid domain_events.traceparent"),
        );
        Spi::run("RESET domain_events.traceparent").unwrap();
        assert!(outcome(
            r#"SELECT * FROM domain_events.raise_events('[{"aggregate_type": "Traced", "aggregate_id": "4", "event_type": "Traced.Done", "metadata": {"traceparent": 7}}]')"#
        )
        .starts_with("22023 invalid events[0].metadata.traceparent"));
        assert_eq!(count("SELECT count(*) FROM domain_events.event"), before);
    }

    include!("tests/outbox.rs");
    include!("tests/event_indexes.rs");
}
