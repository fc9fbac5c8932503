//! Monthly partitions of `domain_events.event`: on-demand creation, premaking, moving stray
//! rows out of the default partition, and retention by whole partitions.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::CString;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::gucs::{self, RetentionAction};
use crate::immutability;
use crate::store;

/// A calendar month in UTC, the unit of partitioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Month {
    /// Year, 1..=9999.
    pub year: i32,
    /// Month, 1..=12.
    pub month: u32,
}

const MICROS_PER_DAY: i64 = 86_400_000_000;
/// Days from 1970-01-01 to 2000-01-01, the Postgres epoch.
const PG_EPOCH_DAYS: i64 = 10_957;

impl Month {
    /// The month containing a Postgres timestamp (microseconds since 2000-01-01 UTC).
    pub fn of_timestamp(micros: i64) -> Month {
        let days = micros.div_euclid(MICROS_PER_DAY) + PG_EPOCH_DAYS;
        let (year, month, _) = civil_from_days(days);
        Month {
            year: year as i32,
            month,
        }
    }

    /// From a `YYYYMM` number.
    pub fn from_yyyymm(value: i32) -> Month {
        Month {
            year: value / 100,
            month: (value % 100) as u32,
        }
    }

    /// Parses a partition name `event_pYYYYMM`.
    pub fn from_partition_name(name: &str) -> Option<Month> {
        let digits = name.strip_prefix("event_p")?;
        if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let month = Month::from_yyyymm(digits.parse().ok()?);
        (1..=12).contains(&month.month).then_some(month)
    }

    /// The following month.
    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The partition's table name, `event_pYYYYMM`.
    pub fn partition_name(self) -> String {
        format!("event_p{:04}{:02}", self.year, self.month)
    }

    /// The inclusive lower bound as a timestamptz literal in UTC.
    pub fn start_literal(self) -> String {
        format!("{:04}-{:02}-01 00:00:00+00", self.year, self.month)
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian, days since 1970-01-01).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

thread_local! {
    /// Months known to have a partition, keyed by the event table's OID so that a
    /// DROP/CREATE EXTENSION in the same backend starts afresh.
    static KNOWN: RefCell<HashSet<(pg_sys::Oid, Month)>> = RefCell::new(HashSet::new());
}

/// The OID of `domain_events.event`, `InvalidOid` when the extension is not installed.
pub fn event_table() -> pg_sys::Oid {
    relation_oid("event")
}

/// The OID of table `domain_events.<name>`, `InvalidOid` when there is none.
pub fn relation_oid(name: &str) -> pg_sys::Oid {
    let schema = CString::new("domain_events").expect("static name");
    let rel = CString::new(name).expect("partition names have no NUL");
    // SAFETY: both are valid C strings; missing_ok so an absent schema yields InvalidOid.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(schema.as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(rel.as_ptr(), namespace)
    }
}

fn partition_exists(month: Month) -> bool {
    relation_oid(&month.partition_name()) != pg_sys::InvalidOid
}

/// Makes sure the partition for `month` exists; returns whether this call created it.
///
/// Fast path: the per-backend cache, then a catalog lookup. Slow path: take the advisory lock,
/// look again (another backend may have won), and create it — moving first any rows of that
/// month that landed in the default partition, because Postgres refuses a new partition whose
/// range overlaps rows in the default one.
pub fn ensure(month: Month) -> bool {
    if !(1..=9999).contains(&month.year) {
        crate::errors::EventError::invalid(
            "recorded_at",
            format!("year {} is outside the supported range 1..9999", month.year),
            "Event timestamps must fall in years 1 to 9999.",
        )
        .report();
    }
    let table = event_table();
    if KNOWN.with(|k| k.borrow().contains(&(table, month))) {
        return false;
    }
    if partition_exists(month) {
        // Remember only partitions that existed before this transaction touched them: one
        // created here would vanish if the transaction rolls back.
        KNOWN.with(|k| k.borrow_mut().insert((table, month)));
        return false;
    }
    store::run(store::PARTITION_LOCK);
    // Another backend may have created it while we waited. Advisory locks do not process
    // catalog invalidations (relation locks do), so do it here or the lookup may be stale.
    // SAFETY: plain call into the invalidation machinery, as any lock acquisition does.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    if partition_exists(month) {
        return false;
    }
    let (from, to) = (month.start_literal(), month.next().start_literal());
    let name = month.partition_name();
    let stray = store::query_bool(
        store::DEFAULT_HAS_ROWS_IN,
        &[from.as_str().into(), to.as_str().into()],
    );
    if stray {
        // Postgres refuses a partition whose range overlaps rows in the default partition:
        // build it aside, move those rows into it, then attach it.
        store::run(&store::create_unattached_partition(&name));
        move_stray_rows_into(&name, month);
        store::run(&store::attach_partition(&name, &from, &to));
    } else {
        store::run(&store::create_partition(&name, &from, &to));
    }
    // SAFETY: a plain flag Postgres sets while an extension script runs.
    if unsafe { pg_sys::creating_extension } {
        store::run(&store::disown_partition(&name));
    }
    true
}

