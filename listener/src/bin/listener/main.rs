//! The `listener` binary: parses flags, loads the configuration, wires the built-in handlers and
//! runs the library until SIGINT or SIGTERM; plus one-shot operator commands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use listener::config::{Config, ConfigArgs, LogConfig, LogFormat};
use listener::dead_letter::{render_table, DeadLetterStore};
use listener::error::report;
use listener::operations;
use listener::replay::{self, Replay, Selection};
use listener::service::{registry_from_config, Listener};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

mod schemas;

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

#[derive(Debug, Subcommand)]
enum SlotCommand {
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

/// Flags of `listener replay`.
#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// Run only this configured handler (repeatable); default: every configured handler.
    #[arg(long = "handler", value_name = "NAME")]
    handlers: Vec<String>,
    /// Only events of this aggregate type.
    #[arg(long, value_name = "TYPE")]
    aggregate_type: Option<String>,
    /// Only events of aggregates with this id.
    #[arg(long, value_name = "ID")]
    aggregate_id: Option<String>,
    /// Only events of this type: exact (Loan.Funded) or a prefix (Loan.*). Handlers still
    /// apply their own filters.
    #[arg(long, value_name = "TYPE|PREFIX.*")]
    event_type: Option<listener::Filter>,
    /// Only events at or after this position.
    #[arg(long, value_name = "N")]
    from_position: Option<i64>,
    /// Only events at or before this position.
    #[arg(long, value_name = "N")]
    to_position: Option<i64>,
    /// Only events recorded (recorded_at) at or after this time: RFC 3339 with an offset
    /// (2026-11-23T16:00:00Z) or a date (2026-11-23, midnight UTC).
    #[arg(long, value_name = "TIMESTAMP", value_parser = replay::parse_timestamp)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events recorded before this time (same formats as --since).
    #[arg(long, value_name = "TIMESTAMP", value_parser = replay::parse_timestamp)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Count the selected events per handler on standard output; handle nothing.
    #[arg(long)]
    dry_run: bool,
    /// Events read per fetch; handlers are flushed after each batch.
    #[arg(long, value_name = "N", default_value_t = replay::DEFAULT_BATCH_SIZE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    batch_size: usize,
    #[command(flatten)]
    config: ConfigArgs,
}

impl ReplayArgs {
    fn selection(&self) -> Selection {
        Selection {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            event_type: self.event_type.clone(),
            from_position: self.from_position,
            to_position: self.to_position,
            since: self.since,
            until: self.until,
        }
    }
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Run(args) => serve(args, Serve::Run),
        Command::PrintConfig(args) => print_config(args),
        Command::DeadLetters { command } => dead_letters(command),
        Command::Status(args) => status(args),
        Command::Replay(args) => replay(args),
        Command::Slot {
            command: SlotCommand::Drop(args),
        } => drop_slot(args),
        Command::Slot {
            command: SlotCommand::Recover(args),
        } => serve(args, Serve::RecoverSlot),
        Command::Schemas { command } => schemas::run(command),
    }
}

fn print_config(args: &ConfigArgs) -> ExitCode {
    let config = match args.load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(2);
        }
    };
    match toml::to_string_pretty(&config) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// What [`serve`] runs with the configured handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serve {
    /// `listener run`.
    Run,
    /// `listener slot recover`.
    RecoverSlot,
}

/// Loads the configuration, builds the handlers and runs `what` until it ends or a signal
/// stops it.
fn serve(args: &ConfigArgs, what: Serve) -> ExitCode {
    let config = match args.load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log);
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let registry = match registry_from_config(&config) {
            Ok(registry) => registry,
            Err(err) => {
                error!(error = %report(&err), "invalid handler configuration");
                return ExitCode::from(2);
            }
        };
        // Validated by `args.load()` already: this cannot fail, but must not go unchecked.
        let listener = match Listener::new(config, registry) {
            Ok(listener) => listener,
            Err(err) => {
                error!(error = %report(&err), "invalid configuration");
                return ExitCode::from(2);
            }
        };
        let cancel = CancellationToken::new();
        let signals = tokio::spawn(watch_signals(cancel.clone()));
        let result = match what {
            Serve::Run => listener.run(cancel.clone()).await,
            Serve::RecoverSlot => listener.recover_slot(&cancel).await,
        };
        signals.abort();
        match result {
            Ok(()) if what == Serve::RecoverSlot && cancel.is_cancelled() => {
                info!("recovery interrupted; run `listener slot recover` or `listener run` to resume it");
                ExitCode::from(130)
            }
            Ok(()) if what == Serve::RecoverSlot => {
                info!("recovered: `listener run` streams from the new slot");
                ExitCode::SUCCESS
            }
            Ok(()) => {
                info!("stopped");
                ExitCode::SUCCESS
            }
            Err(err) => {
                error!(error = %report(&err), "listener stopped");
                ExitCode::FAILURE
            }
        }
    })
}

