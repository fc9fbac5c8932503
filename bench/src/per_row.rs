//! Per-row raising, the way triggers and `INSERT … SELECT` users call it: one `raise_event`
//! call per row of a query,
//!
//! ```sql
//! SELECT count(*) FROM per_row_source s,
//!        LATERAL domain_events.raise_event('Loan', s.aggregate_id, 'Loan.Noted', s.payload, s.metadata)
//! ```
//!
//! next to the same rows written by a plain `INSERT … SELECT` into the plain baseline's table
//! (`bench/sql/plain_baseline.sql`: same columns and indexes, no validation, no stream heads)
//! and by the same `LATERAL` call of the PL/pgSQL baseline's `raise_event`
//! (`bench/sql/plpgsql_baseline.sql`). Every statement reads the same source table, so
//! building the rows costs them alike; each is one autocommitted statement.

use std::time::Instant;

use anyhow::{bail, Context};
use tokio_postgres::Client;

use crate::store::{self, ClusterArgs};

/// Options of `bench per-row`.
#[derive(clap::Args, Debug)]
pub struct PerRowArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Timed rounds; the rate reported is the median over rounds.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Statements per implementation per round.
    #[arg(long, default_value_t = 10)]
    statements: usize,
    /// Rows per statement.
    #[arg(long, default_value_t = 1000)]
    rows: usize,
    /// Aggregates the rows of a statement are spread over.
    #[arg(long, default_value_t = 100)]
    aggregates: usize,
}

/// The database every run creates afresh.
const DATABASE: &str = "pgde_bench_per_row";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Impl {
    Extension,
    Plain,
    Plpgsql,
}

const IMPLS: [Impl; 3] = [Impl::Extension, Impl::Plain, Impl::Plpgsql];

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Extension => "pg_domain_events raise_event per row",
            Impl::Plain => "plain INSERT … SELECT",
            Impl::Plpgsql => "PL/pgSQL raise_event per row",
        }
    }

    /// The statement writing every source row once; `$1` is how many events each aggregate
    /// already has (the plain table is given its versions, the others count them).
    fn statement(self) -> &'static str {
        match self {
            Impl::Extension => {
                "SELECT count(*) FROM per_row_source s, LATERAL domain_events.raise_event(\
                 'Loan', s.aggregate_id, 'Loan.Noted', s.payload, s.metadata) r \
                 WHERE $1::bigint >= 0"
            }
            Impl::Plain => {
                "WITH written AS (INSERT INTO bench_plain.event \
                 (aggregate_type, aggregate_id, aggregate_version, event_type, payload, metadata) \
                 SELECT 'Loan', s.aggregate_id, $1::bigint + s.ordinal, 'Loan.Noted', s.payload, s.metadata \
                 FROM per_row_source s RETURNING 1) SELECT count(*) FROM written"
            }
            Impl::Plpgsql => {
                "SELECT count(*) FROM per_row_source s, LATERAL bench_plpgsql.raise_event(\
                 'Loan', s.aggregate_id, 'Loan.Noted', s.payload, s.metadata) r \
                 WHERE $1::bigint >= 0"
            }
        }
    }
}

/// The source rows: `rows` events over `aggregates` aggregates, a loan-shaped ~200-byte
/// payload and small metadata each; `ordinal` is the row's 1-based rank within its aggregate.
fn source_table(rows: usize, aggregates: usize) -> String {
    format!(
        "CREATE TABLE per_row_source AS \
         SELECT g, 'loan-' || (g % {aggregates}) AS aggregate_id, \
                (g - 1) / {aggregates} + 1 AS ordinal, \
                jsonb_build_object('loan_id', 'loan-' || (g % {aggregates}), 'amount', 1000.50 + g, \
                  'currency', 'EUR', 'rate', 0.035, 'term_months', 36, 'borrower', 'Jane Doe ' || g, \
                  'status', 'funded', 'branch', 'north-west', 'note', 'lorem ipsum dolor sit amet') AS payload, \
                jsonb_build_object('actor', 'user-' || (g % 7), 'correlation_id', 'req-' || g, \
                  'source', 'bench') AS metadata \
         FROM generate_series(1, {rows}) g; \
         ANALYZE per_row_source"
    )
}

