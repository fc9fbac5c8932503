//! `listener status` and `listener slot drop`: reading and repairing a subscription.

use std::process::ExitCode;

use clap::Subcommand;
use listener::config::ConfigArgs;
use listener::operations;

use crate::process::with_database;

#[derive(Debug, Subcommand)]
pub(crate) enum SlotCommand {
    /// Drop the slot (e.g. after it was invalidated: wal_status = lost) and forget the
    /// subscription's confirmed LSN, so the next `run` creates a fresh slot.
    ///
    /// Refused while a listener streams from the slot. Events committed while no slot existed
    /// are not delivered by the new one: the command prints the last handled position P; start
    /// the listener again, then run `listener replay --from-position P+1` (events the new slot
    /// also delivers come twice). Positions are taken at insert, not at commit, so a
    /// transaction that was open while the slot was lost may hold a lower position: to recover
    /// without a gap, use `slot recover` instead.
    Drop(ConfigArgs),
    /// Recover from a lost (invalidated or dropped) slot without a gap, then exit.
    ///
    /// Delivers the events the slot did not to the configured handlers, by snapshot-safe
    /// polling of domain_events.event from the subscription's delivered snapshot (none is
    /// skipped; a few may come twice, recognisable by id), creates a new slot meanwhile and
    /// switches the subscription to it; `listener run` then streams from there. This is what
    /// `run` does by itself unless replication.on_slot_lost = "stop". Refused when the slot is
    /// not lost. A signal stops it at the next batch (exit 130); running it again resumes.
    Recover(ConfigArgs),
}

pub(crate) fn status(args: &ConfigArgs) -> ExitCode {
    with_database(args, |config, client| async move {
        let rows = operations::status(&client).await?;
        print!("{}", operations::render_status(&rows));
        // The table stays machine-readable; the explanation goes to standard error.
        let polling: Vec<&str> = rows
            .iter()
            .filter(|r| r.polling_only())
            .map(|r| r.name.as_str())
            .collect();
        if !polling.is_empty() {
            eprintln!(
                "warning: domain_events.notify is off: notify-mode subscription(s) {} are \
                 delivered by polling only, up to replication.poll_interval_ms after each \
                 commit; turn it on for the writers (as a superuser: {}) to deliver at commit",
                polling.join(", "),
                listener::replication::notify::notify_on_statement(&config.database.dbname)
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn drop_slot(args: &ConfigArgs) -> ExitCode {
    with_database(args, |config, client| async move {
        let slot = config.replication.slot.clone();
        let subscription = config.replication.subscription_name().to_string();
        let outcome = operations::drop_slot(&client, &slot, &subscription).await?;
        if outcome.dropped {
            println!("dropped replication slot {slot:?}");
        } else {
            println!("no replication slot {slot:?} in this database");
        }
        if let Some(position) = outcome.last_position {
            println!(
                "subscription {subscription:?} had handled events up to position {position}; \
                 the next run starts a new slot at the current WAL position: start it, then \
                 run `listener replay --from-position {}` for the events committed in between \
                 (a transaction open across the loss may hold a lower position: `listener slot \
                 recover`, instead of dropping, recovers without a gap)",
                position + 1
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
