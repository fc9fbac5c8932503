//! Table capture overhead: the same single-row UPDATE on a tracked and an untracked table with
//! identical data, measured alternately in one run.
//!
//! Target (performance, round 2): an UPDATE on a tracked table costs at most 1.3× the same
//! UPDATE on an untracked one at p50, commit included (1.5× in the first round).

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::Client;

use crate::store::{drop_database, fresh_database, median, quantile_ms, ClusterArgs};

const DATABASE: &str = "pgde_bench_capture";

/// Flags of `bench capture`.
#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Rows in each table.
    #[arg(long, default_value_t = 1000)]
    rows: i64,
    /// Autocommitted single-row UPDATEs per table (after as many warm-up ones / 10).
    #[arg(long, default_value_t = 5000)]
    commits: usize,
    /// Rounds of the in-transaction measurement (1000 UPDATEs per table per round).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

const SCHEMA: &str = "
    CREATE TABLE loans_plain (id bigint PRIMARY KEY, status text NOT NULL, amount numeric NOT NULL,
                              borrower text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE loans_tracked (LIKE loans_plain INCLUDING ALL);
    SELECT domain_events.track('loans_tracked', 'Loan', ignore_columns => '{updated_at}',
                               column_events => '{\"status\": \"Loan.StatusChanged\"}');
";

async fn prepare(args: &CaptureArgs) -> anyhow::Result<Client> {
    let client = fresh_database(&args.cluster.dsn, DATABASE).await?;
    client.batch_execute(SCHEMA).await.context("tables")?;
    for table in ["loans_plain", "loans_tracked"] {
        client
            .execute(
                &format!(
                    "INSERT INTO {table} (id, status, amount, borrower)
                     SELECT g, 'approved', 1000 + g, 'borrower-' || g FROM generate_series(1, $1::bigint) g"
                ),
                &[&args.rows],
            )
            .await?;
    }
    client.batch_execute("VACUUM ANALYZE").await?;
    Ok(client)
}

/// The UPDATE: changes `amount` on every call and `status` on every fourth, so the tracked
/// table raises `Loan.Updated` each time and `Loan.StatusChanged` now and then.
fn update_sql(table: &str) -> String {
    format!(
        "UPDATE {table} SET amount = amount + 1, updated_at = now(),
                status = CASE WHEN $2::bigint % 4 = 0 THEN (CASE status WHEN 'approved' THEN 'funded' ELSE 'approved' END) ELSE status END
          WHERE id = $1"
    )
}

/// Runs the capture overhead benchmark and prints its table.
pub async fn run(args: CaptureArgs) -> anyhow::Result<()> {
    let client = prepare(&args).await?;
    let plain = client.prepare(&update_sql("loans_plain")).await?;
    let tracked = client.prepare(&update_sql("loans_tracked")).await?;
    let statements = [&plain, &tracked];

    // Commit latency: alternate tables every statement so drift hits both alike.
    let mut latencies: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let warmup = args.commits / 10;
    for n in 0..(warmup + args.commits) {
        let id = (n as i64 % args.rows) + 1;
        let step = n as i64;
        for (which, statement) in statements.iter().enumerate() {
            let started = Instant::now();
            client.execute(*statement, &[&id, &step]).await?;
            if n >= warmup {
                latencies[which].push(started.elapsed());
            }
        }
    }
    for l in &mut latencies {
        l.sort();
    }

    // Throughput inside one transaction: the CPU cost of capture without the commit.
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..=args.rounds {
        for (which, statement) in statements.iter().enumerate() {
            client.batch_execute("BEGIN").await?;
            let started = Instant::now();
            for n in 0..1000i64 {
                let id = (n % args.rows) + 1;
                client.execute(*statement, &[&id, &(n + 1)]).await?;
            }
            let elapsed = started.elapsed();
            client.batch_execute("COMMIT").await?;
            if round > 0 {
                rates[which].push(1000.0 / elapsed.as_secs_f64());
            }
        }
    }
    let events: i64 = client
        .query_one("SELECT count(*) FROM domain_events.event", &[])
        .await?
        .get(0);
    anyhow::ensure!(events > 0, "the tracked table raised no events");

    let p50 = [
        quantile_ms(&latencies[0], 0.5),
        quantile_ms(&latencies[1], 0.5),
    ];
    let p99 = [
        quantile_ms(&latencies[0], 0.99),
        quantile_ms(&latencies[1], 0.99),
    ];
    let ups = [median(&mut rates[0]), median(&mut rates[1])];
    println!("table capture overhead: single-row UPDATE, tracked vs untracked table ({events} events raised)");
    println!("| measure | untracked | tracked | tracked / untracked | target |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| commit latency p50, ms | {:.3} | {:.3} | {:.2}x | <= 1.3x ({}) |",
        p50[0],
        p50[1],
        p50[1] / p50[0],
        if p50[1] / p50[0] <= 1.3 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "| commit latency p99, ms | {:.3} | {:.3} | {:.2}x | |",
        p99[0],
        p99[1],
        p99[1] / p99[0]
    );
    println!(
        "| UPDATEs/s in one transaction | {:.0} | {:.0} | {:.2}x time | |",
        ups[0],
        ups[1],
        ups[0] / ups[1]
    );
    drop(client);
    drop_database(&args.cluster.dsn, DATABASE).await?;
    Ok(())
}
