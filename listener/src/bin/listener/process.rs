//! What the subcommands share: logging, the async runtime, signal handling, and a database
//! connection for one-shot commands.

use std::process::ExitCode;

use listener::config::{Config, ConfigArgs, LogConfig, LogFormat};
use listener::error::report;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// Loads the configuration (file, environment, flags); on an invalid one, says why in one
/// `error:` line and gives the exit status 2.
pub(crate) fn load_config(args: &ConfigArgs) -> Result<Config, ExitCode> {
    args.load().map_err(|err| {
        eprintln!("error: {}", report(&err));
        ExitCode::from(2)
    })
}

/// Loads the configuration, opens an ordinary SQL connection and runs `work` on it; any error
/// becomes one `error:` line and a non-zero exit.
pub(crate) fn with_database<F, Fut>(args: &ConfigArgs, work: F) -> ExitCode
where
    F: FnOnce(Config, std::sync::Arc<tokio_postgres::Client>) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, listener::Error>>,
{
    let config = match load_config(args) {
        Ok(config) => config,
        Err(code) => return code,
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

/// Builds the async runtime; on failure says why on stderr (logging may not be set up yet).
pub(crate) fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
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
pub(crate) async fn watch_signals(cancel: CancellationToken) {
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

pub(crate) fn init_logging(log: &LogConfig) {
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
