//! Test harness shared by the end-to-end suites under `tests/tests/`.
//!
//! Every test gets a fresh database on the private cluster started by `scripts/cluster.sh`
//! (`PGDE_TEST_DSN`, default `host=127.0.0.1 port=54329 user=postgres`), with
//! `CREATE EXTENSION pg_domain_events` already run, so tests never share state.

use tokio_postgres::{Client, NoTls};

pub mod admin_support;
pub mod browser_support;
pub mod cluster_support;
pub mod console_support;
pub mod kafka_support;
pub mod listener_support;
pub mod nats_support;
pub mod otlp_support;
pub mod prometheus_support;
pub mod sink_support;
pub mod store_support;
pub mod upgrade_support;

/// Connection string of the private cluster's superuser, database `postgres`.
pub fn admin_dsn() -> String {
    std::env::var("PGDE_TEST_DSN")
        .unwrap_or_else(|_| "host=127.0.0.1 port=54329 user=postgres dbname=postgres".to_string())
}

/// `admin_dsn()` with the database replaced by `dbname`.
pub fn dsn_for(dbname: &str) -> String {
    let base: Vec<String> = admin_dsn()
        .split_whitespace()
        .filter(|kv| !kv.starts_with("dbname="))
        .map(str::to_string)
        .collect();
    format!("{} dbname={dbname}", base.join(" "))
}

/// Opens a connection and drives it on a background task.
pub async fn connect(dsn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to the private cluster ({dsn}): {e}; run scripts/cluster.sh start"
            )
        });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A throwaway database with the extension installed.
pub struct TestDb {
    /// Database name (`pgde_t_<uuid>`).
    pub name: String,
    /// Connection string for it, as the superuser.
    pub dsn: String,
    /// A superuser connection to it.
    pub client: Client,
}

impl TestDb {
    /// Creates a fresh database and runs `CREATE EXTENSION pg_domain_events` in it.
    pub async fn new() -> TestDb {
        let db = Self::without_extension().await;
        db.client
            .batch_execute("CREATE EXTENSION pg_domain_events")
            .await
            .expect("CREATE EXTENSION pg_domain_events");
        db
    }

    /// Creates a fresh, empty database (no extension).
    pub async fn without_extension() -> TestDb {
        let name = format!("pgde_t_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&admin_dsn()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        let dsn = dsn_for(&name);
        let client = connect(&dsn).await;
        TestDb { name, dsn, client }
    }

    /// Another superuser connection to the same database.
    pub async fn connect(&self) -> Client {
        connect(&self.dsn).await
    }

    /// Number of rows in `domain_events.event`.
    pub async fn event_count(&self) -> i64 {
        self.client
            .query_one("SELECT count(*) FROM domain_events.event", &[])
            .await
            .expect("count events")
            .get(0)
    }
}

/// Drops the database at the end of the test (forcibly: a test may leave sessions behind), so
/// long local runs do not pile up databases. `PGDE_KEEP_TEST_DBS=1` keeps them for inspection.
/// Best effort: a database still used by a replication slot stays.
impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os("PGDE_KEEP_TEST_DBS").is_some() {
            return;
        }
        let name = self.name.clone();
        block_on_cleanup(async move {
            if let Ok((client, connection)) = tokio_postgres::connect(&admin_dsn(), NoTls).await {
                let driver = tokio::spawn(connection);
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
                drop(client);
                let _ = driver.await;
            }
        });
    }
}

/// Runs `cleanup` to completion from a `Drop` impl, best effort: `drop` cannot await, and the
/// test's runtime may be shutting down, so it runs on a private runtime on a thread of its own.
pub fn block_on_cleanup(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(cleanup);
        }
    })
    .join();
}

/// The SQLSTATE of a failed statement, as its five-character code.
pub fn sqlstate(err: &tokio_postgres::Error) -> String {
    err.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {err}"))
}

/// SplitMix64: a reproducible sequence from a printed seed (the chaos suites), no dependency
/// needed.
pub struct Seeded(pub u64);

impl Seeded {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}
