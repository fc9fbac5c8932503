//! Helpers for the event-store suites (`tests/tests/store*.rs`): login roles, LISTEN
//! connections, snapshots of what the store holds, and error assertions.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::error::DbError;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

use crate::TestDb;

/// Creates a login role with a password (non-superusers authenticate with SCRAM on the
/// private cluster), optionally grants it `grant`, and returns a connection string for it.
///
/// Roles are cluster-wide, so the name carries a suffix of the test database's name.
pub async fn login_role(db: &TestDb, prefix: &str, grant: Option<&str>) -> (String, String) {
    let suffix = db.name.trim_start_matches("pgde_t_");
    let role = format!("{prefix}_{}", &suffix[..suffix.len().min(16)]);
    let password = "pgde-test-password";
    db.client
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        .await
        .expect("CREATE ROLE");
    if let Some(granted) = grant {
        db.client
            .batch_execute(&format!("GRANT {granted} TO {role}"))
            .await
            .expect("GRANT role");
    }
    let base: Vec<&str> = db
        .dsn
        .split_whitespace()
        .filter(|kv| !kv.starts_with("user=") && !kv.starts_with("password="))
        .collect();
    let dsn = format!("{} user={role} password={password}", base.join(" "));
    (role, dsn)
}

/// Drops a role made by [`login_role`] (roles outlive the test's database).
pub async fn drop_role(db: &TestDb, role: &str) {
    db.client
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .expect("DROP ROLE");
}

/// A connection whose notifications are kept: tokio-postgres only hands them out through
/// `Connection::poll_message`, so this drives the connection itself.
pub struct Listening {
    /// The client of the listening connection.
    pub client: Client,
    notifications: mpsc::UnboundedReceiver<Notification>,
    driver: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// Connects to `dsn` and runs `LISTEN` on every channel.
    pub async fn connect(dsn: &str, channels: &[&str]) -> Listening {
        let (client, mut connection) = tokio_postgres::connect(dsn, NoTls)
            .await
            .expect("connect the listening session");
        let (tx, notifications) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        for channel in channels {
            client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .expect("LISTEN");
        }
        Listening {
            client,
            notifications,
            driver,
        }
    }

    /// Every notification received up to (not including) the first one on `channel` with
    /// `payload`. Notifications arrive in commit order, so a marker sent after a transaction
    /// commits proves that everything that transaction sent has arrived.
    pub async fn until_marker(&mut self, channel: &str, payload: &str) -> Vec<Notification> {
        let mut seen = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(15), self.notifications.recv())
                .await
                .unwrap_or_else(|_| panic!("no marker {channel}/{payload} within 15 s"))
                .expect("listening connection closed");
            if next.channel() == channel && next.payload() == payload {
                return seen;
            }
            seen.push(next);
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What the store holds, compared before and after a statement that must write nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSnapshot {
    /// Rows in `domain_events.event`.
    pub events: i64,
    /// `type/id@version` of every stream head, sorted.
    pub heads: String,
    /// Rows of the business table `public.app_loans`, or `<absent>` when it is gone.
    pub app_rows: String,
}

/// Takes a [`StoreSnapshot`].
pub async fn snapshot(client: &Client) -> StoreSnapshot {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM domain_events.event),
                    (SELECT coalesce(string_agg(format('%s/%s@%s', aggregate_type, aggregate_id,
                                                       version), ',' ORDER BY 1), '')
                       FROM domain_events.aggregate),
                    to_regclass('public.app_loans') IS NOT NULL",
            &[],
        )
        .await
        .expect("snapshot the store");
    let app_rows = if row.get::<_, bool>(2) {
        client
            .query_one(
                "SELECT coalesce(string_agg(id || ':' || status, ',' ORDER BY id), '')
                   FROM public.app_loans",
                &[],
            )
            .await
            .expect("read app_loans")
            .get(0)
    } else {
        "<absent>".to_string()
    };
    StoreSnapshot {
        events: row.get(0),
        heads: row.get(1),
        app_rows,
    }
}

/// Runs `sql`, which must fail; returns the server's error.
pub async fn must_fail(client: &Client, sql: &str) -> DbError {
    match client.batch_execute(sql).await {
        Ok(()) => panic!("expected an error from {sql}"),
        Err(e) => e
            .as_db_error()
            .cloned()
            .unwrap_or_else(|| panic!("not a server error for {sql}: {e}")),
    }
}

/// How a call's `outcome` deviates from failing with SQLSTATE `code` (and, when given, with
/// exactly `message`): one line per deviation, none when it matches. Messages are quoted up to
/// 200 characters: hostile inputs echo megabytes.
pub fn sqlstate_deviations(
    outcome: &Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
    code: &str,
    message: Option<&str>,
) -> Vec<String> {
    let mut problems = Vec::new();
    match outcome {
        Ok(rows) => problems.push(format!("succeeded ({} rows), expected {code}", rows.len())),
        Err(e) => match e.as_db_error() {
            None => problems.push(format!("client error {e}, expected {code}")),
            Some(db) => {
                if db.code().code() != code {
                    problems.push(format!(
                        "got {} ({}), expected {code}",
                        db.code().code(),
                        db.message().chars().take(200).collect::<String>()
                    ));
                }
                if let Some(message) = message {
                    if db.message() != message {
                        problems.push(format!("message {:?}, expected {message:?}", db.message()));
                    }
                }
            }
        },
    }
    problems
}

/// Asserts that `sql` fails with SQLSTATE `code`; returns the error message.
pub async fn assert_sqlstate(client: &Client, sql: &str, code: &str) -> String {
    let err = must_fail(client, sql).await;
    assert_eq!(
        err.code().code(),
        code,
        "SQLSTATE of {sql}: got {} ({})",
        err.code().code(),
        err.message()
    );
    err.message().to_string()
}

/// The name (`domain_events.event_pYYYYMM`) of the partition holding the event `id`.
pub async fn partition_of(client: &Client, id: uuid::Uuid) -> String {
    client
        .query_one(
            "SELECT tableoid::regclass::text FROM domain_events.event WHERE id = $1",
            &[&id],
        )
        .await
        .expect("find the event's partition")
        .get(0)
}

/// Whether a relation `domain_events.<name>` exists.
pub async fn relation_exists(client: &Client, name: &str) -> bool {
    client
        .query_one(
            "SELECT to_regclass(format('domain_events.%I', $1::text)) IS NOT NULL",
            &[&name],
        )
        .await
        .expect("look a relation up")
        .get(0)
}

/// `event_pYYYYMM` for the UTC month `offset` months from now.
pub async fn month_partition(client: &Client, offset: i32) -> String {
    client
        .query_one(
            "SELECT 'event_p' || to_char(date_trunc('month', now() AT TIME ZONE 'UTC')
                                         + make_interval(months => $1), 'YYYYMM')",
            &[&offset],
        )
        .await
        .expect("compute a partition name")
        .get(0)
}
