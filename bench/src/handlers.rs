//! Sync handlers' cost, in one run: `raise_events` batches with 1 and 3 registered sync
//! handlers that each insert an audit row, next to the same work done by hand-written
//! `AFTER INSERT` triggers on the event table; single-event commit latency with one handler;
//! and whether counting executions (`handler_stats`, shared memory) serialises concurrent
//! writers: several sessions committing single events with counting on, off, and with a
//! counter row updated per event (the design the shared memory replaces).
//!
//! Targets (issue: handlers in the database): 1 and 3 handlers ≥ 0.8× the triggers. Counting
//! needs `shared_preload_libraries = 'pg_domain_events'` (`PGDE_PRELOAD=pg_domain_events
//! scripts/cluster.sh start`); without it the counting rows measure nothing and say so.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_postgres::Client;

use crate::store::{
    connect, drop_database, dsn_for, fresh_database, median, quantile_ms, ClusterArgs, Workload,
};

/// Flags of `bench handlers`.
#[derive(clap::Args, Debug)]
pub struct HandlersArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Timed rounds; throughput is the median over rounds.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Batches per setup per round.
    #[arg(long, default_value_t = 5)]
    batches_per_round: usize,
    /// Events per batch (one transaction).
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Single-event commits per setup for the latency figures.
    #[arg(long, default_value_t = 2000)]
    commits: usize,
    /// Concurrent writers in the counting comparison.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Single-event commits per writer per counting mode and round.
    #[arg(long, default_value_t = 600)]
    commits_per_writer: usize,
    /// Keep the databases after the run.
    #[arg(long)]
    keep_database: bool,
}

/// One database per setup: triggers on the event table act on every raise in their database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    NoHandler,
    OneHandler,
    ThreeHandlers,
    OneTrigger,
    ThreeTriggers,
}

const SETUPS: [Setup; 5] = [
    Setup::NoHandler,
    Setup::OneHandler,
    Setup::ThreeHandlers,
    Setup::OneTrigger,
    Setup::ThreeTriggers,
];

impl Setup {
    fn database(self) -> &'static str {
        match self {
            Setup::NoHandler => "pgde_bench_h0",
            Setup::OneHandler => "pgde_bench_h1",
            Setup::ThreeHandlers => "pgde_bench_h3",
            Setup::OneTrigger => "pgde_bench_t1",
            Setup::ThreeTriggers => "pgde_bench_t3",
        }
    }

    fn audits(self) -> usize {
        match self {
            Setup::NoHandler => 0,
            Setup::OneHandler | Setup::OneTrigger => 1,
            Setup::ThreeHandlers | Setup::ThreeTriggers => 3,
        }
    }

    fn triggers(self) -> bool {
        matches!(self, Setup::OneTrigger | Setup::ThreeTriggers)
    }
}

/// The same audit row, written by a handler from the event's JSON or by a trigger from NEW.
fn setup_sql(setup: Setup) -> String {
    let mut sql = String::from("CREATE SCHEMA bench_audit;");
    for k in 1..=setup.audits() {
        sql.push_str(&format!(
            "CREATE TABLE bench_audit.log_{k} (event_id uuid NOT NULL, event_type text NOT NULL, \
               aggregate_id text NOT NULL, at timestamptz NOT NULL DEFAULT now());"
        ));
        if setup.triggers() {
            sql.push_str(&format!(
                "CREATE FUNCTION bench_audit.trigger_{k}() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN INSERT INTO bench_audit.log_{k} (event_id, event_type, aggregate_id) \
                   VALUES (NEW.id, NEW.event_type, NEW.aggregate_id); RETURN NULL; END $$; \
                 CREATE TRIGGER audit_{k} AFTER INSERT ON domain_events.event \
                   FOR EACH ROW EXECUTE FUNCTION bench_audit.trigger_{k}();"
            ));
        } else {
            sql.push_str(&format!(
                "CREATE FUNCTION bench_audit.handler_{k}(event jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
                 BEGIN INSERT INTO bench_audit.log_{k} (event_id, event_type, aggregate_id) \
                   VALUES ((event->>'id')::uuid, event->>'event_type', event->>'aggregate_id'); END $$; \
                 SELECT domain_events.register_handler('audit_{k}', 'bench_audit.handler_{k}(jsonb)', '{{*}}', log_level => 'off');"
            ));
        }
    }
    sql
}

async fn prepare(args: &HandlersArgs) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::new();
    for setup in SETUPS {
        let client = fresh_database(&args.cluster.dsn, setup.database()).await?;
        client
            .batch_execute(&setup_sql(setup))
            .await
            .with_context(|| format!("set up {setup:?}"))?;
        client
            .batch_execute("SELECT * FROM domain_events.maintain()")
            .await?;
        clients.push(client);
    }
    Ok(clients)
}

