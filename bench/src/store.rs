//! The event-store benchmark: `raise_events` batch throughput and `raise_event` commit latency,
//! next to (b) a plain INSERT of the same rows into an equivalent unpartitioned table and (c)
//! a PL/pgSQL implementation of the same contract (`bench/sql/plpgsql_baseline.sql`).
//!
//! All three write the same logical events, in the same order, to their own tables in one
//! fresh database; the implementations take turns (rotated every round, alternated every
//! single-event commit) so that drift on a shared machine hits them alike.
//!
//! With `--message-db <dir>` (the `database/` directory of the `@eventide/message-db` package,
//! which `scripts/bench.sh` fetches), a peer joins them: message-db's `write_message` in the
//! same database, single messages and batches in one transaction.

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

/// The database every run creates afresh (dropped first if a previous run left it).
const DATABASE: &str = "pgde_bench";

/// Event types of the workload, taken in turn.
pub(crate) const EVENT_TYPES: [&str; 4] = [
    "Loan.Opened",
    "Loan.StatusChanged",
    "Loan.Funded",
    "Loan.Repaid",
];

/// Options of `bench store`.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Timed rounds; the throughput reported is the median over rounds.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Batches per implementation per round.
    #[arg(long, default_value_t = 20)]
    batches_per_round: usize,
    /// Events per batch (one transaction).
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Aggregates per batch: the events of a batch are spread over them.
    #[arg(long, default_value_t = 100)]
    aggregates: usize,
    /// Single-event commits measured per implementation.
    #[arg(long, default_value_t = 5000)]
    commits: usize,
    /// Untimed warm-up: single-event commits per implementation (batches: one round).
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Approximate payload size in bytes of JSON text (the default is a ~210-byte loan-shaped
    /// object; under 40 a bare `{"n": ...}`; above, padded).
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Keep the `pgde_bench` database after the run.
    #[arg(long)]
    keep_database: bool,
    /// The `database/` directory of the `@eventide/message-db` package: adds message-db's
    /// `write_message` as a peer column (`scripts/bench.sh` fetches a pinned, checksummed copy).
    #[arg(long, env = "PGDE_MESSAGE_DB_SQL")]
    message_db: Option<PathBuf>,
}

/// The three implementations compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Impl {
    /// `domain_events.raise_events` / `raise_event`.
    Extension,
    /// A multi-row (or single-row) INSERT into `bench_plain.event`.
    Plain,
    /// `bench_plpgsql.raise_events` / `raise_event`.
    Plpgsql,
    /// message-db's `message_store.write_message`, once per event (a peer, not a baseline).
    MessageDb,
}

const IMPLS: [Impl; 3] = [Impl::Extension, Impl::Plain, Impl::Plpgsql];

/// JSON text sent as a `jsonb` parameter as it is, so that client-side serialisation stays
/// out of the timings and every implementation receives identical bytes.
#[derive(Debug, Clone)]
pub(crate) struct Jsonb(pub(crate) String);

impl ToSql for Jsonb {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_u8(1); // jsonb binary format version
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// One event of the workload.
#[derive(Debug, Clone)]
struct Event {
    aggregate_id: String,
    event_type: &'static str,
    payload: Jsonb,
    metadata: Jsonb,
    /// The version it gets (each implementation writes the same sequence to its own store);
    /// only the plain INSERT sends it, the others compute it.
    version: i64,
    /// `expected_version`, set on the first event of an aggregate in a batch.
    expected: Option<i64>,
    /// The message id message-db's `write_message` takes from the client.
    message_id: String,
}

/// A batch: its events and the `raise_events` argument built from them.
pub(crate) struct Batch {
    events: Vec<Event>,
    /// The `raise_events` argument.
    pub(crate) json: Jsonb,
    /// The same events as the column arrays of message-db's batch statement.
    message_db: MessageDbBatch,
}

/// A batch as arrays, one per `write_message` argument, built before the clock starts.
struct MessageDbBatch {
    ids: Vec<String>,
    streams: Vec<String>,
    types: Vec<&'static str>,
    data: Vec<Jsonb>,
    metadata: Vec<Jsonb>,
    /// message-db's expected version is the stream's last position (0-based, -1 for a new
    /// stream): ours minus one.
    expected: Vec<Option<i64>>,
}

impl MessageDbBatch {
    fn of(events: &[Event]) -> MessageDbBatch {
        MessageDbBatch {
            ids: events.iter().map(|e| e.message_id.clone()).collect(),
            streams: events
                .iter()
                .map(|e| stream_name(&e.aggregate_id))
                .collect(),
            types: events.iter().map(|e| e.event_type).collect(),
            data: events.iter().map(|e| e.payload.clone()).collect(),
            metadata: events.iter().map(|e| e.metadata.clone()).collect(),
            expected: events.iter().map(|e| e.expected.map(|v| v - 1)).collect(),
        }
    }
}

/// message-db's stream of an aggregate: `category-id`.
fn stream_name(aggregate_id: &str) -> String {
    format!("loan-{aggregate_id}")
}

impl Batch {
    /// Events in the batch.
    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }
}

