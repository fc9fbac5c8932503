//! Helpers for the Kafka handler suite (`tests/tests/kafka.rs`): a real Kafka-protocol broker
//! (tansu, in-memory storage) of a test's own on a free loopback port, which a test can stop,
//! freeze and restart, and a reader of every record of a topic through the Kafka protocol.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use listener::config::{HandlerConfig, HandlerKind};
use rskafka::client::partition::{OffsetAt, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use serde_json::Value;

use crate::cluster_support::free_port;
use crate::sink_support::handler;

/// The broker binary: `PGDE_TANSU`, else `tansu` on the `PATH`, else `~/.cargo/bin/tansu`.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PGDE_TANSU") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tansu"))
            .find(|p| p.is_file())
    });
    let found = on_path.or_else(|| {
        std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cargo/bin/tansu"))
            .filter(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the Kafka tests need the tansu broker: run `scripts/setup.sh --kafka` \
             (cargo install tansu --version 0.6.0 --locked --features dynostore)"
        )
    })
}

/// A tansu broker with in-memory storage, on a loopback port of its own; killed on drop.
pub struct Broker {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Broker {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub async fn start() -> Broker {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut broker = Broker {
            port: free_port(),
            child: None,
            log: std::env::temp_dir().join(format!("pgde-tansu-{}.log", &id[..12])),
        };
        broker.spawn().await;
        broker
    }

    /// `127.0.0.1:<port>`, as a listener's `brokers` entry.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("broker log file");
        let child = Command::new(tansu_binary())
            .args(["broker", "--silent", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .env_remove("STORAGE_ENGINE")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("broker log file"))
            .stderr(log)
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.address())
            .await
            .is_err()
        {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("tansu exited with {status}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not start: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the broker logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the broker and everything it stored (in memory) are gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new, empty broker on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("broker running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGSTOP: connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`Broker::freeze`].
    pub fn thaw(&self) {
        self.signal("CONT");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen broker does not die of SIGKILL until it is continued.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Key, as text.
    pub key: Option<String>,
    /// Headers, as text.
    pub headers: BTreeMap<String, String>,
    /// Timestamp.
    pub timestamp: chrono::DateTime<chrono::Utc>,
    /// The value, parsed.
    pub event: Value,
}

impl Fetched {
    /// The `event_id` header.
    pub fn event_id(&self) -> &str {
        self.headers
            .get("event_id")
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// A client of the broker at `address`.
pub async fn client(address: &str) -> Client {
    ClientBuilder::new(vec![address.to_string()])
        .client_id("pgde-test-reader")
        .build()
        .await
        .expect("connect to the broker")
}

/// Topic names and their partition counts.
pub async fn topics(client: &Client) -> HashMap<String, usize> {
    client
        .list_topics()
        .await
        .expect("list topics")
        .into_iter()
        .map(|t| (t.name, t.partitions.len()))
        .collect()
}

/// Every record of `topic`, partition by partition, in offset order; empty when the topic does
/// not exist. Reads until a fetch returns nothing rather than up to the high watermark, which
/// tansu 0.6 can report too low after concurrent produces to several partitions of a topic.
pub async fn read_topic(client: &Client, topic: &str) -> Vec<Fetched> {
    let Some(&partitions) = topics(client).await.get(topic) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for partition in 0..partitions as i32 {
        let reader = client
            .partition_client(topic.to_string(), partition, UnknownTopicHandling::Retry)
            .await
            .expect("partition client");
        let mut offset = reader
            .get_offset(OffsetAt::Earliest)
            .await
            .expect("earliest offset");
        loop {
            // A short wait: at the end of the log the broker holds the fetch for this long.
            let (records, _high_watermark) = reader
                .fetch_records(offset, 1..8_000_000, 10)
                .await
                .expect("fetch records");
            if records.is_empty() {
                break;
            }
            for r in records {
                offset = r.offset + 1;
                let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8");
                out.push(Fetched {
                    partition,
                    offset: r.offset,
                    key: r.record.key.map(text),
                    headers: r
                        .record
                        .headers
                        .into_iter()
                        .map(|(k, v)| (k, text(v)))
                        .collect(),
                    timestamp: r.record.timestamp,
                    event: serde_json::from_slice(r.record.value.as_deref().unwrap_or(b"null"))
                        .expect("JSON value"),
                });
            }
        }
    }
    out
}

/// A lower bound of the records stored in the topics in `names` (the sum of their partitions'
/// high watermarks, see [`read_topic`]), without reading them; a topic that does not exist
/// counts 0.
pub async fn count_records(client: &Client, names: &[String]) -> i64 {
    let existing = topics(client).await;
    let mut total = 0;
    for name in names {
        let Some(&partitions) = existing.get(name) else {
            continue;
        };
        for partition in 0..partitions as i32 {
            let reader = client
                .partition_client(name.to_string(), partition, UnknownTopicHandling::Retry)
                .await
                .expect("partition client");
            total += reader
                .get_offset(OffsetAt::Latest)
                .await
                .expect("latest offset");
        }
    }
    total
}

/// Waits until the topics in `names` hold at least `n` records together by
/// [`count_records`]; panics after `timeout`.
pub async fn wait_count(client: &Client, names: &[String], n: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let count = count_records(client, names).await;
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{names:?} hold {count} records, not {n}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every record of every topic in `names`.
pub async fn read_topics(client: &Client, names: &[String]) -> Vec<Fetched> {
    let mut out = Vec::new();
    for name in names {
        out.extend(read_topic(client, name).await);
    }
    out
}

/// Waits until the topics in `names` hold at least `n` records together; panics after
/// `timeout`. Returns the records.
pub async fn wait_records(
    client: &Client,
    names: &[String],
    n: usize,
    timeout: Duration,
) -> Vec<Fetched> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = read_topics(client, names).await;
        if records.len() >= n {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{names:?} hold {} records, not {n}, after {timeout:?}",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A topic prefix no other test uses: `t<hex>`.
pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A `kafka` handler producing to `<prefix>.{aggregate_type}` on `broker`, topics created with
/// 3 partitions, 2 s timeouts.
pub fn kafka_handler(
    name: &str,
    broker: &Broker,
    prefix: &str,
    max_attempts: u32,
) -> HandlerConfig {
    HandlerConfig {
        brokers: Some(vec![broker.address()]),
        topic: Some(format!("{prefix}.{{aggregate_type}}")),
        partitions: Some(3),
        timeout_ms: Some(2000),
        ..handler(HandlerKind::Kafka, name, max_attempts)
    }
}
