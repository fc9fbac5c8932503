//! Helpers for the console suites (`tests/tests/console*.rs`): a database role granted
//! `domain_events_console`, a listener serving the console with one token per role, and HTTP
//! calls over real sockets.

use std::time::Duration;

use listener::config::Config;
use serde_json::Value;

use crate::admin_support::{free_port, wait_get};
use crate::listener_support::{config_for, unique_name, InProcess};
use crate::{connect, dsn_for, TestDb};

/// The token of each role, as the tests send it.
pub const VIEWER: &str = "viewer-token-1";
/// The developer's token.
pub const DEVELOPER: &str = "developer-token-2";
/// The operator's token.
pub const OPERATOR: &str = "operator-token-3";

/// A listener in notify mode serving the console on a free port, as a login role granted
/// `domain_events_console` only.
pub struct ConsoleUnderTest {
    /// The admin server's port.
    pub port: u16,
    /// The console's database role (cluster-wide; dropped with this value).
    pub role: String,
    /// Its password.
    pub password: String,
    /// The listener's subscription.
    pub subscription: String,
    /// The running listener.
    pub listener: Option<InProcess>,
}

impl ConsoleUnderTest {
    /// Creates the role and starts the listener with the console on `db`.
    pub async fn start(db: &TestDb) -> ConsoleUnderTest {
        ConsoleUnderTest::start_with(db, listener::Registry::new()).await
    }

    /// As [`ConsoleUnderTest::start`], the listener delivering to `registry`'s handlers too;
    /// redrive requests are picked up every 200 ms.
    pub async fn start_with(db: &TestDb, registry: listener::Registry) -> ConsoleUnderTest {
        ConsoleUnderTest::start_tuned(db, registry, |_| {}).await
    }

    /// As [`ConsoleUnderTest::start_with`], with `tune` applied to the `[console]` settings.
    pub async fn start_tuned(
        db: &TestDb,
        registry: listener::Registry,
        tune: impl FnOnce(&mut listener::config::ConsoleConfig),
    ) -> ConsoleUnderTest {
        let role = unique_name("console");
        let password = uuid::Uuid::new_v4().simple().to_string();
        db.client
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD '{password}'; \
                 GRANT domain_events_console TO {role}"
            ))
            .await
            .expect("create the console role");
        let subscription = unique_name("sub");
        let mut config: Config = config_for(db, &subscription);
        config.replication.mode = listener::config::Mode::Notify;
        config.replication.poll_interval_ms = 100;
        config.replication.redrive_interval_ms = 200;
        let port = free_port();
        config.admin.listen = Some(format!("127.0.0.1:{port}"));
        let env = |var: &str| format!("PGDE_TEST_{}_{}", var, &role[role.len() - 12..]);
        for (var, value) in [
            ("VIEWER", VIEWER),
            ("DEVELOPER", DEVELOPER),
            ("OPERATOR", OPERATOR),
            ("PASSWORD", password.as_str()),
        ] {
            // Each test runs in a process of its own (nextest), so setting a variable is safe.
            std::env::set_var(env(var), value);
        }
        config.console = listener::config::ConsoleConfig {
            enabled: true,
            user: Some(role.clone()),
            password_env: Some(env("PASSWORD")),
            viewer_token_env: Some(env("VIEWER")),
            developer_token_env: Some(env("DEVELOPER")),
            operator_token_env: Some(env("OPERATOR")),
            ..Default::default()
        };
        tune(&mut config.console);
        let listener = InProcess::start_with(config, registry);
        wait_get(port, "/api/openapi.json", None, Duration::from_secs(60)).await;
        ConsoleUnderTest {
            port,
            role,
            password,
            subscription,
            listener: Some(listener),
        }
    }

    /// A connection to `db` as the console's role, over TCP with its password.
    pub async fn connect_as_console(&self, db: &TestDb) -> tokio_postgres::Client {
        let dsn = dsn_for(&db.name)
            .split_whitespace()
            .filter(|kv| !kv.starts_with("user="))
            .collect::<Vec<_>>()
            .join(" ");
        connect(&format!(
            "{dsn} user={} password={}",
            self.role, self.password
        ))
        .await
    }

    /// `method path` with an optional bearer token and extra headers: status, headers, body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client");
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = client.request(method, format!("http://127.0.0.1:{}{path}", self.port));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.expect("console answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.text().await.expect("body"))
    }

    /// `GET path` with `token`: status and JSON body.
    pub async fn get_json(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let (status, _, body) = self.call("GET", path, token, &[], None).await;
        let json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {status} {body:?} is not JSON: {e}"));
        (status, json)
    }

    /// Stops the listener and drops the role.
    pub async fn stop(mut self, db: &TestDb) {
        if let Some(listener) = self.listener.take() {
            listener.stop().await.expect("listener stops cleanly");
        }
        let admin = crate::listener_support::admin().await;
        let _ = db
            .client
            .batch_execute(&format!("REVOKE domain_events_console FROM {}", self.role))
            .await;
        let _ = admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {}", self.role))
            .await;
    }
}
