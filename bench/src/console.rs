//! The operator console's reads over a large store: `bench console`.
//!
//! It creates a throwaway database, stores `--events` events (1M by default) spread over
//! `--months` monthly partitions, `--aggregates` aggregates of three types and ten event types
//! (one of them rare), adds a subscription with `--pending` events it has not handled yet and a
//! few dead letters, then serves the console (`listener::console::router`, the code the
//! listener mounts on its admin server) on a local port and times HTTP requests to it:
//!
//! - a page of 100 events filtered by a common type and by a rare one, the first page and one
//!   from the middle of the history (`after_position`), and by a type only the last events
//!   have;
//! - one aggregate's history (a different aggregate every request);
//! - the outbox `pending` listing of the subscription (its first page of 100);
//! - the baseline: a page of 100 events without a filter (position order, the primary path).
//!
//! Each figure is the round trip of a keep-alive HTTP request on localhost, from sending it to
//! the last byte of the JSON body: the console's whole handling (token check, parameters, SQL,
//! JSON) plus a loopback hop. The measures take turns request by request, so drift on a shared
//! machine hits them alike; p50, p99 and max are reported with the ratio to the baseline.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_postgres::Client;

use crate::pipeline::param;
use crate::store::{connect, drop_database, dsn_for, fresh_database, quantile_ms, ClusterArgs};

/// The database every run creates afresh (dropped first if a previous run left it).
const DATABASE: &str = "pgde_bench_console";
/// The console's database role (granted `domain_events_console`), dropped with the database.
const ROLE: &str = "pgde_bench_console";
/// The developer token the bench signs in with (sent as a bearer token).
const TOKEN: &str = "bench-console-developer-token";
/// The subscription with pending events.
const SUBSCRIPTION: &str = "console-bench";

/// Options of `bench console`.
#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Events stored before the measurements.
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Aggregates the events belong to (their events interleave over the whole history).
    #[arg(long, default_value_t = 50_000)]
    aggregates: i64,
    /// Months the history is spread over, one partition each.
    #[arg(long, default_value_t = 12)]
    months: i64,
    /// Events committed after the subscription's delivered snapshot: its pending outbox.
    #[arg(long, default_value_t = 10_000)]
    pending: i64,
    /// Timed requests per measure (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Untimed requests per measure first.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Keep the database after the run (to EXPLAIN the console's statements by hand).
    #[arg(long)]
    keep_database: bool,
    /// Measure on the database a previous run kept (`--keep-database`) instead of loading a
    /// new one, e.g. after changing an index by hand; it is kept again.
    #[arg(long)]
    reuse_database: bool,
}

/// A common event type (a fifth of the events) and a rare one, spread over the history (see
/// [`STORE_HISTORY`]).
const COMMON_TYPE: &str = "Order.ItemAdded";
const RARE_TYPE: &str = "Loan.WrittenOff";
/// A type new in the last minutes: only the pending events have it.
const NEW_TYPE: &str = "Order.Returned";

/// Stores events `$1 ..= $2` of the history in one statement: event `g` (counted from 0 as
/// `n`) belongs to aggregate `n % $3` as its version `n / $3 + 1`, is recorded at `n / $4` of
/// the way from `$5` months before this month's start to now, and has a type by its aggregate
/// type and version; every 500th event of a loan is the rare type. Positions are `g`: the
/// history is in position order, as a real one is.
const STORE_HISTORY: &str = "
    INSERT INTO domain_events.event (position, id, aggregate_type, aggregate_id,
        aggregate_version, event_type, payload, metadata, occurred_at, recorded_at)
    SELECT g, gen_random_uuid(), k.type, k.type || '-' || (n % $3), n / $3 + 1,
           CASE WHEN n % 500 = 7 AND k.type = 'Loan' THEN 'Loan.WrittenOff'
                ELSE k.type || '.' || (k.events)[((n / $3) % cardinality(k.events))::int + 1] END,
           jsonb_build_object('amount', 1000 + (g * 7919) % 250000, 'currency', 'EUR',
               'customer_id', 'c-' || lpad((g % 50000)::text, 8, '0'), 'status', 'open',
               'note', 'recorded by the console benchmark', 'lines', g % 7),
           jsonb_build_object('actor', 'bench', 'correlation_id', 'corr-' || g,
               'source', 'core'),
           t.at, t.at
      FROM generate_series($1::bigint, $2::bigint) g
     CROSS JOIN LATERAL (SELECT g - 1 AS n) i
     CROSS JOIN LATERAL (
        SELECT CASE WHEN (n % $3) % 10 < 5 THEN 'Order'
                    WHEN (n % $3) % 10 < 8 THEN 'Loan' ELSE 'Customer' END AS type,
               CASE WHEN (n % $3) % 10 < 5
                    THEN ARRAY['Placed', 'ItemAdded', 'ItemAdded', 'Paid', 'Shipped']
                    WHEN (n % $3) % 10 < 8 THEN ARRAY['Opened', 'StatusChanged', 'Funded', 'Repaid']
                    ELSE ARRAY['Registered', 'AddressChanged', 'EmailChanged'] END AS events) k
     CROSS JOIN LATERAL (
        SELECT s + n * ((now() - s) / $4::bigint) AS at
          FROM (SELECT date_trunc('month', now()) - make_interval(months => $5::bigint::int) AS s) b) t";

