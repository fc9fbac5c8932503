//! Loading: file, environment and flags, and the checks of the common tables.

use std::path::{Path, PathBuf};

use super::*;
use crate::delivery::dispatch::OnFailure;
use crate::replication::subscription::Mode;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A temporary config file, removed on drop (one test helper does not justify a dependency).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write(text: &str) -> TempFile {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("pgde-config-{}-{n}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write temp config");
    TempFile(path)
}

const FILE: &str = r#"
    [database]
    host = "db.internal"
    port = 5433
    dbname = "app"

    [replication]
    slot = "orders"

    [[handlers]]
    kind = "stdout"
    events = ["Loan.*", "User.Created"]
"#;

#[test]
fn file_then_env_then_flags() {
    let file = write(FILE);
    let config = Config::load(
        Some(&file.0),
        &env(&[
            ("PGDE_DATABASE_PORT", "6000"),
            ("PGDE_REPLICATION_HEARTBEAT_INTERVAL_SECS", "30"),
            ("PGDE_TEST_DSN", "ignored: not a config table"),
            ("PGPASSWORD", "from-pgpassword"),
        ]),
        &Overrides {
            pairs: vec![
                ("database.port".into(), "7000".into()),
                ("log.format".into(), "json".into()),
            ],
        },
    )
    .unwrap();
    assert_eq!(config.database.host, "db.internal");
    assert_eq!(config.database.port, 7000);
    assert_eq!(config.database.dbname, "app");
    assert_eq!(config.replication.slot, "orders");
    assert_eq!(config.replication.subscription_name(), "orders");
    assert_eq!(config.replication.heartbeat_interval_secs, 30);
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.database.password.as_deref(), Some("from-pgpassword"));
    let debug = format!("{config:?}");
    assert!(
        !debug.contains("from-pgpassword"),
        "Debug shows the password: {debug}"
    );
    assert_eq!(config.handlers[0].filters().unwrap().len(), 2);
}