/// Generates the workload: realistic ~200-byte payloads, small metadata, aggregates reused
/// across batches so stream heads are both created and advanced.
pub(crate) struct Workload {
    versions: HashMap<String, i64>,
    aggregate_pool: usize,
    next_event: u64,
    payload_bytes: usize,
    nested: bool,
}

impl Workload {
    pub(crate) fn new(aggregate_pool: usize, payload_bytes: usize) -> Workload {
        Workload {
            versions: HashMap::new(),
            aggregate_pool,
            next_event: 0,
            payload_bytes,
            nested: false,
        }
    }

    /// The same payloads with `rate` and `term_months` moved into a nested `terms` object
    /// (`{"rate": ..., "months": ...}`, about the same size): what `bench contracts` validates.
    pub(crate) fn with_nested_terms(mut self) -> Workload {
        self.nested = true;
        self
    }

    fn aggregate_id(n: usize) -> String {
        // A stable uuid-looking id per aggregate number.
        format!("7f3c{:04x}-5d1e-4a8b-9c2f-{:012x}", n % 0x10000, n)
    }

    fn event(&mut self, aggregate: usize, first_in_batch: bool) -> Event {
        let aggregate_id = Self::aggregate_id(aggregate);
        let version = self.versions.entry(aggregate_id.clone()).or_insert(0);
        let expected = first_in_batch.then_some(*version);
        *version += 1;
        let n = self.next_event;
        self.next_event += 1;
        let event_type = EVENT_TYPES[(n % EVENT_TYPES.len() as u64) as usize];
        let status = ["submitted", "approved", "funded", "repaid"][(n % 4) as usize];
        let mut payload = serde_json::json!({
            "loan_id": aggregate_id,
            "customer_id": format!("c-{:08}", n % 50_000),
            "amount": 1000 + (n * 7919) % 250_000,
            "currency": "EUR",
            "rate": 7.25,
            "term_months": 12 + n % 48,
            "status": status,
            "reason": "automatic decision by the scoring service",
        });
        if self.nested {
            let object = payload.as_object_mut().expect("an object");
            let rate = object.remove("rate").expect("rate");
            let months = object.remove("term_months").expect("term_months");
            object.insert(
                "terms".to_string(),
                serde_json::json!({"rate": rate, "months": months}),
            );
        }
        // Sized to `--payload-bytes`: padded through `note`, or a bare counter when tiny.
        let natural = payload.to_string().len();
        if self.payload_bytes < 40 {
            payload = serde_json::json!({ "n": n });
        } else if self.payload_bytes > natural + 12 {
            payload["note"] = "x".repeat(self.payload_bytes - natural - 12).into();
        }
        let metadata = serde_json::json!({
            "actor": "bench",
            "correlation_id": format!("corr-{n}"),
            "source": "core",
        });
        Event {
            aggregate_id,
            event_type,
            payload: Jsonb(payload.to_string()),
            metadata: Jsonb(metadata.to_string()),
            version: *version,
            expected,
            message_id: uuid::Uuid::now_v7().to_string(),
        }
    }

