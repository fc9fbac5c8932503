//! `listener replay`: handlers run over stored events.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use listener::config::ConfigArgs;
use listener::error::report;
use listener::replay::{self, Replay, Selection};
use tokio_util::sync::CancellationToken;

use crate::process::{init_logging, load_config, runtime, watch_signals};

/// Flags of `listener replay`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReplayArgs {
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

/// `listener replay`: exit 2 before anything is handled when an argument, the configuration or
/// a handler name is wrong.
pub(crate) fn replay(args: &ReplayArgs) -> ExitCode {
    let config = match load_config(&args.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let selection = args.selection();
    if let Err(err) = selection.validate() {
        eprintln!("error: {}", report(&err));
        return ExitCode::from(2);
    }
    init_logging(&config.log);
    let Some(runtime) = runtime(replay::runtime_builder()) else {
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
        let telemetry = match listener::ops::traces::Telemetry::start(&config.telemetry) {
            Ok(telemetry) => telemetry,
            Err(err) => {
                eprintln!("error: {}", report(&err));
                return ExitCode::from(2);
            }
        };
        let tracing = telemetry
            .as_ref()
            .map_or_else(listener::ops::traces::Tracing::off, |t| t.tracing());
        let replay = Replay::new(config.database.clone(), selection)
            .with_batch_size(args.batch_size)
            .with_workers(config.replication.workers)
            .with_tracing(tracing);
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
        let progress = if std::io::stderr().is_terminal() {
            progress(&replay).await
        } else {
            None
        };
        let replay = match &progress {
            Some((done, _)) => replay.with_progress(Arc::clone(done)),
            None => replay,
        };
        let result = replay.run(registry, cancel).await;
        if let Some((_, bar)) = progress {
            bar.abort();
            let _ = bar.await;
        }
        signals.abort();
        if let Some(telemetry) = telemetry {
            // Sends the spans still queued before the process exits.
            let _ = tokio::task::spawn_blocking(move || telemetry.flush()).await;
        }
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

/// On a terminal: events done out of the selection, rate and time left, on standard error,
/// redrawn from the replay's counter until the returned task is aborted (which clears the bar
/// before the summary is printed). `None` when the selection cannot be counted (the replay
/// itself then reports the problem).
async fn progress(replay: &Replay) -> Option<(Arc<AtomicU64>, tokio::task::JoinHandle<()>)> {
    let total: u64 = replay.count().await.ok()?.iter().map(|(_, n)| n).sum();
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "replay {wide_bar} {human_pos}/{human_len} events, {per_sec}, {eta} left",
    ) {
        bar.set_style(style);
    }
    let done = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn({
        let done = Arc::clone(&done);
        async move {
            // Clears the bar however the task ends (aborted once the replay is over).
            struct Clear(ProgressBar);
            impl Drop for Clear {
                fn drop(&mut self) {
                    self.0.finish_and_clear();
                }
            }
            let bar = Clear(bar);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                bar.0.set_position(done.load(Ordering::Relaxed));
            }
        }
    });
    Some((done, task))
}
