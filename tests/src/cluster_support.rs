//! A throwaway PostgreSQL cluster of a test's own (`scripts/cluster.sh` under another name and
//! port), for tests that restart or crash the server: the shared test cluster must stay up for
//! the suites running beside them.

use std::path::PathBuf;
use std::process::Command;

use listener::config::{Config, HandlerConfig};

use crate::connect;

/// A private cluster, destroyed on drop.
pub struct PrivateCluster {
    /// Its `PGDE_CLUSTER_NAME` (the directory under the state dir).
    pub name: String,
    /// Its loopback port.
    pub port: u16,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh")
}

/// A loopback port no one listens on right now.
pub fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    socket.local_addr().expect("local address").port()
}

impl PrivateCluster {
    /// Initialises and starts a cluster named `pgde-<prefix>-<random>` on a free port.
    pub fn start(prefix: &str) -> PrivateCluster {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let cluster = PrivateCluster {
            name: format!("pgde-{prefix}-{}", &id[..8]),
            port: free_port(),
        };
        cluster.run(&["start"]);
        cluster
    }

    fn run(&self, args: &[&str]) {
        let output = Command::new("bash")
            .arg(script())
            .args(args)
            .env("PGDE_CLUSTER_NAME", &self.name)
            .env("PGDE_PORT", self.port.to_string())
            .env_remove("PGDE_PRELOAD")
            .output()
            .expect("run scripts/cluster.sh");
        assert!(
            output.status.success(),
            "cluster.sh {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Stops the server with `mode` (`fast`: clean shutdown; `immediate`: no checkpoint, crash
    /// recovery at the next start) and starts it again.
    pub fn restart(&self, mode: &str) {
        self.run(&["restart", mode]);
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        let output = Command::new("bash")
            .arg(script())
            .arg("state-dir")
            .output()
            .expect("run scripts/cluster.sh state-dir");
        assert!(output.status.success(), "cluster.sh state-dir failed");
        let state = String::from_utf8(output.stdout).expect("UTF-8 path");
        PathBuf::from(state.trim()).join(&self.name).join("data")
    }

    /// Turns TLS on with the PEM certificate (chain) and key given: writes them into the data
    /// directory owned by the cluster's OS user (`postgres`), the key with mode 0600 as the
    /// server demands, sets `ssl = on` and reloads. Replaces earlier files when called again.
    pub async fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data_dir();
        let owner = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .expect("run id");
            assert!(out.status.success(), "no postgres OS user");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        let (uid, gid) = (owner("-u"), owner("-g"));
        for (file, pem, mode) in [
            ("server.crt", cert_pem, 0o644),
            ("server.key", key_pem, 0o600),
        ] {
            let path = data.join(file);
            std::fs::write(&path, pem).expect("write TLS file");
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown TLS file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .expect("chmod TLS file");
        }
        let admin = connect(&self.dsn("postgres")).await;
        // One statement per call: ALTER SYSTEM refuses a transaction block.
        for sql in [
            "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'server.key'",
            "ALTER SYSTEM SET ssl = on",
            "SELECT pg_reload_conf()",
        ] {
            admin.batch_execute(sql).await.expect(sql);
        }
        // The reload is asynchronous: wait until new sessions see it. (Whether TLS sessions
        // really work is for the caller to check, in pg_stat_ssl.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let ssl: String = connect(&self.dsn("postgres"))
                .await
                .query_one("SHOW ssl", &[])
                .await
                .expect("SHOW ssl")
                .get(0);
            if ssl == "on" {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ssl stayed off after the reload; see the server log"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Connection string for `dbname` as the superuser.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// Creates database `dbname` with the extension installed.
    pub async fn create_database(&self, dbname: &str) {
        let admin = connect(&self.dsn("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {dbname}"))
            .await
            .expect("CREATE DATABASE");
        connect(&self.dsn(dbname))
            .await
            .batch_execute("CREATE EXTENSION pg_domain_events")
            .await
            .expect("CREATE EXTENSION");
    }

    /// A listener configuration for `dbname` of this cluster: slot and publication `name`, one
    /// stdout handler, quick acknowledgements and reconnects.
    pub fn listener_config(&self, dbname: &str, name: &str) -> Config {
        let mut config = Config::default();
        config.database.host = "127.0.0.1".into();
        config.database.port = self.port;
        config.database.user = "postgres".into();
        config.database.dbname = dbname.into();
        config.replication.slot = name.into();
        config.replication.publication = name.into();
        config.replication.ack_interval_ms = 50;
        config.replication.checkpoint_interval_ms = 200;
        config.replication.reconnect_min_backoff_ms = 100;
        config.replication.reconnect_max_backoff_ms = 1000;
        config.handlers =
            vec![toml::from_str::<HandlerConfig>("kind = \"stdout\"").expect("stdout handler")];
        config
    }
}

/// Makes a checkpoint invalidate slot `name` (`wal_status = lost`): sets a 1 MB
/// `max_slot_wal_keep_size`, writes and switches WAL segments until it is, and resets the
/// setting. Only for a private cluster: every slot of the cluster that lags behind is
/// invalidated too.
pub async fn invalidate_slot(client: &tokio_postgres::Client, name: &str) {
    invalidate_slot_until(client, name, |slot| {
        slot.is_some_and(|(wal_status, _)| wal_status.as_deref() == Some("lost"))
    })
    .await;
}

/// [`invalidate_slot`], done when `invalidated` says so of the slot's `(wal_status,
/// restart_lsn)` after a checkpoint (`None`: no slot of that name any more) — for a listener
/// that may drop or replace a lost slot before the test looks.
pub async fn invalidate_slot_until(
    client: &tokio_postgres::Client,
    name: &str,
    invalidated: impl Fn(Option<(Option<String>, Option<String>)>) -> bool,
) {
    // One statement per call: ALTER SYSTEM refuses a transaction block.
    client
        .batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await
        .expect("set max_slot_wal_keep_size");
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let mut done = false;
    for _ in 0..30 {
        for statement in [
            "CREATE TABLE IF NOT EXISTS public.filler (pad text); \
             INSERT INTO public.filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            client
                .batch_execute(statement)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        let slot = client
            .query_opt(
                "SELECT wal_status, restart_lsn::text FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&name],
            )
            .await
            .expect("read the slot")
            .map(|row| (row.get(0), row.get(1)));
        done = invalidated(slot);
        if done {
            break;
        }
    }
    assert!(done, "slot {name} was not invalidated");
    // Back to unlimited: a slot made afterwards must not be invalidated by the test's WAL.
    client
        .batch_execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        .await
        .expect("reset max_slot_wal_keep_size");
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("destroy")
            .env("PGDE_CLUSTER_NAME", &self.name)
            .env("PGDE_PORT", self.port.to_string())
            .output();
    }
}

/// A TCP relay on a loopback port to a cluster's port that holds back the first client message
/// containing `START_REPLICATION` until the test says go: the moment between a listener's
/// slot checks and `START_REPLICATION`, made long enough to change the slot in. Bytes pass
/// through unchanged (no TLS: the relay must read the query).
pub struct StartReplicationHold {
    /// The relay's port on 127.0.0.1.
    pub port: u16,
    held: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StartReplicationHold {
    /// Starts relaying to `127.0.0.1:<upstream>`.
    pub async fn start(upstream: u16) -> StartReplicationHold {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let port = socket.local_addr().expect("relay address").port();
        let (held_tx, held_rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            let fired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            while let Ok((client, _)) = socket.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                let (fired, held_tx) = (fired.clone(), held_tx.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        if chunk.windows(17).any(|w| w == b"START_REPLICATION")
                            && !fired.swap(true, std::sync::atomic::Ordering::SeqCst)
                        {
                            let (go_tx, go_rx) = tokio::sync::oneshot::channel();
                            if held_tx.send(go_tx).await.is_ok() {
                                let _ = go_rx.await;
                            }
                        }
                        if server_write.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        StartReplicationHold {
            port,
            held: tokio::sync::Mutex::new(held_rx),
            task,
        }
    }

    /// Waits until a client sent `START_REPLICATION` (held back, not yet forwarded); panics after
    /// `timeout`. Sending on (or dropping) the returned sender lets it through.
    pub async fn wait_held(
        &self,
        timeout: std::time::Duration,
    ) -> tokio::sync::oneshot::Sender<()> {
        tokio::time::timeout(timeout, self.held.lock().await.recv())
            .await
            .expect("no START_REPLICATION reached the relay")
            .expect("relay running")
    }
}

impl Drop for StartReplicationHold {
    fn drop(&mut self) {
        self.task.abort();
    }
}