    /// A batch of `size` events over `aggregates` aggregates, interleaved.
    pub(crate) fn batch(&mut self, index: usize, size: usize, aggregates: usize) -> Batch {
        let first = (index * aggregates) % self.aggregate_pool;
        let mut seen = vec![false; aggregates];
        let events: Vec<Event> = (0..size)
            .map(|i| {
                let slot = i % aggregates;
                let first_in_batch = !std::mem::replace(&mut seen[slot], true);
                self.event((first + slot) % self.aggregate_pool, first_in_batch)
            })
            .collect();
        let items: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                let mut item = serde_json::json!({
                    "aggregate_type": "Loan",
                    "aggregate_id": e.aggregate_id,
                    "event_type": e.event_type,
                    "payload": serde_json::from_str::<serde_json::Value>(&e.payload.0).expect("json"),
                    "metadata": serde_json::from_str::<serde_json::Value>(&e.metadata.0).expect("json"),
                });
                if let Some(expected) = e.expected {
                    item["expected_version"] = expected.into();
                }
                item
            })
            .collect();
        let json = Jsonb(serde_json::Value::Array(items).to_string());
        let message_db = MessageDbBatch::of(&events);
        Batch {
            events,
            json,
            message_db,
        }
    }
}

/// Prepared statements of one implementation.
struct Statements {
    batch: Statement,
    single: Statement,
}

/// The cluster every benchmark runs against, shared by all subcommands.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Connection string of the cluster (a superuser); each run creates its own database on it.
    #[arg(
        long,
        env = "PGDE_BENCH_DSN",
        default_value = "host=127.0.0.1 port=54329 user=postgres dbname=postgres"
    )]
    pub dsn: String,
}

pub(crate) async fn connect(dsn: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await.with_context(|| {
        format!("cannot connect ({dsn}); is the cluster up (scripts/cluster.sh start)?")
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("bench: connection error: {e}");
        }
    });
    Ok(client)
}

/// `dsn` with its database replaced by `dbname`.
pub(crate) fn dsn_for(dsn: &str, dbname: &str) -> String {
    let rest: Vec<&str> = dsn
        .split_whitespace()
        .filter(|kv| !kv.starts_with("dbname="))
        .collect();
    format!("{} dbname={dbname}", rest.join(" "))
}

/// Creates database `dbname` afresh on the cluster (dropping what a previous run left) with
/// the extension installed; returns a connection to it.
pub async fn fresh_database(cluster_dsn: &str, dbname: &str) -> anyhow::Result<Client> {
    let admin = connect(cluster_dsn).await?;
    // Two calls: a multi-statement string runs as one transaction, which DROP DATABASE refuses.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
        .await
        .context("drop the previous bench database")?;
    admin
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .context("create the bench database")?;
    let client = connect(&dsn_for(cluster_dsn, dbname)).await?;
    client
        .batch_execute("CREATE EXTENSION pg_domain_events")
        .await
        .context(
            "CREATE EXTENSION pg_domain_events (install it first: cargo pgrx install --release)",
        )?;
    Ok(client)
}

/// Drops database `dbname` made by [`fresh_database`], after the run.
pub async fn drop_database(cluster_dsn: &str, dbname: &str) -> anyhow::Result<()> {
    connect(cluster_dsn)
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
        .await
        .context("drop the bench database")
}

/// Creates the fresh database `dbname` with the extension and both baselines.
pub(crate) async fn prepare_database(cluster_dsn: &str, dbname: &str) -> anyhow::Result<Client> {
    let client = fresh_database(cluster_dsn, dbname).await?;
    client
        .batch_execute(include_str!("../sql/plain_baseline.sql"))
        .await
        .context("bench/sql/plain_baseline.sql")?;
    client
        .batch_execute(include_str!("../sql/plpgsql_baseline.sql"))
        .await
        .context("bench/sql/plpgsql_baseline.sql")?;
    // Partitions of the current month exist before the clock starts, for both stores.
    client
        .query("SELECT * FROM domain_events.maintain()", &[])
        .await?;
    Ok(client)
}

/// The files of message-db's `install.sh` that make its write path (schema, table, type,
/// functions, indexes), in its order; views and privileges are left out (not written by
/// `write_message`), and so is `pgcrypto` (`gen_random_uuid()` is built in).
const MESSAGE_DB_FILES: [&str; 18] = [
    "schema/message-store.sql",
    "tables/messages.sql",
    "types/message.sql",
    "functions/message-store-version.sql",
    "functions/hash-64.sql",
    "functions/acquire-lock.sql",
    "functions/category.sql",
    "functions/is-category.sql",
    "functions/id.sql",
    "functions/cardinal-id.sql",
    "functions/stream-version.sql",
    "functions/write-message.sql",
    "functions/get-stream-messages.sql",
    "functions/get-category-messages.sql",
    "functions/get-last-stream-message.sql",
    "indexes/messages-id.sql",
    "indexes/messages-stream.sql",
    "indexes/messages-category.sql",
];