fn move_stray_rows_into(target: &str, month: Month) {
    let (from, to) = (month.start_literal(), month.next().start_literal());
    immutability::allow_moves(|| {
        store::run_with(
            &store::move_from_default(target),
            &[from.as_str().into(), to.as_str().into()],
        )
    });
}

/// Moves every row of the default partition into its monthly partition; returns the months
/// that received rows.
fn move_stray_rows() -> Vec<Month> {
    let months: Vec<Month> = store::query_column::<i32>(&store::months_of("event_default"), &[])
        .into_iter()
        .map(Month::from_yyyymm)
        .collect();
    for month in &months {
        if partition_exists(*month) {
            move_stray_rows_into("event", *month);
        } else {
            ensure(*month);
        }
    }
    months
}

/// The current transaction's start time, which `now()` and `recorded_at` use.
pub fn transaction_month() -> Month {
    // SAFETY: plain accessor of the current transaction's start timestamp.
    Month::of_timestamp(unsafe { pg_sys::GetCurrentTransactionStartTimestamp() })
}

/// The month of a timestamp value.
pub fn month_of(ts: TimestampWithTimeZone) -> Month {
    Month::of_timestamp(ts.into_inner())
}

/// Premakes partitions, moves stray rows and applies retention; one row per action taken.
pub fn maintain() -> Vec<(String, String)> {
    let mut actions = Vec::new();
    store::run(store::PARTITION_LOCK);
    if store::query_bool(store::DEFAULT_HAS_ROWS, &[]) {
        for month in move_stray_rows() {
            actions.push(("moved".to_string(), month.partition_name()));
        }
    }
    let mut month = transaction_month();
    for _ in 0..=gucs::PREMAKE_MONTHS.get() {
        if ensure(month) {
            actions.push(("created".to_string(), month.partition_name()));
        }
        month = month.next();
    }
    if let Some(retention) = gucs::text(&gucs::RETENTION) {
        let cutoff: Vec<TimestampWithTimeZone> =
            store::query_column(store::RETENTION_CUTOFF, &[retention.as_str().into()]);
        let cutoff = Month::of_timestamp(cutoff.first().expect("one cutoff row").into_inner());
        // The processing log goes with the events it is about (whole months of them); a
        // database still at 0.1.0 has none.
        if relation_oid("handler_log") != pg_sys::InvalidOid {
            store::run_with(
                store::PRUNE_HANDLER_LOG,
                &[cutoff.start_literal().as_str().into()],
            );
        }
        for name in store::query_column::<String>(store::LIST_PARTITIONS, &[]) {
            let Some(month) = Month::from_partition_name(&name) else {
                continue;
            };
            // A partition expires once its whole range lies before the cut-off.
            if month.next() > cutoff {
                continue;
            }
            match gucs::RETENTION_ACTION.get() {
                RetentionAction::Drop => {
                    store::run(&store::drop_partition(&name));
                    actions.push(("dropped".to_string(), name));
                }
                RetentionAction::Detach => {
                    let archived = name.replacen("event_p", "archived_p", 1);
                    store::run(&store::detach_partition(&name, &archived));
                    actions.push(("detached".to_string(), archived));
                }
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_from_postgres_timestamps() {
        assert_eq!(
            Month::of_timestamp(0),
            Month {
                year: 2000,
                month: 1
            }
        );
        assert_eq!(
            Month::of_timestamp(-1),
            Month {
                year: 1999,
                month: 12
            }
        );
        // 2026-11-23 12:00 UTC = 9823.5 days after 2000-01-01
        assert_eq!(
            Month::of_timestamp(9823 * MICROS_PER_DAY + MICROS_PER_DAY / 2),
            Month {
                year: 2026,
                month: 11
            }
        );
        // 2024-02-29 (leap day) = 8825 days after 2000-01-01
        assert_eq!(
            Month::of_timestamp(8825 * MICROS_PER_DAY),
            Month {
                year: 2024,
                month: 2
            }
        );
        assert_eq!(
            Month::of_timestamp(8826 * MICROS_PER_DAY),
            Month {
                year: 2024,
                month: 3
            }
        );
    }

    #[test]
    fn partition_names_round_trip() {
        let m = Month {
            year: 2099,
            month: 12,
        };
        assert_eq!(m.partition_name(), "event_p209912");
        assert_eq!(Month::from_partition_name("event_p209912"), Some(m));
        assert_eq!(
            m.next(),
            Month {
                year: 2100,
                month: 1
            }
        );
        assert_eq!(m.start_literal(), "2099-12-01 00:00:00+00");
        assert_eq!(Month::from_partition_name("event_default"), None);
        assert_eq!(Month::from_partition_name("event_p209913"), None);
    }
}