/// Raises `$2` pending events over existing aggregates in one `raise_events` call (batch `$1`),
/// all of a type the history does not have.
const RAISE_PENDING: &str = "SELECT count(*) FROM domain_events.raise_events((
    SELECT jsonb_agg(jsonb_build_object(
        'aggregate_type', 'Order', 'aggregate_id', 'Order-' || ((($1::int * $2::int + i) * 10) % $3::int),
        'event_type', 'Order.Returned',
        'payload', jsonb_build_object('amount', i, 'currency', 'EUR', 'lines', 1),
        'metadata', jsonb_build_object('actor', 'bench')) ORDER BY i)
    FROM generate_series(1, $2::int) i))";

/// One measure: a name and the request paths it takes turns with.
struct Measure {
    name: &'static str,
    target_ms: Option<f64>,
    paths: Vec<String>,
    samples: Vec<Duration>,
}

/// Runs `bench console`.
pub async fn run(a: ConsoleArgs) -> anyhow::Result<()> {
    if a.events < 1 || a.aggregates < 1 || a.months < 1 || a.pending < 1 || a.requests == 0 {
        bail!("events, aggregates, months, pending and requests must be positive");
    }
    let db = if a.reuse_database {
        connect(&dsn_for(&a.cluster.dsn, DATABASE))
            .await
            .context("--reuse-database: keep one first with --keep-database")?
    } else {
        let db = fresh_database(&a.cluster.dsn, DATABASE).await?;
        let loading = Instant::now();
        load(&a, &db).await?;
        eprintln!(
            "bench console: loaded in {:.0} s",
            loading.elapsed().as_secs_f64()
        );
        db
    };
    let result = measure(&a, &db).await;
    drop(db);
    let admin = connect(&a.cluster.dsn).await?;
    if !a.keep_database && !a.reuse_database {
        drop_database(&a.cluster.dsn, DATABASE).await?;
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {ROLE}"))
            .await
            .context("drop the console role")?;
    }
    result
}

