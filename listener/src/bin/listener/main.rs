//! The `listener` binary: parses flags, loads the configuration, wires the built-in handlers and
//! runs the library until SIGINT or SIGTERM; plus one-shot operator commands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use listener::config::ConfigArgs;

mod dead_letters;
mod operations;
mod print_config;
mod process;
mod replay;
mod schemas;
mod serve;

use dead_letters::DeadLetterCommand;
use operations::SlotCommand;
use replay::ReplayArgs;
use serve::Serve;

/// Delivers committed pg_domain_events to handlers.
///
/// `run` follows new events (logical replication, or LISTEN/NOTIFY polling with
/// replication.mode = "notify") and hands each to the handlers of the configuration file;
/// `replay` runs handlers over events already stored. Every command reads the same TOML file
/// (--config or PGDE_CONFIG), overridable by PGDE_* environment variables and the flags below;
/// the password comes only from PGDE_PASSWORD or PGPASSWORD.
///
/// Exit status: 0 success, 1 failure, 2 invalid configuration or arguments.
#[derive(Debug, Parser)]
#[command(name = "listener", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream committed events to the configured handlers until SIGINT/SIGTERM.
    ///
    /// Starts where the subscription left off (its slot, or its row in
    /// domain_events.subscription); a new subscription starts at the current position: earlier
    /// events are not delivered (use `replay` for those). Exits 1 on a definite failure (e.g.
    /// a lost slot), 2 on an invalid configuration; a second signal exits at once with 130.
    Run(ConfigArgs),
    /// Print the effective configuration (file + environment + flags) as TOML and exit.
    PrintConfig(ConfigArgs),
    /// Run handlers over events stored in domain_events.event: rebuild a projection, feed a new
    /// consumer, or recover the events a lost slot never delivered.
    ///
    /// Reads the selected events (filters combine with AND) in position order, which is
    /// per-aggregate version order, from one consistent snapshot, and runs the chosen handlers
    /// of the configuration file over them with their filters and retry policies. Failures are
    /// not dead-lettered: they are printed with their event ids and the exit status is 1. The
    /// summary goes to standard error (standard output belongs to the stdout handler).
    /// A `sql` handler applies every replayed event, whatever its position row says, and leaves
    /// that row unchanged. SIGINT/SIGTERM stop at the next batch and print where to resume
    /// (exit 130).
    ///
    /// Exit status: 0 every event handled, 1 some failed (or the database failed), 2 invalid
    /// arguments or configuration (nothing is handled).
    Replay(ReplayArgs),
    /// Inspect and redrive the dead letters of the configured subscription.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Print every subscription of the database: position, confirmed LSN, events and WAL bytes
    /// behind, WAL retained by its slot, and whether a listener is streaming from it.
    Status(ConfigArgs),
    /// Repair the configured replication slot (replication mode).
    Slot {
        #[command(subcommand)]
        command: SlotCommand,
    },
    /// The event schemas registered in the database (domain_events.event_schemas).
    Schemas {
        #[command(subcommand)]
        command: schemas::SchemaCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Run(args) => serve::serve(args, Serve::Run),
        Command::PrintConfig(args) => print_config::print_config(args),
        Command::DeadLetters { command } => dead_letters::dead_letters(command),
        Command::Status(args) => operations::status(args),
        Command::Replay(args) => replay::replay(args),
        Command::Slot {
            command: SlotCommand::Drop(args),
        } => operations::drop_slot(args),
        Command::Slot {
            command: SlotCommand::Recover(args),
        } => serve::serve(args, Serve::RecoverSlot),
        Command::Schemas { command } => schemas::run(command),
    }
}
