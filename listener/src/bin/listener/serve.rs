//! `listener run` and `listener slot recover`: the configured handlers, run by the library
//! until the work ends or a signal stops it.

use std::process::ExitCode;

use listener::config::ConfigArgs;
use listener::error::report;
use listener::service::{registry_from_config, Listener};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::process::{init_logging, load_config, runtime, watch_signals};

/// What [`serve`] runs with the configured handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Serve {
    /// `listener run`.
    Run,
    /// `listener slot recover`.
    RecoverSlot,
}

/// Loads the configuration, builds the handlers and runs `what` until it ends or a signal
/// stops it.
pub(crate) fn serve(args: &ConfigArgs, what: Serve) -> ExitCode {
    let config = match load_config(args) {
        Ok(config) => config,
        Err(code) => return code,
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