/// `listener dead-letters …`: one SQL connection, one statement, plain output on stdout.
/// Loads the configuration, opens an ordinary SQL connection and runs `work` on it; any error
/// becomes one `error:` line and a non-zero exit.
fn with_database<F, Fut>(args: &ConfigArgs, work: F) -> ExitCode
where
    F: FnOnce(Config, std::sync::Arc<tokio_postgres::Client>) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, listener::Error>>,
{
    let config = match args.load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(2);
        }
    };
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        let (client, connection) = listener::subscription::connect(&config.database).await?;
        let client = std::sync::Arc::new(client);
        let outcome = work(config, client.clone()).await;
        drop(client);
        let _ = connection.await;
        outcome
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            ExitCode::FAILURE
        }
    }
}

fn dead_letters(command: &DeadLetterCommand) -> ExitCode {
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

fn status(args: &ConfigArgs) -> ExitCode {
    with_database(args, |_, client| async move {
        print!(
            "{}",
            operations::render_status(&operations::status(&client).await?)
        );
        Ok(ExitCode::SUCCESS)
    })
}

fn drop_slot(args: &ConfigArgs) -> ExitCode {
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

/// `listener replay`: exit 2 before anything is handled when an argument, the configuration or
/// a handler name is wrong.
fn replay(args: &ReplayArgs) -> ExitCode {
    let config = match args.config.load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(2);
        }
    };
    let selection = args.selection();
    if let Err(err) = selection.validate() {
        eprintln!("error: {}", report(&err));
        return ExitCode::from(2);
    }
    init_logging(&config.log);
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let registry = match replay::registry_for_replay(&config, &args.handlers) {
            Ok(registry) => registry,
            Err(err) => {
                eprintln!("error: {}", report(&err));
                return ExitCode::from(2);
            }
        };
        let replay = Replay::new(config.database.clone(), selection)
            .with_batch_size(args.batch_size)
            .with_workers(config.replication.workers);
        if args.dry_run {
            return match replay.count().await {
                Ok(counts) => {
                    let total: u64 = counts.iter().map(|(_, n)| n).sum();
                    println!("{total} event(s) selected; nothing handled (dry run)");
                    println!("handler\tevents");
                    for name in registry.names() {
                        let routed: u64 = counts
                            .iter()
                            .filter(|(event_type, _)| registry.routes(event_type).contains(&name))
                            .map(|(_, n)| n)
                            .sum();
                        println!("{name}\t{routed}");
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {}", report(&err));
                    ExitCode::FAILURE
                }
            };
        }
        let cancel = CancellationToken::new();
        let signals = tokio::spawn(watch_signals(cancel.clone()));
        let result = replay.run(registry, cancel).await;
        signals.abort();
        match result {
            Ok(summary) => {
                eprint!("{}", summary.render());
                match summary.ending {
                    _ if summary.succeeded() => ExitCode::SUCCESS,
                    replay::Ending::Interrupted if summary.failures.is_empty() => {
                        ExitCode::from(130)
                    }
                    _ => ExitCode::FAILURE,
                }
            }
            Err(err) => {
                eprintln!("error: {}", report(&err));
                ExitCode::FAILURE
            }
        }
    })
}

/// Builds the async runtime; on failure says why on stderr (logging may not be set up yet).
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(runtime) => Some(runtime),
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            None
        }
    }
}

/// Cancels on the first SIGINT/SIGTERM (graceful: finish in-flight, confirm, exit 0); exits at
/// once on the second.
async fn watch_signals(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        _ => {
            warn!("cannot install signal handlers; stop the listener with SIGKILL");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("shutting down: finishing the work in flight");
    cancel.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    warn!("second signal: exiting without confirming the in-flight transaction");
    std::process::exit(130);
}

fn init_logging(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout belongs to the stdout handler's JSON lines.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match log.format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