async fn measure(a: &ConsoleArgs, db: &Client) -> anyhow::Result<()> {
    let partitions: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'domain_events.event'::regclass",
            &[],
        )
        .await?
        .get(0);
    let shares = db
        .query_one(
            "SELECT avg((event_type = $1)::int)::float8, avg((event_type = $2)::int)::float8,
                    avg((event_type = $3)::int)::float8
               FROM domain_events.event",
            &[&COMMON_TYPE, &RARE_TYPE, &NEW_TYPE],
        )
        .await?;
    let (common, rare, new): (f64, f64, f64) = (shares.get(0), shares.get(1), shares.get(2));
    eprintln!(
        "bench console: {} events over {} aggregates in {partitions} partitions ({COMMON_TYPE} {:.1}%, \
         {RARE_TYPE} {:.2}%, {NEW_TYPE} {:.2}%), {} pending",
        a.events + a.pending,
        a.aggregates,
        common * 100.0,
        rare * 100.0,
        new * 100.0,
        a.pending,
    );

    let port = serve(a, db).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .context("HTTP client")?;
    let base = format!("http://127.0.0.1:{port}");

    let middle: i64 = a.events / 2;
    let mut measures = vec![
        Measure {
            name: "page of 100 events, no filter (baseline)",
            target_ms: None,
            paths: vec!["/api/events?limit=100".into()],
            samples: Vec::new(),
        },
        Measure {
            name: "page of 100 events of a common type",
            target_ms: Some(20.0),
            paths: vec![format!("/api/events?event_type={COMMON_TYPE}&limit=100")],
            samples: Vec::new(),
        },
        Measure {
            name: "the same, from the middle of the history",
            target_ms: Some(20.0),
            paths: vec![format!(
                "/api/events?event_type={COMMON_TYPE}&after_position={middle}&limit=100"
            )],
            samples: Vec::new(),
        },
        Measure {
            name: "page of 100 events of a rare type",
            target_ms: Some(20.0),
            paths: vec![format!("/api/events?event_type={RARE_TYPE}&limit=100")],
            samples: Vec::new(),
        },
        Measure {
            name: "the same, from the middle of the history",
            target_ms: Some(20.0),
            paths: vec![format!(
                "/api/events?event_type={RARE_TYPE}&after_position={middle}&limit=100"
            )],
            samples: Vec::new(),
        },
        Measure {
            name: "page of 100 events of a type new this month",
            target_ms: Some(20.0),
            paths: vec![format!("/api/events?event_type={NEW_TYPE}&limit=100")],
            samples: Vec::new(),
        },
        Measure {
            name: "one aggregate's history (a different one each time)",
            target_ms: Some(20.0),
            // Aggregates spread over the id space, deterministic: every run asks for the same.
            paths: (0..97)
                .map(|k| {
                    let n = (k * 7919 + 13) % a.aggregates;
                    let t = match n % 10 {
                        0..=4 => "Order",
                        5..=7 => "Loan",
                        _ => "Customer",
                    };
                    format!("/api/aggregates/{t}/{t}-{n}")
                })
                .collect(),
            samples: Vec::new(),
        },
        Measure {
            name: "outbox pending, first page of 100",
            target_ms: Some(50.0),
            paths: vec![format!(
                "/api/subscriptions/{SUBSCRIPTION}/outbox?status=pending"
            )],
            samples: Vec::new(),
        },
    ];

    // Every answer is checked once: a full page (or a whole history) of the right kind.
    for m in &measures {
        check(&http, &base, &m.paths[0], m.name).await?;
    }
    let count = measures.len();
    for i in 0..a.warmup + a.requests {
        for k in 0..count {
            let m = &mut measures[(i + k) % count];
            let path = &m.paths[i % m.paths.len()];
            let started = Instant::now();
            let response = http
                .get(format!("{base}{path}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .with_context(|| format!("GET {path}"))?;
            let status = response.status();
            let body = response.bytes().await.context("response body")?;
            let took = started.elapsed();
            if !status.is_success() {
                bail!("GET {path}: {status} {}", String::from_utf8_lossy(&body));
            }
            if i >= a.warmup {
                m.samples.push(took);
            }
        }
    }
    report(a, db, &mut measures).await
}

/// Stores the history, moves it into monthly partitions, adds the stream heads, the
/// subscription with its pending events, a few dead letters and the console's role.
async fn load(a: &ConsoleArgs, db: &Client) -> anyhow::Result<()> {
    const CHUNK: i64 = 100_000;
    let mut first = 1;
    while first <= a.events {
        let last = (first + CHUNK - 1).min(a.events);
        db.execute(
            STORE_HISTORY,
            &[&first, &last, &a.aggregates, &a.events, &a.months],
        )
        .await
        .context("store the history")?;
        first = last + 1;
    }
    // The rows went into the default partition; maintain() creates the monthly partitions and
    // moves them there, as it does for rows stored before their partition existed.
    db.batch_execute(
        "SELECT count(*) FROM domain_events.maintain();
         SELECT setval('domain_events.event_position_seq', (SELECT max(position) FROM domain_events.event));
         INSERT INTO domain_events.aggregate (aggregate_type, aggregate_id, version)
         SELECT aggregate_type, aggregate_id, max(aggregate_version)
           FROM domain_events.event GROUP BY 1, 2;",
    )
    .await
    .context("partition the history")?;
    // The subscription has handled everything stored so far: what follows is pending.
    db.execute(
        "INSERT INTO domain_events.subscription (name, mode, position, delivered_snapshot)
         VALUES ($1, 'replication', (SELECT max(position) FROM domain_events.event),
                 pg_current_snapshot())",
        &[&SUBSCRIPTION],
    )
    .await
    .context("create the subscription")?;
    // Dead letters of that subscription, among the handled events.
    db.execute(
        "INSERT INTO domain_events.dead_letter (subscription, handler, event_id, position, error, attempts)
         SELECT $1, 'billing', e.id, e.position, 'connection refused', 5
           FROM domain_events.event e
          WHERE e.position % ($2::bigint / 25) = 3",
        &[&SUBSCRIPTION, &a.events],
    )
    .await
    .context("store dead letters")?;
    const BATCH: i32 = 1000;
    let batches = (a.pending + i64::from(BATCH) - 1) / i64::from(BATCH);
    for b in 0..batches {
        let size = BATCH.min(i32::try_from(a.pending - b * i64::from(BATCH))?);
        db.query_one(RAISE_PENDING, &[&(b as i32), &size, &(a.aggregates as i32)])
            .await
            .context("raise the pending events")?;
    }
    // One statement each: VACUUM refuses to run in the transaction of a multi-statement string.
    for sql in [
        "VACUUM (ANALYZE) domain_events.event".to_string(),
        "ANALYZE domain_events.dead_letter".to_string(),
        format!("DROP ROLE IF EXISTS {ROLE}"),
        format!("CREATE ROLE {ROLE} LOGIN"),
        format!("GRANT domain_events_console TO {ROLE}"),
    ] {
        db.batch_execute(&sql)
            .await
            .with_context(|| format!("bench console: {sql}"))?;
    }
    Ok(())
}

/// Serves the console on a free local port, as the listener's admin server mounts it. Its role
/// gets a new password each run (the cluster may ask other roles than the superuser for one).
async fn serve(a: &ConsoleArgs, db: &Client) -> anyhow::Result<u16> {
    let password = uuid::Uuid::new_v4().simple().to_string();
    db.batch_execute(&format!("ALTER ROLE {ROLE} PASSWORD '{password}'"))
        .await
        .context("the console role's password")?;
    let mut config = listener::config::Config::default();
    config.database = listener::config::DatabaseConfig {
        host: param(&a.cluster.dsn, "host", "127.0.0.1"),
        port: param(&a.cluster.dsn, "port", "5432")
            .parse()
            .context("port")?,
        user: ROLE.into(),
        dbname: DATABASE.into(),
        ..Default::default()
    };
    config.console = listener::config::ConsoleConfig {
        enabled: true,
        user: Some(ROLE.into()),
        password_env: Some("BENCH_CONSOLE_PASSWORD".into()),
        developer_token_env: Some("BENCH_CONSOLE_DEVELOPER".into()),
        ..Default::default()
    };
    let router = listener::console::router(&config, |name| match name {
        "BENCH_CONSOLE_DEVELOPER" => Some(TOKEN.to_string()),
        "BENCH_CONSOLE_PASSWORD" => Some(password.clone()),
        _ => None,
    })
    .context("console router")?
    .context("console enabled")?;
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = socket.local_addr()?.port();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(socket, router).await {
            eprintln!("bench console: server error: {e}");
        }
    });
    Ok(port)
}

