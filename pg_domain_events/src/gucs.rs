//! Every setting of the extension, registered once in `_PG_init`.
//!
//! The behaviour switches are superuser-set: an application role must not be able to switch
//! event recording off or raise the payload limit for itself. The metadata settings are
//! user-set, so an ORM can stamp who did a change with `SET LOCAL`.

use std::ffi::{CStr, CString};

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// `domain_events.enabled`: the feature flag.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum EventsEnabled {
    /// Events are recorded.
    #[name = c"on"]
    On,
    /// Raising is a no-op that returns no rows (dark launch).
    #[name = c"off"]
    Off,
    /// Raising fails with SQLSTATE 25006; reads keep working.
    #[name = c"read_only"]
    ReadOnly,
}

/// `domain_events.retention_action`: what retention does with an expired partition.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum RetentionAction {
    /// Detach it and keep it as a plain table (`archived_pYYYYMM`) for archiving.
    #[name = c"detach"]
    Detach,
    /// Drop it.
    #[name = c"drop"]
    Drop,
}

/// `domain_events.schema_validation`: how payloads are checked against the schema registry.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum SchemaValidation {
    /// Payloads are not checked.
    #[name = c"off"]
    Off,
    /// A payload is checked when a schema is registered for its event type and version.
    #[name = c"registered"]
    Registered,
    /// Every event type and version must have a registered schema.
    #[name = c"strict"]
    Strict,
}

/// Whether raising records events.
pub static ENABLED: GucSetting<EventsEnabled> = GucSetting::<EventsEnabled>::new(EventsEnabled::On);
/// Largest accepted payload, in bytes of its JSON text as Postgres prints it.
pub static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// How payloads are checked against `domain_events.event_schema`.
pub static SCHEMA_VALIDATION: GucSetting<SchemaValidation> =
    GucSetting::<SchemaValidation>::new(SchemaValidation::Registered);
/// Send one `NOTIFY domain_events` per transaction that raised events.
pub static NOTIFY: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Age after which whole partitions are retired by `maintain()`; empty keeps history forever.
pub static RETENTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// What retention does with an expired partition.
pub static RETENTION_ACTION: GucSetting<RetentionAction> =
    GucSetting::<RetentionAction>::new(RetentionAction::Detach);
/// Months of partitions `maintain()` creates ahead of the current one.
pub static PREMAKE_MONTHS: GucSetting<i32> = GucSetting::<i32>::new(2);
/// Comma-separated databases a maintenance worker runs `maintain()` in (postmaster start only).
pub static MAINTENANCE_DATABASES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Seconds between two `maintain()` runs of the worker; 0 pauses it.
pub static MAINTENANCE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(3600);
/// How deep sync handlers may raise events from events raised by handlers.
pub static HANDLER_MAX_DEPTH: GucSetting<i32> = GucSetting::<i32>::new(8);
/// Count sync handler executions in shared memory (`domain_events.handler_stats`).
pub static HANDLER_STATS: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Default `metadata.actor` of raised events.
pub static ACTOR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Default `metadata.correlation_id` of raised events.
pub static CORRELATION_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Default `metadata.causation_id` of raised events.
pub static CAUSATION_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Default `metadata.traceparent` (W3C trace context) of raised events, checked when used.
pub static TRACEPARENT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Registers the settings; called from `_PG_init`. Postmaster-level settings exist only when
/// the library is preloaded: Postgres refuses to define them in a running server.
pub fn init(preloading: bool) {
    if preloading {
        GucRegistry::define_string_guc(
            c"domain_events.maintenance_databases",
            c"Comma-separated databases in which a maintenance worker runs domain_events.maintain().",
            c"One background worker per database; read at server start; needs shared_preload_libraries = 'pg_domain_events'.",
            &MAINTENANCE_DATABASES,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_enum_guc(
        c"domain_events.enabled",
        c"Whether raising events records them: on, off (no-op) or read_only (error).",
        c"The feature flag for dark launches and read-only maintenance windows.",
        &ENABLED,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"domain_events.max_payload_bytes",
        c"Largest event payload accepted, in bytes of its JSON text (octet_length(payload::text)).",
        c"Larger payloads are rejected with SQLSTATE 22023 and nothing is written.",
        &MAX_PAYLOAD_BYTES,
        2,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"domain_events.schema_validation",
        c"How event payloads are checked against domain_events.event_schema: off, registered or strict.",
        c"registered checks a payload when its event type and version have a schema; strict also refuses event types without one.",
        &SCHEMA_VALIDATION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"domain_events.notify",
        c"Send NOTIFY domain_events once per committed transaction that raised events.",
        c"Wakes LISTEN consumers such as the listener's notify mode.",
        &NOTIFY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"domain_events.retention",
        c"Age after which maintain() retires whole event partitions, e.g. '12 months'.",
        c"Empty keeps history forever. Rows are never deleted one by one.",
        &RETENTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"domain_events.retention_action",
        c"What retention does with an expired partition: detach or drop.",
        c"detach keeps it as a plain table named archived_pYYYYMM.",
        &RETENTION_ACTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"domain_events.premake_months",
        c"Months of event partitions maintain() creates ahead of the current month.",
        c"",
        &PREMAKE_MONTHS,
        0,
        120,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"domain_events.maintenance_interval",
        c"Seconds between two runs of domain_events.maintain() by the maintenance worker; 0 pauses it.",
        c"",
        &MAINTENANCE_INTERVAL,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"domain_events.handler_max_depth",
        c"How many levels deep sync handlers may raise events in reaction to events raised by handlers.",
        c"Deeper raises fail with SQLSTATE 54001: a handler reacting to its own events would recurse.",
        &HANDLER_MAX_DEPTH,
        1,
        100,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"domain_events.handler_stats",
        c"Count sync handler executions for domain_events.handler_stats.",
        c"Counters live in shared memory: they need shared_preload_libraries = 'pg_domain_events'.",
        &HANDLER_STATS,
        GucContext::Suset,
        GucFlags::default(),
    );
    for (name, setting, what) in [
        (
            c"domain_events.actor",
            &ACTOR,
            c"Default metadata.actor of raised events.",
        ),
        (
            c"domain_events.correlation_id",
            &CORRELATION_ID,
            c"Default metadata.correlation_id of raised events.",
        ),
        (
            c"domain_events.causation_id",
            &CAUSATION_ID,
            c"Default metadata.causation_id of raised events.",
        ),
        (
            c"domain_events.traceparent",
            &TRACEPARENT,
            c"Default metadata.traceparent (W3C trace context) of raised events.",
        ),
    ] {
        GucRegistry::define_string_guc(
            name,
            what,
            c"Used when the event's own metadata does not carry the key; set it with SET LOCAL.",
            setting,
            GucContext::Userset,
            GucFlags::default(),
        );
    }
}

/// The databases listed in `domain_events.maintenance_databases`.
pub fn maintenance_databases() -> Vec<String> {
    text(&MAINTENANCE_DATABASES)
        .map(|list| {
            list.split(',')
                .map(|db| db.trim().to_string())
                .filter(|db| !db.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// A string setting's value, `None` when unset or empty.
pub fn text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|v| CStr::to_string_lossy(&v).into_owned())
        .filter(|v| !v.trim().is_empty())
}
