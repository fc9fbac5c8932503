//! Helpers for the listener suites (`tests/tests/listener*.rs`): configurations pointing at a
//! [`TestDb`], an in-process listener with a collecting handler, the `listener` binary as a child
//! process, and slot/publication names unique per test (slots are cluster-wide).

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use listener::config::{Config, HandlerConfig};
use listener::{Event, Filter, Handler, HandlerError, Listener, Registry, RetryPolicy};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::{admin_dsn, connect, TestDb};

/// A value of `admin_dsn()` (`key=value` pairs).
pub fn dsn_param(key: &str) -> Option<String> {
    admin_dsn()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// A slot/publication name no other test uses: `pgde_lt_<prefix>_<random>`.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("pgde_lt_{prefix}_{}", &id[..12])
}

/// A listener configuration for `db` with its own slot and publication `name`, one stdout handler.
pub fn config_for(db: &TestDb, name: &str) -> Config {
    let mut config = Config::default();
    config.database.host = dsn_param("host").unwrap_or_else(|| "127.0.0.1".into());
    config.database.port = dsn_param("port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(54329);
    config.database.user = dsn_param("user").unwrap_or_else(|| "postgres".into());
    config.database.dbname = db.name.clone();
    config.replication.slot = name.to_string();
    config.replication.publication = name.to_string();
    config.replication.ack_interval_ms = 50;
    config.replication.checkpoint_interval_ms = 200;
    config.replication.reconnect_min_backoff_ms = 100;
    config.replication.reconnect_max_backoff_ms = 1000;
    // Suites stop listeners whose handlers fail on purpose: a drain that gives up well within
    // the 30 s the helpers below wait for a stop.
    config.replication.shutdown_timeout_secs = 10;
    config.handlers = vec![HandlerConfig {
        name: None,
        events: vec!["*".into()],
        max_attempts: 3,
        initial_backoff_ms: 10,
        max_backoff_ms: 100,
        on_failure: listener::OnFailure::DeadLetter,
        ..HandlerConfig::new(listener::sink::StdoutConfig::default())
    }];
    config
}

/// Writes `config` as a TOML file for the binary; the file lives as long as the returned guard.
pub fn write_config(config: &Config) -> TempFile {
    let path = std::env::temp_dir().join(format!("pgde-lt-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, toml_of(config)).expect("write listener config");
    TempFile(path)
}

fn toml_of(config: &Config) -> String {
    toml::to_string(config).expect("config serializes to TOML")
}

/// A file removed on drop.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Collects every event it is given, in order.
#[derive(Clone, Default)]
pub struct Collector {
    events: Arc<Mutex<Vec<Event>>>,
}

impl Collector {
    /// A copy of what was received so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("collector lock").clone()
    }

    /// Number of events received so far.
    pub fn len(&self) -> usize {
        self.events.lock().expect("collector lock").len()
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until at least `n` events arrived; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.len() < n {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} events; got {}",
                self.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[async_trait::async_trait]
impl Handler for Collector {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        self.events
            .lock()
            .map_err(|_| HandlerError::definite("collector poisoned"))?
            .push(event.clone());
        Ok(())
    }
}

/// The listener library running on the test's runtime, delivering to a [`Collector`].
pub struct InProcess {
    /// What the handler received.
    pub collector: Collector,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), listener::Error>>>,
}

impl InProcess {
    /// Starts a listener with `config` (its handler list is replaced by one collector for `"*"`).
    pub fn start(config: Config) -> InProcess {
        InProcess::start_with(config, Registry::new())
    }

    /// Starts a listener with `config` delivering to `registry`'s handlers plus, last, a
    /// collector (named `collector`) for `"*"`.
    pub fn start_with(config: Config, mut registry: Registry) -> InProcess {
        let collector = Collector::default();
        registry.register(
            "collector",
            [Filter::All],
            RetryPolicy::default(),
            collector.clone(),
        );
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        // An invalid configuration is the listener's result, as a run's error would be.
        let task = tokio::spawn(async move { Listener::new(config, registry)?.run(token).await });
        InProcess {
            collector,
            cancel,
            task: Some(task),
        }
    }

    /// Cancels (graceful shutdown) and returns the listener's result.
    pub async fn stop(mut self) -> Result<(), listener::Error> {
        self.cancel.cancel();
        let task = self.task.take().expect("listener task");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("listener did not stop within 30 s of cancellation")
            .expect("listener task panicked")
    }
}

impl InProcess {
    /// Waits for the listener to stop by itself with an error (e.g. a definite failure).
    pub async fn stop_after_error(mut self, timeout: Duration) -> listener::Error {
        let task = self.task.take().expect("listener task");
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(Err(err))) => err,
            Ok(Ok(Ok(()))) => panic!("the listener stopped without an error"),
            Ok(Err(join)) => panic!("listener task panicked: {join}"),
            Err(_) => panic!("the listener kept running for {timeout:?} instead of failing"),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Waits until a walsender streams from slot `name` (caught up, state `streaming`).
///
/// Slot existence or `active` is not enough: a slot being created is active while it waits for
/// the transactions running cluster-wide to end, and events committed meanwhile precede its
/// consistent point, so they are (rightly) never delivered.
pub async fn wait_slot_active(client: &Client, name: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let streaming: Option<bool> = client
            .query_opt(
                "SELECT s.active AND r.state = 'streaming' \
                 FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
                 WHERE s.slot_name = $1",
                &[&name],
            )
            .await
            .expect("query pg_replication_slots")
            .and_then(|r| r.get(0));
        if streaming == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot {name} not streaming after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(confirmed_flush_lsn, restart_lsn)` of slot `name` as text.
pub async fn slot_positions(client: &Client, name: &str) -> (String, String) {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("slot exists");
    (row.get(0), row.get(1))
}

/// The server process (walsender) streaming from slot `name`, if any.
pub async fn slot_active_pid(client: &Client, name: &str) -> Option<i32> {
    client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&name],
        )
        .await
        .expect("query pg_replication_slots")
        .and_then(|r| r.get(0))
}

/// The slot's confirmed position once its walsender let go of it (after the listener exited
/// or was killed): its last confirmation. A slot that never confirmed anything fails the test.
pub async fn confirmed_after_exit(client: &Client, slot: &str) -> listener::Lsn {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_one(
                "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("the slot exists");
        if !row.get::<_, bool>(0) {
            return row
                .get::<_, Option<String>>(1)
                .expect("a slot that streamed has a confirmed position")
                .parse()
                .expect("lsn");
        }
        assert!(Instant::now() < deadline, "slot {slot} stayed active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The subscription row's lsn as text, if any.
pub async fn subscription_lsn(client: &Client, name: &str) -> Option<String> {
    client
        .query_opt(
            "SELECT lsn::text FROM domain_events.subscription WHERE name = $1",
            &[&name],
        )
        .await
        .expect("query subscription")
        .and_then(|r| r.get(0))
}

/// Drops slot `name` when dropped (retrying while its walsender is still exiting), so a failed
/// test does not leave a slot retaining WAL on the shared cluster.
pub struct SlotGuard(pub String);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        crate::block_on_cleanup(drop_slot_eventually(self.0.clone()));
    }
}

/// Drops slot `name` once no walsender holds it, reconnecting as needed, for up to 60 s (long
/// enough to outlast a crash recovery of the shared cluster).
async fn drop_slot_eventually(name: String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok((client, conn)) =
            tokio_postgres::connect(&admin_dsn(), tokio_postgres::NoTls).await
        {
            let driver = tokio::spawn(conn);
            while Instant::now() < deadline {
                let _ = client
                    .query_opt(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                         WHERE slot_name = $1 AND NOT active",
                        &[&name],
                    )
                    .await;
                match client
                    .query_opt(
                        "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                        &[&name],
                    )
                    .await
                {
                    Ok(None) => return,
                    Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(_) => break, // connection lost: reconnect
                }
            }
            driver.abort();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Path of the `listener` binary (`PGDE_LISTENER_BIN`, else `<workspace>/target/debug/listener`).
pub fn listener_binary() -> PathBuf {
    let path = std::env::var_os("PGDE_LISTENER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/listener")
        });
    assert!(
        path.exists(),
        "listener binary not found at {}; run `cargo build -p listener` first",
        path.display()
    );
    path
}

/// Runs `listener <args…> --config <config>` to completion (a one-shot subcommand such as
/// `dead-letters list`) and returns its output.
pub fn run_cli(args: &[&str], config: &TempFile) -> std::process::Output {
    Command::new(listener_binary())
        .args(args)
        .arg("--config")
        .arg(&config.0)
        .env_remove("RUST_LOG")
        .env_remove("PGPASSWORD")
        .env_remove("PGDE_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run the listener binary")
}

/// Runs `listener <args…> --config <config>` to completion, asserts that it succeeded (showing
/// its output otherwise), and returns its standard output.
pub fn run_cli_ok(args: &[&str], config: &TempFile) -> String {
    let out = run_cli(args, config);
    assert!(
        out.status.success(),
        "listener {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The `listener` binary running as a child process, stdout and stderr captured to files.
pub struct ListenerProcess {
    child: Child,
    /// The JSON lines of the stdout handler.
    pub stdout_path: PathBuf,
    /// The logs.
    pub stderr_path: PathBuf,
    _files: (TempFile, TempFile),
}

impl ListenerProcess {
    /// Runs `listener run --config <config>` with extra environment variables.
    pub fn spawn(config: &TempFile, env: &[(&str, &str)]) -> ListenerProcess {
        ListenerProcess::spawn_with_stdout(config, env, None)
    }

    /// [`ListenerProcess::spawn`] with standard output going to `stdout` (e.g. a pipe's write
    /// end) instead of [`ListenerProcess::stdout_path`], when given.
    pub fn spawn_with_stdout(
        config: &TempFile,
        env: &[(&str, &str)],
        stdout: Option<Stdio>,
    ) -> ListenerProcess {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let stdout_path = std::env::temp_dir().join(format!("pgde-lt-{id}.out"));
        let stderr_path = std::env::temp_dir().join(format!("pgde-lt-{id}.err"));
        let stdout_file = std::fs::File::create(&stdout_path).expect("stdout file");
        let mut command = Command::new(listener_binary());
        command
            .arg("run")
            .arg("--config")
            .arg(&config.0)
            .env_remove("RUST_LOG")
            .env_remove("PGPASSWORD")
            .env_remove("PGDE_PASSWORD")
            .stdin(Stdio::null())
            .stdout(stdout.unwrap_or_else(|| stdout_file.into()))
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn listener binary");
        ListenerProcess {
            child,
            _files: (TempFile(stdout_path.clone()), TempFile(stderr_path.clone())),
            stdout_path,
            stderr_path,
        }
    }

    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Complete JSON lines written so far (a torn last line, possible after SIGKILL, is skipped).
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.stdout_path).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }

    /// The log output so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// SIGTERM, then waits up to 30 s for a successful exit; panics with the logs otherwise.
    pub async fn stop_ok(&mut self) {
        self.terminate();
        let status = self
            .wait_exit(Duration::from_secs(30))
            .await
            .expect("exits within 30 s of SIGTERM");
        assert!(status.success(), "exit {status}; logs:\n{}", self.stderr());
    }

    /// Waits for exit up to `timeout`; `None` if still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the stdout handler wrote at least `n` lines; panics after `timeout`.
    pub async fn wait_lines(&mut self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if lines.len() >= n {
                return lines;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "listener exited ({status}) after {} lines: {}",
                    lines.len(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} lines; got {}; logs:\n{}",
                lines.len(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ListenerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The ids of every event in the database's event table, as text.
pub async fn stored_event_ids(client: &Client) -> std::collections::HashSet<String> {
    client
        .query("SELECT id::text FROM domain_events.event", &[])
        .await
        .expect("read event ids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Dead letters of `subscription` as `(handler, event_id, position, attempts, error)`, by position
/// then handler.
pub async fn dead_letters(
    client: &Client,
    subscription: &str,
) -> Vec<(String, uuid::Uuid, i64, i32, String)> {
    client
        .query(
            "SELECT handler, event_id, position, attempts, error FROM domain_events.dead_letter \
             WHERE subscription = $1 ORDER BY position, handler",
            &[&subscription],
        )
        .await
        .expect("read dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// Waits until `subscription` has at least `n` dead letters; panics after `timeout`.
pub async fn wait_dead_letters(
    client: &Client,
    subscription: &str,
    n: usize,
    timeout: Duration,
) -> Vec<(String, uuid::Uuid, i64, i32, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let letters = dead_letters(client, subscription).await;
        if letters.len() >= n {
            return letters;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} dead letters; got {letters:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until slot `name` confirmed a position beyond `lsn`; panics after `timeout`.
pub async fn wait_confirmed_past(
    client: &Client,
    name: &str,
    lsn: listener::Lsn,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let (confirmed, _) = slot_positions(client, name).await;
        let confirmed: listener::Lsn = confirmed.parse().expect("lsn");
        if confirmed > lsn {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot {name} confirmed only {confirmed}, not past {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A superuser connection to the cluster's `postgres` database.
pub async fn admin() -> Client {
    connect(&admin_dsn()).await
}

/// Rows in the `payment_schedule` table of the exactly-once SQL handler tests.
pub async fn payment_schedule_rows(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM payment_schedule", &[])
        .await
        .expect("count payment_schedule")
        .get(0)
}

/// Ends a series of kill-and-restart runs of the SQL handler tests: lets the last run go on for a
/// moment (nothing more may be applied), stops it gracefully, and asserts that every loan got
/// exactly one 12-payment schedule and that `expected_rows` rows exist in all.
pub async fn finish_and_assert_schedules_once(
    runs: &mut [ListenerProcess],
    client: &Client,
    expected_rows: i64,
) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = runs.last_mut().expect("at least one run");
    last.stop_ok().await;
    let wrong: Vec<(String, i64)> = client
        .query(
            "SELECT loan_id, count(*) FROM payment_schedule GROUP BY loan_id HAVING count(*) <> 12",
            &[],
        )
        .await
        .expect("schedules per loan")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        wrong.is_empty(),
        "schedules not created exactly once: {wrong:?}"
    );
    assert_eq!(payment_schedule_rows(client).await, expected_rows);
}