/// Installs message-db from its package's `database/` directory into the bench database.
/// Its functions name their objects unqualified, as its clients' `search_path` expects:
/// `message_store` is appended to this session's (every other statement is qualified).
async fn install_message_db(client: &Client, dir: &Path) -> anyhow::Result<()> {
    for file in MESSAGE_DB_FILES {
        let path = dir.join(file);
        let sql = std::fs::read_to_string(&path)
            .with_context(|| format!("message-db: read {}", path.display()))?;
        client
            .batch_execute(&sql)
            .await
            .with_context(|| format!("message-db: {file}"))?;
    }
    client
        .batch_execute("SET search_path = \"$user\", public, message_store")
        .await?;
    Ok(())
}

async fn prepare_statements(
    client: &Client,
    batch_size: usize,
    with_message_db: bool,
) -> anyhow::Result<HashMap<Impl, Statements>> {
    let mut values = String::new();
    for row in 0..batch_size {
        let p = row * 6;
        if row > 0 {
            values.push_str(", ");
        }
        values.push_str(&format!(
            "(${}, ${}, ${}, ${}, ${}, ${})",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            p + 6
        ));
    }
    let plain_columns =
        "INSERT INTO bench_plain.event (aggregate_type, aggregate_id, aggregate_version, event_type, payload, metadata) VALUES ";
    let mut statements = HashMap::new();
    statements.insert(
        Impl::Extension,
        Statements {
            batch: client.prepare("SELECT count(*) FROM domain_events.raise_events($1::jsonb)").await?,
            single: client
                .prepare(
                    "SELECT position FROM domain_events.raise_event($1::text, $2::text, $3::text, $4::jsonb, $5::jsonb)",
                )
                .await?,
        },
    );
    statements.insert(
        Impl::Plain,
        Statements {
            batch: client.prepare(&format!("{plain_columns}{values}")).await?,
            single: client
                .prepare(&format!("{plain_columns}($1, $2, $3, $4, $5, $6)"))
                .await?,
        },
    );
    statements.insert(
        Impl::Plpgsql,
        Statements {
            batch: client.prepare("SELECT count(*) FROM bench_plpgsql.raise_events($1::jsonb)").await?,
            single: client
                .prepare(
                    "SELECT position FROM bench_plpgsql.raise_event($1::text, $2::text, $3::text, $4::jsonb, $5::jsonb)",
                )
                .await?,
        },
    );
    if with_message_db {
        // A batch is one statement calling write_message once per row, in order (what a
        // client does in one round trip); a single event is one autocommitted call.
        statements.insert(
            Impl::MessageDb,
            Statements {
                batch: client
                    .prepare(
                        "SELECT count(message_store.write_message(u.id, u.stream, u.type, u.data, u.metadata, u.expected)) \
                           FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::jsonb[], $5::jsonb[], $6::bigint[]) \
                                AS u(id, stream, type, data, metadata, expected)",
                    )
                    .await?,
                single: client
                    .prepare(
                        "SELECT message_store.write_message($1::varchar, $2::varchar, $3::varchar, $4::jsonb, $5::jsonb)",
                    )
                    .await?,
            },
        );
    }
    Ok(statements)
}

/// Writes one batch in one transaction (a single autocommitted statement).
async fn write_batch(
    client: &Client,
    imp: Impl,
    st: &Statements,
    batch: &Batch,
) -> anyhow::Result<()> {
    match imp {
        Impl::Extension | Impl::Plpgsql => {
            let n: i64 = client.query_one(&st.batch, &[&batch.json]).await?.get(0);
            if n as usize != batch.events.len() {
                bail!("{imp:?} wrote {n} events of {}", batch.events.len());
            }
        }
        Impl::Plain => {
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(batch.events.len() * 6);
            for e in &batch.events {
                params.extend_from_slice(&[
                    &"Loan" as &(dyn ToSql + Sync),
                    &e.aggregate_id,
                    &e.version,
                    &e.event_type,
                    &e.payload,
                    &e.metadata,
                ]);
            }
            let n = client.execute(&st.batch, &params).await?;
            if n as usize != batch.events.len() {
                bail!("plain INSERT wrote {n} rows of {}", batch.events.len());
            }
        }
        Impl::MessageDb => {
            let m = &batch.message_db;
            let n: i64 = client
                .query_one(
                    &st.batch,
                    &[
                        &m.ids,
                        &m.streams,
                        &m.types,
                        &m.data,
                        &m.metadata,
                        &m.expected,
                    ],
                )
                .await?
                .get(0);
            if n as usize != batch.events.len() {
                bail!("message-db wrote {n} messages of {}", batch.events.len());
            }
        }
    }
    Ok(())
}

