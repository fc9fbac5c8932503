//! Helpers for the NATS handler suite (`tests/tests/nats.rs`): a nats-server of a test's own
//! (JetStream on, its store in a temporary directory) on a free loopback port, which a test can
//! kill and restart on the same port, and reading a stream back.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use listener::config::HandlerConfig;
use listener::sink::NatsConfig;
use serde_json::Value;

use crate::cluster_support::free_port;
use crate::sink_support::handler;

/// The server binary: `PGDE_NATS_SERVER`, else `nats-server` on the `PATH`, else Debian's.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PGDE_NATS_SERVER") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|p| p.is_file())
        })
        .or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()))
        .unwrap_or_else(|| panic!("the NATS tests need nats-server: run scripts/setup.sh"))
}

/// A nats-server with JetStream, on a loopback port of its own; killed on drop, its store and
/// log removed.
pub struct NatsServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl NatsServer {
    /// Starts a server on a free port, with an empty JetStream store, and waits until it
    /// answers.
    pub async fn start() -> NatsServer {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("pgde-nats-{}", &id[..12]));
        std::fs::create_dir_all(&dir).expect("NATS store directory");
        let mut server = NatsServer {
            port: free_port(),
            child: None,
            dir,
        };
        server.spawn().await;
        server
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// What the server logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn spawn(&mut self) {
        let port = self.port.to_string();
        let store = self.dir.join("jetstream");
        // setpriv: the server gets SIGKILL when the test's thread ends, even if the test binary
        // dies without running destructors (a nextest timeout), so no server outlives its test.
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(&store)
            .arg("-l")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("nats-server exited with {status}: {}", self.log_text());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
                && self.answers().await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether a client gets through the handshake. (JetStream is up before the server listens
    /// for clients.)
    async fn answers(&self) -> bool {
        let attempt = async {
            let client = async_nats::connect(self.url()).await.ok()?;
            client.flush().await.ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(5), attempt).await,
            Ok(Some(_))
        )
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the exit: JetStream writes its store out first (a SIGKILL can
    /// lose the last acknowledged messages, which nats-server 2.9 writes to disk a moment
    /// after acknowledging them).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -TERM nats-server failed");
            let _ = child.wait();
        }
    }

    /// Stops the server and starts it again on the same port with the same store: streams and
    /// their messages survive.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// A client of this server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to nats-server")
    }

    /// A JetStream context on this server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// A stream capturing `<prefix>.>`, created: `(jetstream, stream, prefix)`.
    pub async fn own_stream(&self) -> (async_nats::jetstream::Context, String, String) {
        let js = self.jetstream().await;
        let (stream, prefix) = unique_stream();
        create_stream(&js, &stream, &prefix).await;
        (js, stream, prefix)
    }

    /// A `nats` handler publishing to this server's `stream` under
    /// `<prefix>.{aggregate_type}.{event_type}`.
    pub fn handler(
        &self,
        name: &str,
        stream: &str,
        prefix: &str,
        max_attempts: u32,
    ) -> HandlerConfig {
        nats_handler(&self.url(), name, stream, prefix, max_attempts)
    }

    /// The `nats` keys of [`NatsServer::handler`].
    pub fn sink(&self, stream: &str, prefix: &str) -> NatsConfig {
        nats_sink(&self.url(), stream, prefix)
    }
}

/// A `nats` handler publishing to the server at `url`, to `stream` under
/// `<prefix>.{aggregate_type}.{event_type}`, with quick retries.
pub fn nats_handler(
    url: &str,
    name: &str,
    stream: &str,
    prefix: &str,
    max_attempts: u32,
) -> HandlerConfig {
    handler(nats_sink(url, stream, prefix), name, max_attempts)
}

/// The `nats` keys of [`nats_handler`].
pub fn nats_sink(url: &str, stream: &str, prefix: &str) -> NatsConfig {
    NatsConfig {
        servers: Some(vec![url.to_string()]),
        stream: Some(stream.to_string()),
        subject: Some(format!("{prefix}.{{aggregate_type}}.{{event_type}}")),
        timeout_ms: Some(5000),
        ..NatsConfig::default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A stream name and subject prefix: `(T_<hex>, t<hex>)`.
pub fn unique_stream() -> (String, String) {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    (format!("T_{id}"), format!("t{id}"))
}

/// Creates stream `name` capturing `<prefix>.>`.
pub async fn create_stream(js: &async_nats::jetstream::Context, name: &str, prefix: &str) {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{prefix}.>")],
        ..Default::default()
    })
    .await
    .expect("create stream");
}

/// A message stored in a stream.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Stream sequence.
    pub sequence: u64,
    /// Subject.
    pub subject: String,
    /// The `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
    /// The body, parsed.
    pub event: Value,
}

/// Every message of `stream`, by sequence.
pub async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> Vec<Stored> {
    let mut handle = js.get_stream(stream).await.expect("stream exists");
    let state = handle.info().await.expect("stream info").state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = handle.get_raw_message(sequence).await.expect("get message");
        out.push(Stored {
            sequence,
            subject: message.subject.to_string(),
            msg_id: message
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_string()),
            event: serde_json::from_slice(&message.payload).expect("JSON body"),
        });
    }
    out
}

/// Waits until `stream` exists and holds at least `n` messages; panics after `timeout`.
pub async fn wait_stream_count(
    js: &async_nats::jetstream::Context,
    stream: &str,
    n: u64,
    timeout: Duration,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        // Not there yet (or the server is restarting) counts as none.
        let count = match js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        if count >= n {
            return count;
        }
        assert!(
            Instant::now() < deadline,
            "stream {stream} holds {count} messages, not {n}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