/// One request of a measure, checked: 200 and a JSON page that is full (or a whole history).
async fn check(http: &reqwest::Client, base: &str, path: &str, name: &str) -> anyhow::Result<()> {
    let response = http
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .with_context(|| format!("GET {path}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("JSON body")?;
    let items = body["items"].as_array().map_or(0, Vec::len);
    if !status.is_success() || items == 0 {
        bail!("{name}: GET {path} answered {status} with {items} items: {body}");
    }
    Ok(())
}

async fn report(a: &ConsoleArgs, db: &Client, measures: &mut [Measure]) -> anyhow::Result<()> {
    let server: String = db.query_one("SHOW server_version", &[]).await?.get(0);
    let settings: String = db
        .query_one(
            "SELECT format('shared_buffers=%s, work_mem=%s, random_page_cost=%s',
                           current_setting('shared_buffers'), current_setting('work_mem'),
                           current_setting('random_page_cost'))",
            &[],
        )
        .await?
        .get(0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!("pg_domain_events console benchmark: PostgreSQL {server}, {cores} cores, {settings}");
    println!(
        "{} stored events over {} aggregates and {} months, {} pending for one subscription; \
         {} requests per measure after {} warm-up, taking turns; keep-alive HTTP on localhost, \
         request sent to last byte of the body",
        a.events + a.pending,
        a.aggregates,
        a.months,
        a.pending,
        a.requests,
        a.warmup
    );
    println!();
    println!("| measure | p50, ms | p99, ms | max, ms | p99 / baseline p99 | target |");
    println!("|---|---:|---:|---:|---:|---|");
    let mut baseline = None;
    for m in measures.iter_mut() {
        m.samples.sort();
        let (p50, p99) = (quantile_ms(&m.samples, 0.50), quantile_ms(&m.samples, 0.99));
        let max = m.samples.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let base = *baseline.get_or_insert(p99);
        let target = m.target_ms.map_or(String::new(), |t| {
            format!(
                "p99 <= {t:.0} ms ({})",
                if p99 <= t { "met" } else { "MISSED" }
            )
        });
        println!(
            "| {} | {p50:.2} | {p99:.2} | {max:.2} | {:.2}x | {target} |",
            m.name,
            p99 / base
        );
    }
    Ok(())
}