/// Commits one event (autocommit); returns how long the round trip took.
async fn write_single(
    client: &Client,
    imp: Impl,
    st: &Statements,
    e: &Event,
) -> anyhow::Result<Duration> {
    let stream = stream_name(&e.aggregate_id);
    let started = Instant::now();
    match imp {
        Impl::Extension | Impl::Plpgsql => {
            client
                .query_one(
                    &st.single,
                    &[
                        &"Loan",
                        &e.aggregate_id,
                        &e.event_type,
                        &e.payload,
                        &e.metadata,
                    ],
                )
                .await?;
        }
        Impl::Plain => {
            client
                .execute(
                    &st.single,
                    &[
                        &"Loan",
                        &e.aggregate_id,
                        &e.version,
                        &e.event_type,
                        &e.payload,
                        &e.metadata,
                    ],
                )
                .await?;
        }
        Impl::MessageDb => {
            client
                .query_one(
                    &st.single,
                    &[
                        &e.message_id,
                        &stream,
                        &e.event_type,
                        &e.payload,
                        &e.metadata,
                    ],
                )
                .await?;
        }
    }
    Ok(started.elapsed())
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The `p`-quantile (nearest rank) of sorted durations, in milliseconds.
pub(crate) fn quantile_ms(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

/// Measured figures of one implementation.
#[derive(Debug, Default, Clone)]
struct Figures {
    rounds_eps: Vec<f64>,
    median_eps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `bench store`.
pub async fn run(args: StoreArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.batches_per_round == 0 || args.batch_size == 0 || args.commits == 0
    {
        bail!("rounds, batches-per-round, batch-size and commits must be positive");
    }
    if args.batch_size * 6 > usize::from(u16::MAX) {
        bail!(
            "batch-size is at most 10922: the plain INSERT binds 6 parameters a row, 65535 at most"
        );
    }
    if args.aggregates == 0 || args.aggregates > args.batch_size {
        bail!("aggregates must be between 1 and the batch size");
    }
    let client = prepare_database(&args.cluster.dsn, DATABASE).await?;
    if let Some(dir) = &args.message_db {
        install_message_db(&client, dir).await?;
    }
    let server: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    let settings: String = client
        .query_one(
            "SELECT format('fsync=%s, synchronous_commit=%s, shared_buffers=%s, wal_level=%s',
                           current_setting('fsync'), current_setting('synchronous_commit'),
                           current_setting('shared_buffers'), current_setting('wal_level'))",
            &[],
        )
        .await?
        .get(0);
    let statements =
        prepare_statements(&client, args.batch_size, args.message_db.is_some()).await?;
    // The implementations measured: the three stores, and message-db when it was installed.
    let impls: Vec<Impl> = IMPLS
        .into_iter()
        .chain(args.message_db.as_ref().map(|_| Impl::MessageDb))
        .collect();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);

    // Every implementation writes the same batches, each to its own store, so they share one
    // workload: the versions in it are what each store will hand out.
    let pool = args.aggregates * 20;
    let mut workload = Workload::new(pool, args.payload_bytes);
    let batch_count = (args.rounds + 1) * args.batches_per_round;
    let batches: Vec<Batch> = (0..batch_count)
        .map(|i| workload.batch(i, args.batch_size, args.aggregates))
        .collect();
    let payload_bytes = batches[0]
        .events
        .iter()
        .map(|e| e.payload.0.len())
        .sum::<usize>()
        / batches[0].events.len();

    eprintln!(
        "bench store: {} rounds x {} batches x {} events over {} aggregates (~{payload_bytes}-byte payloads), {} single-event commits each",
        args.rounds, args.batches_per_round, args.batch_size, args.aggregates, args.commits
    );

    // Batch throughput. Round 0 is the warm-up.
    let mut figures: HashMap<Impl, Figures> =
        impls.iter().map(|i| (*i, Figures::default())).collect();
    client.batch_execute("CHECKPOINT").await?;
    for round in 0..=args.rounds {
        let batches =
            &batches[round * args.batches_per_round..(round + 1) * args.batches_per_round];
        for k in 0..impls.len() {
            let imp = impls[(round + k) % impls.len()];
            let started = Instant::now();
            for batch in batches {
                write_batch(&client, imp, &statements[&imp], batch)
                    .await
                    .with_context(|| format!("{imp:?} batch"))?;
            }
            let eps = (batches.len() * args.batch_size) as f64 / started.elapsed().as_secs_f64();
            if round > 0 {
                figures.get_mut(&imp).expect("impl").rounds_eps.push(eps);
                eprintln!("  round {round}: {imp:?} {eps:.0} events/s");
            }
        }
    }

    // Single-event commit latency, alternating implementations every commit.
    client.batch_execute("CHECKPOINT").await?;
    let mut latencies: HashMap<Impl, Vec<Duration>> = impls
        .iter()
        .map(|i| (*i, Vec::with_capacity(args.commits)))
        .collect();
    for i in 0..args.warmup + args.commits {
        let event = workload.event(i % pool, false);
        for k in 0..impls.len() {
            let imp = impls[(i + k) % impls.len()];
            let took = write_single(&client, imp, &statements[&imp], &event)
                .await
                .with_context(|| format!("{imp:?} single event"))?;
            if i >= args.warmup {
                latencies.get_mut(&imp).expect("impl").push(took);
            }
        }
    }
    for (imp, mut samples) in latencies {
        samples.sort();
        let f = figures.get_mut(&imp).expect("impl");
        f.p50_ms = quantile_ms(&samples, 0.50);
        f.p99_ms = quantile_ms(&samples, 0.99);
        f.median_eps = median(&mut f.rounds_eps.clone());
    }
    verify_stores(&client).await?;
    if args.message_db.is_some() {
        verify_message_db(&client).await?;
    }

    print_report(&args, &figures, &server, &settings, cores, payload_bytes);
    if args.message_db.is_some() {
        let version: String = client
            .query_one("SELECT message_store.message_store_version()::text", &[])
            .await?
            .get(0);
        println!("message-db schema {version} (message_store_version()), in the same database, stored the same events");
    }

    drop(client);
    if !args.keep_database {
        drop_database(&args.cluster.dsn, DATABASE).await?;
    }
    Ok(())
}

/// All three stores hold the same number of events with the same per-aggregate versions: the
/// comparison was of equal work.
async fn verify_stores(client: &Client) -> anyhow::Result<()> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM domain_events.event),
                    (SELECT count(*) FROM bench_plain.event),
                    (SELECT count(*) FROM bench_plpgsql.event),
                    (SELECT md5(string_agg(aggregate_id || ':' || aggregate_version, ',' ORDER BY aggregate_id, aggregate_version)) FROM domain_events.event),
                    (SELECT md5(string_agg(aggregate_id || ':' || aggregate_version, ',' ORDER BY aggregate_id, aggregate_version)) FROM bench_plain.event),
                    (SELECT md5(string_agg(aggregate_id || ':' || aggregate_version, ',' ORDER BY aggregate_id, aggregate_version)) FROM bench_plpgsql.event)",
            &[],
        )
        .await?;
    let counts: [i64; 3] = [row.get(0), row.get(1), row.get(2)];
    let digests: [String; 3] = [row.get(3), row.get(4), row.get(5)];
    if counts[0] != counts[1]
        || counts[1] != counts[2]
        || digests[0] != digests[1]
        || digests[1] != digests[2]
    {
        bail!("the stores differ after the run: counts {counts:?}, version digests {digests:?}");
    }
    Ok(())
}

