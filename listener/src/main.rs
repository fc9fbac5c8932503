//! The `listener` binary: parses flags, loads the configuration, wires the built-in handlers and
//! runs the library until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use listener::config::{Config, ConfigArgs, LogConfig, LogFormat};
use listener::dead_letter::{render_table, DeadLetterStore};
use listener::error::report;
use listener::operations;
use listener::service::{registry_from_config, Listener};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// Follows committed pg_domain_events through logical replication and dispatches them.
#[derive(Debug, Parser)]
#[command(name = "listener", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream events to the configured handlers until SIGINT/SIGTERM.
    Run(ConfigArgs),
    /// Print the effective configuration (file + environment + flags) as TOML and exit.
    PrintConfig(ConfigArgs),
    /// Inspect and redrive the dead letters of the configured subscription.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Print every subscription of the database: position, confirmed LSN, events and WAL bytes
    /// behind, WAL retained by its slot, and whether a listener is streaming from it.
    Status(ConfigArgs),
    /// Repair the configured replication slot.
    Slot {
        #[command(subcommand)]
        command: SlotCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SlotCommand {
    /// Drop the slot (e.g. after it was invalidated: wal_status = lost) and forget the
    /// subscription's confirmed LSN, so the next `run` creates a fresh slot. Events committed
    /// while no slot existed must then be replayed from the table; the command prints from
    /// which position.
    Drop(ConfigArgs),
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// Print the subscription's dead letters as a tab-separated table.
    List(ConfigArgs),
    /// Ask the running listener to deliver dead letters again (all, or one event's).
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
    let (args, run) = match &cli.command {
        Command::Run(args) => (args, true),
        Command::PrintConfig(args) => (args, false),
        Command::DeadLetters { command } => return dead_letters(command),
        Command::Status(args) => return status(args),
        Command::Slot {
            command: SlotCommand::Drop(args),
        } => return drop_slot(args),
    };
    let config = match args.load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(2);
        }
    };
    if !run {
        return match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let registry = match registry_from_config(&config) {
            Ok(registry) => registry,
            Err(err) => {
                error!(error = %report(&err), "invalid handler configuration");
                return ExitCode::from(2);
            }
        };
        let cancel = CancellationToken::new();
        let signals = tokio::spawn(watch_signals(cancel.clone()));
        let result = Listener::new(config, registry).run(cancel).await;
        signals.abort();
        match result {
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
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
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
                 the next run starts a new slot at the current WAL position: replay events \
                 committed since then from domain_events.event"
            );
        }
        Ok(ExitCode::SUCCESS)
    })
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
    info!("shutting down: finishing the in-flight transaction");
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