async fn write(client: &Client, imp: Impl, before: i64, rows: usize) -> anyhow::Result<()> {
    let n: i64 = client
        .query_one(imp.statement(), &[&before])
        .await
        .with_context(|| imp.name())?
        .get(0);
    if n as usize != rows {
        bail!("{} wrote {n} events of {rows}", imp.name());
    }
    Ok(())
}

/// Runs `bench per-row`.
pub async fn run(args: PerRowArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.statements == 0 || args.rows == 0 {
        bail!("rounds, statements and rows must be positive");
    }
    if args.aggregates == 0 || args.aggregates > args.rows {
        bail!("aggregates must be between 1 and the rows per statement");
    }
    let client = store::prepare_database(&args.cluster.dsn, DATABASE).await?;
    client
        .batch_execute(&source_table(args.rows, args.aggregates))
        .await
        .context("the source rows")?;
    let events_per_aggregate = (args.rows / args.aggregates) as i64;
    let mut written_per_aggregate = 0i64;
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); IMPLS.len()];
    eprintln!(
        "bench per-row: {} rounds x {} statements x {} rows over {} aggregates, per implementation",
        args.rounds, args.statements, args.rows, args.aggregates
    );
    // Round 0 warms up and is not counted.
    for round in 0..=args.rounds {
        for turn in 0..IMPLS.len() {
            let index = (turn + round) % IMPLS.len();
            let imp = IMPLS[index];
            let started = Instant::now();
            for statement in 0..args.statements {
                let before = written_per_aggregate + statement as i64 * events_per_aggregate;
                write(&client, imp, before, args.rows).await?;
            }
            let rate = (args.statements * args.rows) as f64 / started.elapsed().as_secs_f64();
            if round > 0 {
                rates[index].push(rate);
            }
        }
        written_per_aggregate += args.statements as i64 * events_per_aggregate;
    }
    check_same_streams(&client).await?;
    let medians: Vec<f64> = rates.iter_mut().map(|r| store::median(r)).collect();
    let (extension, plain, plpgsql) = (medians[0], medians[1], medians[2]);
    println!();
    println!("| per-row raising | events/s | vs plain INSERT … SELECT | vs PL/pgSQL per row |");
    println!("|---|---:|---:|---:|");
    for (imp, rate) in IMPLS.iter().zip(&medians) {
        println!(
            "| {} | {rate:.0} | {:.2}× | {:.2}× |",
            imp.name(),
            rate / plain,
            rate / plpgsql
        );
    }
    println!();
    println!(
        "targets: ≥ 2× the PL/pgSQL per-row path ({:.2}×: {}), ≥ 0.5× plain INSERT … SELECT ({:.2}×: {})",
        extension / plpgsql,
        if extension / plpgsql >= 2.0 { "met" } else { "missed" },
        extension / plain,
        if extension / plain >= 0.5 { "met" } else { "missed" },
    );
    // Its connection ends with the database.
    drop(client);
    store::drop_database(&args.cluster.dsn, DATABASE).await?;
    Ok(())
}

/// The three stores must hold the same per-aggregate versions.
async fn check_same_streams(client: &Client) -> anyhow::Result<()> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM domain_events.event), \
                    (SELECT count(*) FROM bench_plain.event), \
                    (SELECT count(*) FROM bench_plpgsql.event), \
                    (SELECT count(*) FROM ( \
                       (SELECT aggregate_id, aggregate_version FROM domain_events.event \
                        EXCEPT SELECT aggregate_id, aggregate_version FROM bench_plain.event) \
                       UNION ALL \
                       (SELECT aggregate_id, aggregate_version FROM bench_plpgsql.event \
                        EXCEPT SELECT aggregate_id, aggregate_version FROM bench_plain.event)) d)",
            &[],
        )
        .await?;
    let (a, b, c, differing): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if a != b || b != c || differing != 0 {
        bail!("the stores differ: {a}, {b} and {c} events, {differing} versions not in the plain store");
    }
    Ok(())
}
