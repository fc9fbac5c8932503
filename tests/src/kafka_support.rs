//! Helpers for the Kafka handler suite (`tests/tests/kafka.rs`): a real Kafka-protocol broker
//! (tansu, in-memory storage) of a test's own on a free loopback port, which a test can stop,
//! freeze and restart, and a reader of every record of a topic through the Kafka protocol.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use listener::config::HandlerConfig;
use listener::sink::KafkaConfig;
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
    /// The port it advertises to clients in metadata: its own, or a [`TlsFront`]'s.
    pub advertised_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Broker {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub async fn start() -> Broker {
        let mut broker = Broker::with_advertised_port(0);
        broker.advertised_port = broker.port;
        broker.spawn().await;
        broker
    }

    /// A broker not started yet, on a free port, advertising `advertised_port`.
    fn with_advertised_port(advertised_port: u16) -> Broker {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Broker {
            port: free_port(),
            advertised_port,
            child: None,
            log: std::env::temp_dir().join(format!("pgde-tansu-{}.log", &id[..12])),
        }
    }

    /// `127.0.0.1:<port>`, as a listener's `brokers` entry.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("broker log file");
        let child = Command::new(tansu_binary())
            .args(["broker", "--silent", "--storage-engine", "memory://tansu/"])
            .args([
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
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
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
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

/// A client of the broker behind `front`, over TLS with the test CA and client certificate.
pub async fn tls_client(front: &TlsFront, certs: &TestCertificates) -> Client {
    let tls = listener::sink::KafkaTls {
        ca_file: Some(certs.ca.clone()),
        cert_file: Some(certs.client_cert.clone()),
        key_file: Some(certs.client_key.clone()),
    };
    ClientBuilder::new(vec![front.address()])
        .client_id("pgde-test-reader")
        .tls_config(tls.client_config().expect("TLS configuration"))
        .build()
        .await
        .expect("connect to the broker over TLS")
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
    handler(kafka_sink(broker, prefix), name, max_attempts)
}

/// The `kafka` keys of [`kafka_handler`].
pub fn kafka_sink(broker: &Broker, prefix: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: Some(vec![broker.address()]),
        topic: Some(format!("{prefix}.{{aggregate_type}}")),
        partitions: Some(3),
        timeout_ms: Some(2000),
        ..KafkaConfig::default()
    }
}

/// Certificates made for a test: a CA, a server certificate for `127.0.0.1` and `localhost`, and
/// a client certificate, all signed by the CA, written as PEM files that live as long as this.
pub struct TestCertificates {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The client certificate and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    server_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    server_key: Vec<u8>,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    _files: Vec<crate::listener_support::TempFile>,
}

impl TestCertificates {
    /// A fresh CA and certificates.
    pub fn generate() -> TestCertificates {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server params")
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server certificate");
        let client_key = KeyPair::generate().expect("client key");
        let client = CertificateParams::new(vec!["pgde-listener".into()])
            .expect("client params")
            .signed_by(&client_key, &ca, &ca_key)
            .expect("client certificate");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let write = |name: &str, pem: String| {
            let path = std::env::temp_dir().join(format!("pgde-tls-{}-{name}.pem", &id[..12]));
            std::fs::write(&path, pem).expect("write PEM");
            crate::listener_support::TempFile(path)
        };
        let files = vec![
            write("ca", ca.pem()),
            write("client", client.pem()),
            write("client-key", client_key.serialize_pem()),
        ];
        TestCertificates {
            ca: files[0].0.clone(),
            client_cert: files[1].0.clone(),
            client_key: files[2].0.clone(),
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_der(),
            ca_der: ca.der().clone(),
            _files: files,
        }
    }
}

/// A TLS front for a broker: terminates TLS on a loopback port of its own (optionally requiring
/// a client certificate signed by the test CA) and passes the bytes on to the broker, which
/// advertises this front as its address. tansu 0.6 does not terminate TLS itself.
pub struct TlsFront {
    /// The broker behind the front, advertising the front's address.
    pub broker: Broker,
    /// Handshakes that failed, with why.
    pub refused: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    /// Starts a broker behind a TLS front using `certs`; with `require_client_cert`, clients
    /// must present a certificate signed by the test CA.
    pub async fn start(certs: &TestCertificates, require_client_cert: bool) -> TlsFront {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(certs.ca_der.clone()).expect("CA");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = rustls::pki_types::PrivateKeyDer::try_from(certs.server_key.clone())
            .expect("server key");
        let config = builder
            .with_single_cert(certs.server_chain.clone(), key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the TLS front");
        let front = socket.local_addr().expect("front address");
        let mut broker = Broker::with_advertised_port(front.port());
        broker.spawn().await;
        let upstream = format!("127.0.0.1:{}", broker.port);
        let refused = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&refused);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = socket.accept().await {
                let (acceptor, upstream, seen) =
                    (acceptor.clone(), upstream.clone(), Arc::clone(&seen));
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(client).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            seen.lock().unwrap().push(e.to_string());
                            return;
                        }
                    };
                    if let Ok(mut broker) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                    }
                });
            }
        });
        TlsFront {
            broker,
            refused,
            task,
        }
    }

    /// `127.0.0.1:<front port>`, as a listener's `brokers` entry.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.broker.advertised_port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
