//! Event contracts' cost: `raise_events` batches checked against registered JSON Schemas, next
//! to the same batches with `domain_events.schema_validation = off`, in one run.
//!
//! Target (issue: event contracts): validated batch throughput ≥ 0.85× unvalidated. Both modes
//! write to the same store from two sessions (one per setting) and take turns, rotated every
//! round, so that drift on a shared machine hits them alike.

use std::time::Instant;

use anyhow::{bail, Context};
use tokio_postgres::Client;

use crate::store::{
    connect, drop_database, dsn_for, fresh_database, median, ClusterArgs, Workload, EVENT_TYPES,
};

const DATABASE: &str = "pgde_bench_contracts";

/// Flags of `bench contracts`.
#[derive(clap::Args, Debug)]
pub struct ContractsArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Timed rounds; the throughput reported is the median over rounds.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Batches per mode per round.
    #[arg(long, default_value_t = 20)]
    batches_per_round: usize,
    /// Events per batch (one transaction).
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Aggregates per batch.
    #[arg(long, default_value_t = 100)]
    aggregates: usize,
    /// Keep the database after the run.
    #[arg(long)]
    keep_database: bool,
}

/// The contract of the workload's payloads: 8 properties with types, `required`, one enum,
/// a pattern, a format and one nested object.
const SCHEMA: &str = r#"{
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["loan_id", "customer_id", "amount", "currency", "status"],
    "additionalProperties": false,
    "properties": {
        "loan_id": {"type": "string", "format": "uuid"},
        "customer_id": {"type": "string", "pattern": "^c-[0-9]{8}$"},
        "amount": {"type": "integer", "minimum": 0},
        "currency": {"type": "string", "minLength": 3, "maxLength": 3},
        "terms": {
            "type": "object",
            "required": ["rate", "months"],
            "properties": {
                "rate": {"type": "number", "minimum": 0},
                "months": {"type": "integer", "minimum": 1, "maximum": 480}
            }
        },
        "status": {"enum": ["submitted", "approved", "funded", "repaid"]},
        "reason": {"type": "string", "maxLength": 200},
        "note": {"type": "string"}
    }
}"#;

/// The two sessions compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Validated,
    Unvalidated,
}

async fn prepare(args: &ContractsArgs) -> anyhow::Result<(Client, Client)> {
    let validated = fresh_database(&args.cluster.dsn, DATABASE).await?;
    for event_type in EVENT_TYPES {
        validated
            .execute(
                "SELECT domain_events.register_schema($1, 1, $2::text::jsonb)",
                &[&event_type, &SCHEMA],
            )
            .await
            .context("register the schema")?;
    }
    validated
        .batch_execute(
            "SET domain_events.schema_validation = registered; SELECT * FROM domain_events.maintain()",
        )
        .await?;
    let unvalidated = connect(&dsn_for(&args.cluster.dsn, DATABASE)).await?;
    unvalidated
        .batch_execute("SET domain_events.schema_validation = off")
        .await?;
    Ok((validated, unvalidated))
}

/// Runs `bench contracts`.
pub async fn run(args: ContractsArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.batches_per_round == 0 || args.batch_size == 0 {
        bail!("rounds, batches-per-round and batch-size must be positive");
    }
    if args.aggregates == 0 || args.aggregates > args.batch_size {
        bail!("aggregates must be between 1 and the batch size");
    }
    let (validated, unvalidated) = prepare(&args).await?;
    let pool = args.aggregates * 20;
    let mut workload = Workload::new(pool, 200).with_nested_terms();
    // Each mode writes its own batches (the stream heads they advance are the same store's),
    // built alike: the same sizes, types and shapes.
    let batch_count = (args.rounds + 1) * args.batches_per_round * 2;
    let batches: Vec<_> = (0..batch_count)
        .map(|i| workload.batch(i, args.batch_size, args.aggregates))
        .collect();
    let statement = "SELECT count(*) FROM domain_events.raise_events($1::jsonb)";
    let on = validated.prepare(statement).await?;
    let off = unvalidated.prepare(statement).await?;
    let payload_bytes: usize = {
        let items: serde_json::Value = serde_json::from_str(&batches[0].json.0)?;
        let items = items.as_array().expect("an array");
        items
            .iter()
            .map(|i| i["payload"].to_string().len())
            .sum::<usize>()
            / items.len()
    };
    eprintln!(
        "bench contracts: {} rounds x {} batches x {} events (~{payload_bytes}-byte payloads), validated vs schema_validation = off",
        args.rounds, args.batches_per_round, args.batch_size
    );
    let mut rounds: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut next = 0;
    validated.batch_execute("CHECKPOINT").await?;
    for round in 0..=args.rounds {
        let order = if round % 2 == 0 {
            [Mode::Validated, Mode::Unvalidated]
        } else {
            [Mode::Unvalidated, Mode::Validated]
        };
        for mode in order {
            let (client, statement) = match mode {
                Mode::Validated => (&validated, &on),
                Mode::Unvalidated => (&unvalidated, &off),
            };
            let started = Instant::now();
            for batch in &batches[next..next + args.batches_per_round] {
                let n: i64 = client
                    .query_one(statement, &[&batch.json])
                    .await
                    .with_context(|| format!("{mode:?} batch"))?
                    .get(0);
                if n as usize != batch.len() {
                    bail!("{mode:?} wrote {n} events of {}", batch.len());
                }
            }
            next += args.batches_per_round;
            let eps =
                (args.batches_per_round * args.batch_size) as f64 / started.elapsed().as_secs_f64();
            if round > 0 {
                rounds[mode as usize].push(eps);
                eprintln!("  round {round}: {mode:?} {eps:.0} events/s");
            }
        }
    }
    // The validated session really validates: a payload breaking the schema is refused.
    let refused = validated
        .query(
            "SELECT * FROM domain_events.raise_event('Loan', 'bench-check', 'Loan.Funded', '{\"amount\": -1}')",
            &[],
        )
        .await;
    match refused {
        Err(e) if e.code().map(|c| c.code()) == Some("23514") => {}
        other => bail!("the validated session did not refuse an invalid payload: {other:?}"),
    }
    let with = median(&mut rounds[Mode::Validated as usize].clone());
    let without = median(&mut rounds[Mode::Unvalidated as usize].clone());
    let ratio = with / without;
    let server: String = validated
        .query_one("SHOW server_version", &[])
        .await?
        .get(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!();
    println!("pg_domain_events contracts benchmark: PostgreSQL {server}, {cores} cores");
    println!(
        "raise_events, batches of {} events over {} aggregates (~{payload_bytes}-byte payloads, schema of 8 properties with a nested object), median of {} rounds x {} batches",
        args.batch_size, args.aggregates, args.rounds, args.batches_per_round
    );
    println!();
    println!("| measure | validated | schema_validation = off | validated / off | target |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| batch throughput, events/s | {with:.0} | {without:.0} | {ratio:.2}x | >= 0.85x ({}) |",
        if ratio >= 0.85 { "met" } else { "MISSED" }
    );
    println!();
    println!(
        "throughput per round (events/s): validated {:?}, off {:?}",
        rounds[0]
            .iter()
            .map(|v| v.round() as u64)
            .collect::<Vec<_>>(),
        rounds[1]
            .iter()
            .map(|v| v.round() as u64)
            .collect::<Vec<_>>()
    );
    drop((validated, unvalidated));
    if !args.keep_database {
        drop_database(&args.cluster.dsn, DATABASE).await?;
    }
    Ok(())
}
