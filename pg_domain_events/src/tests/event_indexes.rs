// The event table's indexes serve the reads the operator console makes. Included into
// `tests.rs`'s `tests` module: `cargo pgrx test` calls the functions of the SQL schema `tests`
// only.

/// The plan of `sql`, as `EXPLAIN (COSTS OFF)` prints it.
fn plan_of(sql: &str) -> String {
    Spi::connect(|client| {
        client
            .select(&format!("EXPLAIN (COSTS OFF) {sql}"), None, &[])
            .unwrap()
            .map(|row| row.get::<String>(1).unwrap().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

#[pg_test]
fn a_page_of_one_event_type_reads_one_index_range_in_position_order() {
    // 5000 events of a common type, then 20 of a type only recent events have: the worst case
    // for walking the position index and filtering by type.
    Spi::run(
        "INSERT INTO domain_events.event (position, id, aggregate_type, aggregate_id, \
            aggregate_version, event_type) \
         SELECT g, gen_random_uuid(), 'Loan', (g % 100)::text, g / 100 + 1, \
                CASE WHEN g > 5000 THEN 'Loan.WrittenOff' ELSE 'Loan.Funded' END \
           FROM generate_series(1, 5020) g; \
         ANALYZE domain_events.event",
    )
    .unwrap();
    // A few thousand rows make sorting twenty cheap: ask whether the page can be read in
    // order at all, which only an index leading with the type and then the position allows.
    Spi::run("SET LOCAL enable_sort = off").unwrap();
    for after in [0i64, 2500, 5010] {
        let page = format!(
            "SELECT position FROM domain_events.event \
              WHERE event_type = 'Loan.WrittenOff' AND position > {after} \
              ORDER BY position LIMIT 100"
        );
        let plan = plan_of(&page);
        // A sort node (a line of its own with COSTS OFF), not Merge Append's "Sort Key".
        let sorts = plan.lines().any(|line| {
            let node = line.trim_start().trim_start_matches("->").trim_start();
            node == "Sort" || node == "Incremental Sort"
        });
        assert!(
            !sorts && plan.contains("event_type_position_idx"),
            "the page is not read in order from the type index:\n{plan}"
        );
        let expected = 5020 - after.max(5000);
        assert_eq!(
            count(&format!("SELECT count(*) FROM ({page}) p")),
            expected.min(100)
        );
    }
}
