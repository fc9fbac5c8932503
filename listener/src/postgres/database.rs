//! `[database]`: where the listener connects, shared by its SQL and replication connections
//! (a leaf: the configuration file, the sessions and the `sql` handler all use it).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[database]`: the server to follow. The password comes from the environment only, and
/// `Debug` leaves it out.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role; needs `domain_events_listener`, and the `REPLICATION` attribute in replication mode.
    pub user: String,
    /// Database where the extension is installed.
    pub dbname: String,
    /// `application_name` shown in `pg_stat_replication` and `pg_stat_activity`.
    pub application_name: String,
    /// Seconds to wait for a TCP connection and authentication.
    pub connect_timeout_secs: u64,
    /// TLS: `disable`, `prefer`, `require`, `verify-ca` or `verify-full` (libpq semantics).
    pub sslmode: crate::postgres::tls::SslMode,
    /// CA certificates (PEM) trusted in `verify-ca`/`verify-full`; the system store otherwise.
    pub sslrootcert: Option<PathBuf>,
    /// From `PGDE_PASSWORD` or `PGPASSWORD`; never read from the file.
    #[serde(skip)]
    pub password: Option<String>,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for DatabaseConfig {
    fn default() -> DatabaseConfig {
        DatabaseConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            dbname: "postgres".into(),
            application_name: "pg_domain_events_listener".into(),
            connect_timeout_secs: 10,
            sslmode: crate::postgres::tls::SslMode::default(),
            sslrootcert: None,
            password: None,
        }
    }
}