/// Concurrent single-event commits: `writers` sessions, each `commits` raises; events/s.
async fn concurrent_commits(dsn: &str, writers: usize, commits: usize) -> anyhow::Result<f64> {
    let mut sessions = Vec::new();
    for _ in 0..writers {
        sessions.push(connect(dsn).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (w, session) in sessions.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let statement = session
                .prepare(
                    "SELECT id FROM domain_events.raise_event('Loan', $1, 'Loan.Funded', '{\"amount\": 1}')",
                )
                .await?;
            for n in 0..commits {
                // One aggregate per writer and commit: writers never wait for a stream head.
                let id = format!("w{w}-{n}");
                session.execute(&statement, &[&id]).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((writers * commits) as f64 / started.elapsed().as_secs_f64())
}

/// Runs `bench handlers`.
pub async fn run(args: HandlersArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.batches_per_round == 0 || args.batch_size == 0 || args.writers == 0
    {
        bail!("rounds, batches-per-round, batch-size and writers must be positive");
    }
    let clients = prepare(&args).await?;
    let aggregates = 100.min(args.batch_size);
    let mut workload = Workload::new(aggregates * 20, 200);
    let statement = "SELECT count(*) FROM domain_events.raise_events($1::jsonb)";
    let mut prepared = Vec::new();
    for client in &clients {
        prepared.push(client.prepare(statement).await?);
    }
    eprintln!(
        "bench handlers: {} rounds x {} batches x {} events per setup (none, 1 and 3 handlers, 1 and 3 triggers)",
        args.rounds, args.batches_per_round, args.batch_size
    );
    let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    let mut batch_index = 0;
    for round in 0..=args.rounds {
        // Every setup writes the same batches; the order rotates so drift hits all alike.
        let batches: Vec<_> = (0..args.batches_per_round)
            .map(|_| {
                batch_index += 1;
                workload.batch(batch_index, args.batch_size, aggregates)
            })
            .collect();
        for offset in 0..SETUPS.len() {
            let i = (round + offset) % SETUPS.len();
            let started = Instant::now();
            for batch in &batches {
                let n: i64 = clients[i]
                    .query_one(&prepared[i], &[&batch.json])
                    .await
                    .with_context(|| format!("{:?} batch", SETUPS[i]))?
                    .get(0);
                if n as usize != batch.len() {
                    bail!("{:?} wrote {n} events of {}", SETUPS[i], batch.len());
                }
            }
            let eps =
                (args.batches_per_round * args.batch_size) as f64 / started.elapsed().as_secs_f64();
            if round > 0 {
                rounds[i].push(eps);
            }
        }
    }
    // Every setup did the same work: one audit row per event and handler or trigger.
    for (setup, client) in SETUPS.iter().zip(&clients) {
        let events: i64 = client
            .query_one("SELECT count(*) FROM domain_events.event", &[])
            .await?
            .get(0);
        for k in 1..=setup.audits() {
            let rows: i64 = client
                .query_one(&format!("SELECT count(*) FROM bench_audit.log_{k}"), &[])
                .await?
                .get(0);
            if rows != events {
                bail!("{setup:?}: {rows} audit rows in log_{k} for {events} events");
            }
        }
    }
    let eps: Vec<f64> = rounds.iter().map(|r| median(&mut r.clone())).collect();

    // Single-event commit latency, setups alternating every commit.
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    let latency_setups = [Setup::NoHandler, Setup::OneHandler, Setup::OneTrigger];
    let mut single = Vec::new();
    for setup in latency_setups {
        let i = SETUPS.iter().position(|s| *s == setup).expect("a setup");
        single.push(
            clients[i]
                .prepare("SELECT id FROM domain_events.raise_event('Loan', $1, 'Loan.Funded', '{\"amount\": 100000}')")
                .await?,
        );
    }
    for n in 0..args.commits + 200 {
        for (k, setup) in latency_setups.iter().enumerate() {
            let i = SETUPS.iter().position(|s| s == setup).expect("a setup");
            let id = format!("lat-{n}");
            let started = Instant::now();
            clients[i].execute(&single[k], &[&id]).await?;
            if n >= 200 {
                samples[k].push(started.elapsed());
            }
        }
    }
    for s in &mut samples {
        s.sort();
    }

    // Counting under concurrent writers, in the one-handler database.
    let one = dsn_for(&args.cluster.dsn, Setup::OneHandler.database());
    let admin = &clients[SETUPS
        .iter()
        .position(|s| *s == Setup::OneHandler)
        .expect("a setup")];
    let preloaded: String = admin
        .query_one("SHOW shared_preload_libraries", &[])
        .await?
        .get(0);
    let preloaded = preloaded.contains("pg_domain_events");
    admin
        .batch_execute(
            "CREATE TABLE bench_audit.counter (handler text PRIMARY KEY, calls bigint NOT NULL); \
             INSERT INTO bench_audit.counter VALUES ('audit_1', 0); \
             CREATE FUNCTION bench_audit.count_row(event jsonb) RETURNS void LANGUAGE sql AS $$ \
               UPDATE bench_audit.counter SET calls = calls + 1 WHERE handler = 'audit_1' $$",
        )
        .await?;
    // The modes take turns, rotated each round, so that drift hits them alike; the counter-row
    // handler is registered only for its own turns.
    let modes = [
        ("counted in shared memory (handler_stats = on)", "on", false),
        ("not counted (handler_stats = off)", "off", false),
        ("counted by a counter row UPDATE per event", "off", true),
    ];
    let mut counting: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..=3 {
        for offset in 0..modes.len() {
            let m = (round + offset) % modes.len();
            let (_, stats, counter_row) = modes[m];
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE pgde_bench_h1 SET domain_events.handler_stats = {stats}"
                ))
                .await?;
            if counter_row {
                admin
                    .batch_execute("SELECT domain_events.register_handler('count_row', 'bench_audit.count_row(jsonb)', '{*}', log_level => 'off')")
                    .await?;
            }
            let eps = concurrent_commits(&one, args.writers, args.commits_per_writer).await?;
            if counter_row {
                admin
                    .batch_execute("SELECT domain_events.unregister_handler('count_row')")
                    .await?;
            }
            if round > 0 {
                counting[m].push(eps);
            }
        }
    }
    let counting: Vec<(&str, f64)> = modes
        .iter()
        .zip(&mut counting)
        .map(|((label, _, _), rounds)| (*label, median(rounds)))
        .collect();
    let counted: Option<i64> = admin
        .query_one(
            "SELECT calls FROM domain_events.handler_stats WHERE name = 'audit_1'",
            &[],
        )
        .await?
        .get(0);

    let server: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let at = |setup: Setup| eps[SETUPS.iter().position(|s| *s == setup).expect("a setup")];
    let verdict = |ratio: f64| if ratio >= 0.8 { "met" } else { "MISSED" };
    println!();
    println!("pg_domain_events handlers benchmark: PostgreSQL {server}, {cores} cores");
    println!(
        "raise_events, batches of {} events over {aggregates} aggregates (~200-byte payloads), median of {} rounds x {} batches; each handler or trigger inserts one audit row per event (PL/pgSQL)",
        args.batch_size, args.rounds, args.batches_per_round
    );
    println!();
    println!("| measure | sync handlers | AFTER INSERT triggers | handlers / triggers | target |");
    println!("|---|---:|---:|---:|---|");
    for (n, h, t) in [
        (1, Setup::OneHandler, Setup::OneTrigger),
        (3, Setup::ThreeHandlers, Setup::ThreeTriggers),
    ] {
        let ratio = at(h) / at(t);
        println!(
            "| {n} audit {}, events/s | {:.0} | {:.0} | {ratio:.2}x | >= 0.8x ({}) |",
            if n == 1 { "row" } else { "rows" },
            at(h),
            at(t),
            verdict(ratio)
        );
    }
    println!(
        "| no handler, events/s | {:.0} | | | (the store bench compares it with plain INSERT) |",
        at(Setup::NoHandler)
    );
    println!();
    println!("| single-event commit latency | no handler | 1 sync handler | 1 trigger | target |");
    println!("|---|---:|---:|---:|---|");
    for (name, p) in [("p50, ms", 0.5), ("p99, ms", 0.99)] {
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | < 50 ms with handlers ({}) |",
            quantile_ms(&samples[0], p),
            quantile_ms(&samples[1], p),
            quantile_ms(&samples[2], p),
            if quantile_ms(&samples[1], p) < 50.0 {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    println!();
    println!(
        "| {} writers, single-event commits, 1 handler | events/s | / not counted |",
        args.writers
    );
    println!("|---|---:|---:|");
    let baseline = counting[1].1;
    for (label, eps) in &counting {
        println!("| {label} | {eps:.0} | {:.2}x |", eps / baseline);
    }
    println!();
    if preloaded {
        println!(
            "handler_stats counted {} calls of audit_1 (counting was on for part of the run)",
            counted.unwrap_or(0)
        );
    } else {
        println!("shared_preload_libraries does not load pg_domain_events: nothing was counted (the first two rows measure the same thing)");
    }
    println!(
        "throughput per round (events/s): {}",
        SETUPS
            .iter()
            .zip(&rounds)
            .map(|(s, r)| format!(
                "{s:?} {:?}",
                r.iter().map(|v| v.round() as u64).collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    drop(clients);
    if !args.keep_database {
        for setup in SETUPS {
            drop_database(&args.cluster.dsn, setup.database()).await?;
        }
    }
    Ok(())
}
