//! `listener dead-letters list | redrive`.

use std::process::ExitCode;

use clap::Subcommand;
use listener::config::ConfigArgs;
use listener::dead_letter::{render_table, DeadLetterStore};

use crate::process::with_database;

#[derive(Debug, Subcommand)]
pub(crate) enum DeadLetterCommand {
    /// Print the subscription's dead letters as a tab-separated table (position, event id,
    /// handler, attempts, first and last failure, pending redrive request, error).
    List(ConfigArgs),
    /// Ask the running listener to deliver dead letters again (all, or one event's).
    ///
    /// Marks them with domain_events.redrive(); a running `listener run` of this subscription
    /// picks them up within replication.redrive_interval_ms, and removes each one it delivers.
    Redrive {
        /// Only the dead letters of this event.
        #[arg(long, value_name = "UUID")]
        event_id: Option<uuid::Uuid>,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

pub(crate) fn dead_letters(command: &DeadLetterCommand) -> ExitCode {
    let (args, event_id) = match command {
        DeadLetterCommand::List(args) => (args, None),
        DeadLetterCommand::Redrive { event_id, config } => (config, Some(*event_id)),
    };
    with_database(args, |config, client| async move {
        let subscription = config.replication.subscription_name().to_string();
        let store = DeadLetterStore::new(client, subscription.clone());
        Ok(match event_id {
            None => {
                print!("{}", render_table(&store.list().await?));
                ExitCode::SUCCESS
            }
            Some(event_id) => {
                let count = store.request_redrive(event_id).await?;
                println!(
                    "requested redelivery of {count} dead letter(s) of subscription {subscription:?}"
                );
                if count == 0 && event_id.is_some() {
                    // Asked for one event that has no dead letter: most likely a typo.
                    eprintln!("error: no dead letter of that event in this subscription");
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
        })
    })
}
