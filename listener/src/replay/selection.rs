//! Which stored events a replay reads: the selection and the SQL it becomes.

use chrono::{DateTime, NaiveDate, Utc};
use tokio_postgres::types::ToSql;

use crate::config::ConfigError;
use crate::delivery::dead_letter::EVENT_COLUMNS;
use crate::delivery::dispatch::Filter;
use crate::error::Error;

/// Count per event type of the selected events (for `--dry-run`); appended to a WHERE clause.
pub(super) const COUNT_BY_TYPE: &str =
    "SELECT event_type, count(*) FROM domain_events.event WHERE true{filters} GROUP BY event_type";

/// Which stored events to replay; every given bound must hold (AND).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Only events of this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only events of aggregates with this id.
    pub aggregate_id: Option<String>,
    /// Only events whose type passes this filter (`Loan.Funded`, `Loan.*`, `*`).
    pub event_type: Option<Filter>,
    /// Only events at or after this position.
    pub from_position: Option<i64>,
    /// Only events at or before this position.
    pub to_position: Option<i64>,
    /// Only events recorded at or after this time (`recorded_at`, the partition key).
    pub since: Option<DateTime<Utc>>,
    /// Only events recorded before this time.
    pub until: Option<DateTime<Utc>>,
}

pub(super) fn invalid(origin: &str, message: impl Into<String>) -> Error {
    Error::Config(ConfigError::invalid(Some(origin.to_string()), message))
}

/// A SQL parameter of the WHERE clause.
type Param = Box<dyn ToSql + Sync + Send>;

impl Selection {
    /// Refuses empty ranges, which are most likely a mistake (a definite configuration error).
    pub fn validate(&self) -> Result<(), Error> {
        if let (Some(since), Some(until)) = (self.since, self.until) {
            if since >= until {
                return Err(invalid(
                    "--since/--until",
                    format!("--since {since} is not before --until {until}: the range is empty"),
                ));
            }
        }
        if let (Some(from), Some(to)) = (self.from_position, self.to_position) {
            if from > to {
                return Err(invalid(
                    "--from-position/--to-position",
                    format!("--from-position {from} is after --to-position {to}"),
                ));
            }
        }
        Ok(())
    }

    /// ` AND …` conditions for every bound, with their parameters numbered from `$1`.
    pub(super) fn filters(&self) -> (String, Vec<Param>) {
        let mut sql = String::new();
        let mut params: Vec<Param> = Vec::new();
        let mut add = |condition: &str, param: Param| {
            params.push(param);
            sql.push_str(&condition.replace('?', &format!("${}", params.len())));
        };
        if let Some(t) = &self.aggregate_type {
            add(" AND aggregate_type = ?", Box::new(t.clone()));
        }
        if let Some(id) = &self.aggregate_id {
            add(" AND aggregate_id = ?", Box::new(id.clone()));
        }
        match &self.event_type {
            None | Some(Filter::All) => {}
            Some(Filter::Exact(t)) => add(" AND event_type = ?", Box::new(t.clone())),
            // starts_with: no LIKE escaping of `_` and `%` in event types.
            Some(Filter::Prefix(p)) => add(" AND starts_with(event_type, ?)", Box::new(p.clone())),
        }
        if let Some(from) = self.from_position {
            add(" AND position >= ?", Box::new(from));
        }
        if let Some(to) = self.to_position {
            add(" AND position <= ?", Box::new(to));
        }
        if let Some(since) = self.since {
            add(" AND recorded_at >= ?", Box::new(since));
        }
        if let Some(until) = self.until {
            add(" AND recorded_at < ?", Box::new(until));
        }
        (sql, params)
    }

    /// The events, in position order.
    pub(super) fn events_query(&self) -> (String, Vec<Param>) {
        let (filters, params) = self.filters();
        (
            format!("{EVENT_COLUMNS} WHERE true{filters} ORDER BY position"),
            params,
        )
    }
}

/// Parses a `--since`/`--until` value: RFC 3339 (`2026-11-23T16:00:00Z`, any offset), the same
/// with a space (`2026-11-23 16:00:00+00`), or a date (`2026-11-23`, midnight UTC).
pub fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z") {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc());
        }
    }
    Err(format!(
        "{s:?} is not a timestamp: use RFC 3339 with an offset (2026-11-23T16:00:00Z) or a \
         date (2026-11-23, midnight UTC)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_number_their_parameters_in_order() {
        let selection = Selection {
            aggregate_type: Some("Loan".into()),
            event_type: Some("Loan.*".parse().unwrap()),
            from_position: Some(5),
            until: Some(parse_timestamp("2026-11-23").unwrap()),
            ..Selection::default()
        };
        let (sql, params) = selection.filters();
        assert_eq!(
            sql,
            " AND aggregate_type = $1 AND starts_with(event_type, $2) AND position >= $3 \
             AND recorded_at < $4"
        );
        assert_eq!(params.len(), 4);
        let (sql, params) = Selection::default().events_query();
        assert!(sql.ends_with("WHERE true ORDER BY position"), "{sql}");
        assert!(params.is_empty());
    }

    #[test]
    fn timestamps_and_ranges_are_checked() {
        assert_eq!(
            parse_timestamp("2026-11-23T18:00:00+02:00").unwrap(),
            parse_timestamp("2026-11-23 16:00:00+00").unwrap()
        );
        assert_eq!(
            parse_timestamp("2026-11-23").unwrap().to_rfc3339(),
            "2026-11-23T00:00:00+00:00"
        );
        assert!(parse_timestamp("yesterday").is_err());
        assert!(parse_timestamp("2026-11-23 16:00:00").is_err(), "no offset");
        let empty = Selection {
            since: Some(parse_timestamp("2026-11-24").unwrap()),
            until: Some(parse_timestamp("2026-11-23").unwrap()),
            ..Selection::default()
        };
        assert!(matches!(empty.validate(), Err(Error::Config(_))));
        let backwards = Selection {
            from_position: Some(10),
            to_position: Some(9),
            ..Selection::default()
        };
        assert!(matches!(backwards.validate(), Err(Error::Config(_))));
    }
}