#[test]
fn pgde_password_wins_over_pgpassword() {
    let file = write(FILE);
    let config = Config::load(
        Some(&file.0),
        &env(&[("PGPASSWORD", "b"), ("PGDE_PASSWORD", "a")]),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(config.database.password.as_deref(), Some("a"));
}

#[test]
fn rejects_secrets_unknown_keys_and_bad_names() {
    let file = write("[database]\npassword = \"x\"\n[[handlers]]\nkind = \"stdout\"\n");
    let err = Config::load(Some(&file.0), &[], &Overrides::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("secrets come from the environment"),
        "{err}"
    );

    let file = write(FILE);
    let err = Config::load(
        Some(&file.0),
        &env(&[("PGDE_DATABASE_PROT", "1")]),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("prot"), "{err}");

    let err = Config::load(
        Some(&file.0),
        &[],
        &Overrides {
            pairs: vec![("replication.slot".into(), "Bad-Slot".into())],
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("replication.slot"), "{err}");

    let file = write("[database]\nport = 1\n");
    let err = Config::load(Some(&file.0), &[], &Overrides::default()).unwrap_err();
    assert!(err.to_string().contains("no handlers"), "{err}");
}

#[test]
fn sql_handlers_need_a_function_and_one_worker() {
    let load = |text: &str| {
        let file = write(text);
        Config::load(Some(&file.0), &[], &Overrides::default())
    };
    let ok = load("[[handlers]]\nkind = \"sql\"\nfunction = \"app.on_event\"\n").unwrap();
    assert_eq!(ok.handlers[0].name(), "sql");
    for (text, expected) in [
        ("[[handlers]]\nkind = \"sql\"\n", "needs function"),
        (
            "[[handlers]]\nkind = \"sql\"\nfunction = \"on_event\"\n",
            "schema.function",
        ),
        (
            "[[handlers]]\nkind = \"sql\"\nfunction = \"app.f; DROP TABLE x\"\n",
            "schema.function",
        ),
        (
            "[replication]\nworkers = 4\n[[handlers]]\nkind = \"sql\"\nfunction = \"app.f\"\n",
            "workers = 1",
        ),
        (
            "[[handlers]]\nkind = \"stdout\"\nfunction = \"app.f\"\n",
            "sql\" only",
        ),
        (
            "[[handlers]]\nkind = \"stdout\"\nname = \"decode\"\n",
            "reserved",
        ),
        (
            "[replication]\nworkers = 0\n[[handlers]]\nkind = \"stdout\"\n",
            "workers",
        ),
        (
            "[[handlers]]\nkind = \"stdout\"\non_failure = \"retry\"\n",
            "on_failure",
        ),
    ] {
        let err = load(text).unwrap_err().to_string();
        assert!(err.contains(expected), "{text}: {err}");
    }
    let block = load("[[handlers]]\nkind = \"stdout\"\non_failure = \"block\"\n").unwrap();
    assert_eq!(block.handlers[0].on_failure, OnFailure::Block);
}

#[test]
fn admin_is_off_by_default_and_overridable_from_the_environment() {
    let file = write("[[handlers]]\nkind = \"stdout\"\n");
    let none = Config::load(Some(&file.0), &[], &Overrides::default()).unwrap();
    assert_eq!(none.admin.address(), None);
    assert_eq!(none.replication.slot_wal_warning_bytes, 1 << 30);
    let on = Config::load(
        Some(&file.0),
        &env(&[
            ("PGDE_ADMIN_LISTEN", "127.0.0.1:9187"),
            ("PGDE_ADMIN_TOKEN_ENV", "METRICS_TOKEN"),
            ("PGDE_REPLICATION_SLOT_WAL_WARNING_BYTES", "0"),
        ]),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(on.admin.address(), Some("127.0.0.1:9187".parse().unwrap()));
    assert_eq!(on.admin.token_env.as_deref(), Some("METRICS_TOKEN"));
    assert_eq!(on.replication.slot_wal_warning_bytes, 0);
    // Empty: disabled (how an environment variable turns a file's setting off).
    let off = Config::load(
        Some(&file.0),
        &env(&[("PGDE_ADMIN_LISTEN", "")]),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(off.admin.address(), None);
    for (key, value) in [("admin.listen", "localhost"), ("admin.token_env", "A-B")] {
        let flags = Overrides {
            pairs: vec![(key.into(), format!("{value:?}"))],
        };
        let err = Config::load(Some(&file.0), &[], &flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn notify_mode_needs_positive_poll_settings() {
    let load = |text: &str| {
        let file = write(text);
        Config::load(Some(&file.0), &[], &Overrides::default())
    };
    let ok = load("[replication]\nmode = \"notify\"\n[[handlers]]\nkind = \"stdout\"\n").unwrap();
    assert_eq!(ok.replication.mode, Mode::Notify);
    assert_eq!(ok.replication.poll_interval_ms, 1000);
    for text in [
        "[replication]\nmode = \"notify\"\npoll_interval_ms = 0\n[[handlers]]\nkind = \"stdout\"\n",
        "[replication]\nmode = \"notify\"\npoll_batch_size = 0\n[[handlers]]\nkind = \"stdout\"\n",
    ] {
        let err = load(text).unwrap_err().to_string();
        assert!(err.contains("must be positive"), "{text}: {err}");
    }
    let err = load("[replication]\nmode = \"poll\"\n[[handlers]]\nkind = \"stdout\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("mode"), "{err}");
}

#[test]
fn example_file_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("example.toml");
    Config::load(Some(&example), &[], &Overrides::default()).unwrap();
}

#[test]
fn an_unknown_or_foreign_handler_key_names_the_handler_and_the_key() {
    let load = |text: &str| {
        let file = write(text);
        Config::load(Some(&file.0), &[], &Overrides::default())
    };
    for (text, expected) in [
        (
            "kind = \"webhook\"\nname = \"hook\"\nurl = \"http://x\"\nfoo = 1\n",
            "(handler hook): unknown key foo: a kind = \"webhook\" handler takes name, events, \
             max_attempts, initial_backoff_ms, max_backoff_ms, on_failure, url, secret_env, \
             timeout_ms",
        ),
        (
            "kind = \"webhook\"\nname = \"hook\"\nurl = \"http://x\"\nsubject = \"a\"\n",
            "(handler hook): subject is for kind = \"nats\" only, not kind = \"webhook\"",
        ),
        (
            "kind = \"stdout\"\ntimeout_ms = 5\n",
            "(handler stdout): timeout_ms is for kind = \"webhook\" or \"nats\" or \"kafka\" \
             only, not kind = \"stdout\"",
        ),
        ("kind = \"smtp\"\n", "unknown variant `smtp`"),
        ("name = \"x\"\n", "missing field `kind`"),
    ] {
        let err = load(&format!("[[handlers]]\n{text}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn handlers_keep_their_kind_and_keys_through_their_own_toml() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/every-sink.toml");
    let config = Config::load(Some(&file), &[], &Overrides::default()).unwrap();
    let kinds: Vec<&str> = config.handlers.iter().map(|h| h.sink.kind()).collect();
    assert_eq!(kinds, ["stdout", "sql", "webhook", "nats", "nats", "kafka"]);
    let again = write(&toml::to_string(&config).unwrap());
    let reloaded = Config::load(Some(&again.0), &[], &Overrides::default()).unwrap();
    assert_eq!(reloaded.handlers, config.handlers);
}

#[test]
fn a_console_sign_in_lasts_eight_hours_unless_set_within_bounds() {
    let load = |console: &str| {
        let file = write(&format!("{FILE}\n{console}"));
        Config::load(Some(&file.0), &[], &Overrides::default())
    };
    let config = load("[console]\nenabled = false\n").unwrap();
    assert_eq!(config.console.session_max_age_secs, 8 * 60 * 60);
    assert!(
        config.console.is_unset(),
        "the default lifetime leaves [console] unset"
    );
    let config = load("[console]\nsession_max_age_secs = 900\n").unwrap();
    assert_eq!(config.console.session_max_age_secs, 900);
    for bad in [0, 59, 7 * 24 * 60 * 60 + 1] {
        let err = load(&format!("[console]\nsession_max_age_secs = {bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("console.session_max_age_secs") && err.contains("between 60 seconds"),
            "{bad}: {err}"
        );
    }
}
