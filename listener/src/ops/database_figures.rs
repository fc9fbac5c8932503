//! What only the database knows, read from it and rendered with the listener's own metrics so
//! that one scrape has both sides of the pipeline: the raise-side counters the extension keeps
//! (`domain_events.raise_stats`, `store_stats`), the event store's size, and how far behind
//! each subscription is (`domain_events.subscription_lag`).

use std::fmt::Write;

use tokio_postgres::Client;

/// `pg_domain_events_events_raised_total{aggregate_type,event_type}`.
pub const EVENTS_RAISED: &str = "pg_domain_events_events_raised_total";
/// `pg_domain_events_events_stored_duration_seconds` (histogram).
pub const EVENTS_STORED_DURATION: &str = "pg_domain_events_events_stored_duration_seconds";
/// `pg_domain_events_store_size_bytes`.
pub const STORE_SIZE: &str = "pg_domain_events_store_size_bytes";
/// `pg_domain_events_subscription_events_behind{subscription}`.
pub const SUBSCRIPTION_EVENTS_BEHIND: &str = "pg_domain_events_subscription_events_behind";

const RAISE_STATS: &str = "SELECT aggregate_type, event_type, events \
     FROM domain_events.raise_stats ORDER BY aggregate_type, event_type";
const STORE_STATS: &str = "SELECT operations, total_seconds, bucket_le, bucket_operations \
     FROM domain_events.store_stats";
/// The event table's partitions, with their indexes and TOAST.
const STORE_SIZE_SQL: &str = "SELECT COALESCE(pg_catalog.sum(\
     pg_catalog.pg_total_relation_size(i.inhrelid)), 0)::bigint \
     FROM pg_catalog.pg_inherits i WHERE i.inhparent = 'domain_events.event'::pg_catalog.regclass";
const SUBSCRIPTIONS: &str =
    "SELECT name, events_behind FROM domain_events.subscription_lag ORDER BY name";

/// What the extension counted in this database since the server started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatabaseFigures {
    /// `(aggregate_type, event_type, events)`.
    pub raised: Vec<(String, String, i64)>,
    /// Store operations.
    pub operations: i64,
    /// Their total duration in seconds.
    pub total_seconds: f64,
    /// `(upper bound in seconds, cumulative operations)`, the last bound infinite.
    pub buckets: Vec<(f64, i64)>,
    /// Bytes of the event table's partitions.
    pub store_bytes: i64,
    /// `(subscription, events behind)`.
    pub subscriptions: Vec<(String, i64)>,
}

impl DatabaseFigures {
    /// Reads the views and sizes (as `domain_events_reader`).
    pub async fn read(client: &Client) -> Result<DatabaseFigures, tokio_postgres::Error> {
        let raised = client
            .query(RAISE_STATS, &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let store = client.query_one(STORE_STATS, &[]).await?;
        let le: Vec<f64> = store.get(2);
        let counts: Vec<i64> = store.get(3);
        let store_bytes = client.query_one(STORE_SIZE_SQL, &[]).await?.get(0);
        let subscriptions = client
            .query(SUBSCRIPTIONS, &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(DatabaseFigures {
            raised,
            operations: store.get(0),
            total_seconds: store.get(1),
            buckets: le.into_iter().zip(counts).collect(),
            store_bytes,
            subscriptions,
        })
    }

    /// Appends the figures in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {EVENTS_RAISED} Events stored by raise_event, raise_events and capture, by \
             aggregate and event type (counted at statement time, from domain_events.raise_stats)."
        );
        let _ = writeln!(out, "# TYPE {EVENTS_RAISED} counter");
        for (aggregate_type, event_type, events) in &self.raised {
            let _ = writeln!(
                out,
                "{EVENTS_RAISED}{{aggregate_type=\"{}\",event_type=\"{}\"}} {events}",
                escape(aggregate_type),
                escape(event_type)
            );
        }
        let name = EVENTS_STORED_DURATION;
        let _ = writeln!(
            out,
            "# HELP {name} Duration of each store operation (one raising statement), from \
             domain_events.store_stats."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (le, count) in &self.buckets {
            let le = if le.is_infinite() {
                "+Inf".to_string()
            } else {
                le.to_string()
            };
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_sum {}", self.total_seconds);
        let _ = writeln!(out, "{name}_count {}", self.operations);
        let _ = writeln!(
            out,
            "# HELP {STORE_SIZE} Bytes of the event table's partitions, indexes and TOAST included."
        );
        let _ = writeln!(out, "# TYPE {STORE_SIZE} gauge");
        let _ = writeln!(out, "{STORE_SIZE} {}", self.store_bytes);
        let _ = writeln!(
            out,
            "# HELP {SUBSCRIPTION_EVENTS_BEHIND} Committed events a subscription has not handled \
             yet (domain_events.subscription_lag; an estimate in replication mode)."
        );
        let _ = writeln!(out, "# TYPE {SUBSCRIPTION_EVENTS_BEHIND} gauge");
        for (subscription, behind) in &self.subscriptions {
            let _ = writeln!(
                out,
                "{SUBSCRIPTION_EVENTS_BEHIND}{{subscription=\"{}\"}} {behind}",
                escape(subscription)
            );
        }
    }
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_counter_per_pair_and_a_histogram() {
        let figures = DatabaseFigures {
            raised: vec![("Loan".into(), "Loan.\"Odd\"".into(), 3)],
            operations: 2,
            total_seconds: 0.004,
            buckets: vec![(0.001, 1), (0.005, 2), (f64::INFINITY, 2)],
            store_bytes: 8192,
            subscriptions: vec![("orders".into(), 4)],
        };
        let mut text = String::new();
        figures.render(&mut text);
        for line in [
            "# TYPE pg_domain_events_events_raised_total counter",
            r#"pg_domain_events_events_raised_total{aggregate_type="Loan",event_type="Loan.\"Odd\""} 3"#,
            "# TYPE pg_domain_events_events_stored_duration_seconds histogram",
            r#"pg_domain_events_events_stored_duration_seconds_bucket{le="0.005"} 2"#,
            r#"pg_domain_events_events_stored_duration_seconds_bucket{le="+Inf"} 2"#,
            "pg_domain_events_events_stored_duration_seconds_sum 0.004",
            "pg_domain_events_events_stored_duration_seconds_count 2",
            "pg_domain_events_store_size_bytes 8192",
            r#"pg_domain_events_subscription_events_behind{subscription="orders"} 4"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }
}