/// message-db holds the same messages as the event store: the same count, and each stream's
/// positions are the aggregate's versions minus one.
async fn verify_message_db(client: &Client) -> anyhow::Result<()> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM domain_events.event),
                    (SELECT count(*) FROM message_store.messages),
                    (SELECT md5(string_agg(aggregate_id || ':' || aggregate_version, ',' ORDER BY aggregate_id, aggregate_version)) FROM domain_events.event),
                    (SELECT md5(string_agg(substr(stream_name, 6) || ':' || (position + 1), ',' ORDER BY substr(stream_name, 6), position)) FROM message_store.messages)",
            &[],
        )
        .await?;
    let counts: [i64; 2] = [row.get(0), row.get(1)];
    let digests: [String; 2] = [row.get(2), row.get(3)];
    if counts[0] != counts[1] || digests[0] != digests[1] {
        bail!("message-db differs from the event store: counts {counts:?}, version digests {digests:?}");
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn print_report(
    args: &StoreArgs,
    f: &HashMap<Impl, Figures>,
    server: &str,
    settings: &str,
    cores: usize,
    payload_bytes: usize,
) {
    let (ext, plain, pl) = (&f[&Impl::Extension], &f[&Impl::Plain], &f[&Impl::Plpgsql]);
    // The peer's column and ratio, or "n/a" when message-db was not installed.
    let peer = f.get(&Impl::MessageDb);
    let peer_cell = |value: fn(&Figures) -> f64, digits: usize| {
        peer.map_or("n/a".to_string(), |m| format!("{:.digits$}", value(m)))
    };
    let peer_ratio = |value: fn(&Figures) -> f64| {
        peer.map_or("n/a".to_string(), |m| {
            format!("{:.2}x", value(ext) / value(m))
        })
    };
    let vs_plain = ext.median_eps / plain.median_eps;
    let vs_pl = ext.median_eps / pl.median_eps;
    let p50 = ext.p50_ms / plain.p50_ms;
    let p99 = ext.p99_ms / plain.p99_ms;
    println!();
    println!("pg_domain_events store benchmark: PostgreSQL {server}, {cores} cores, {settings}");
    println!(
        "batches of {} events over {} aggregates (~{payload_bytes}-byte payloads), 1 transaction each; \
         median of {} rounds x {} batches; {} single-event autocommits each after {} warm-up",
        args.batch_size, args.aggregates, args.rounds, args.batches_per_round, args.commits, args.warmup
    );
    println!();
    println!("| measure | pg_domain_events | plain INSERT | PL/pgSQL | message-db | vs plain INSERT | vs PL/pgSQL | vs message-db | target |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    println!(
        "| batch throughput, events/s | {:.0} | {:.0} | {:.0} | {} | {vs_plain:.2}x | {vs_pl:.2}x | {} | >= 0.7x plain ({}), >= 2x PL/pgSQL ({}) |",
        ext.median_eps,
        plain.median_eps,
        pl.median_eps,
        peer_cell(|m| m.median_eps, 0),
        peer_ratio(|m| m.median_eps),
        verdict(vs_plain >= 0.7),
        verdict(vs_pl >= 2.0)
    );
    println!(
        "| commit latency p50, ms | {:.3} | {:.3} | {:.3} | {} | {p50:.2}x | {:.2}x | {} | <= 1.2x plain ({}) |",
        ext.p50_ms,
        plain.p50_ms,
        pl.p50_ms,
        peer_cell(|m| m.p50_ms, 3),
        ext.p50_ms / pl.p50_ms,
        peer_ratio(|m| m.p50_ms),
        verdict(p50 <= 1.2)
    );
    println!(
        "| commit latency p99, ms | {:.3} | {:.3} | {:.3} | {} | {p99:.2}x | {:.2}x | {} | <= 1.2x plain ({}) |",
        ext.p99_ms,
        plain.p99_ms,
        pl.p99_ms,
        peer_cell(|m| m.p99_ms, 3),
        ext.p99_ms / pl.p99_ms,
        peer_ratio(|m| m.p99_ms),
        verdict(p99 <= 1.2)
    );
    println!();
    println!(
        "throughput per round (events/s): pg_domain_events {:?}, plain {:?}, PL/pgSQL {:?}",
        rounded(&ext.rounds_eps),
        rounded(&plain.rounds_eps),
        rounded(&pl.rounds_eps)
    );
    match peer {
        Some(m) => println!(
            "message-db (write_message) per round: {:?}",
            rounded(&m.rounds_eps)
        ),
        None => {
            println!("message-db: not measured (pass --message-db, or run scripts/bench.sh store)")
        }
    }
}

fn rounded(values: &[f64]) -> Vec<u64> {
    values.iter().map(|v| v.round() as u64).collect()
}
