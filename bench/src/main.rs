//! Benchmarks of pg_domain_events, measured against baselines in the same run.
//!
//! `cargo run -p bench --release -- store` compares the event store with a plain INSERT and
//! a PL/pgSQL implementation of the same contract; `capture` measures table capture;
//! `contracts` payload validation; `handlers` sync handlers; `per-row` raising once per row of a
//! query; `pipeline`, `workers`, `replay` and `traces` measure the listener; `console` the
//! operator console's reads.
//! Each benchmark is a subcommand in its own module; this file only wires them up.

use clap::{Parser, Subcommand};

mod capture;
mod console;
mod contracts;
mod handlers;
mod kafka;
mod latency;
mod per_row;
mod pipeline;
mod replay;
mod sinks;
mod store;
mod traces;

/// Benchmarks of pg_domain_events (run against the private cluster, not as tests).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// raise_events / raise_event against plain INSERT and PL/pgSQL: batch throughput and
    /// single-event commit latency.
    Store(store::StoreArgs),
    /// Per-row raising: raise_event called once per row of a query (LATERAL), against a plain
    /// INSERT … SELECT of the same rows and the PL/pgSQL raise_event called the same way.
    PerRow(per_row::PerRowArgs),
    /// Table capture: a single-row UPDATE on a tracked table against the same UPDATE on an
    /// untracked one.
    Capture(capture::CaptureArgs),
    /// Event contracts: raise_events batches validated against a registered JSON Schema
    /// against the same batches with schema_validation = off.
    Contracts(contracts::ContractsArgs),
    /// Sync handlers: raise_events with 1 and 3 audit handlers against the same work in AFTER
    /// INSERT triggers, single-event latency with one handler, and counting under concurrent
    /// writers.
    Handlers(handlers::HandlersArgs),
    /// The listener: WAL → no-op handler throughput next to pg_recvlogical, and
    /// commit→handler latency at a fixed offered rate.
    Pipeline(pipeline::PipelineArgs),
    /// The listener's ordered workers: the same backlog drained with 1, 4 and 16 workers, with a
    /// no-op handler and a slow one.
    Workers(pipeline::WorkersArgs),
    /// The webhook and NATS handlers: commit → JetStream ack and commit → HTTP receiver
    /// events/s, and JetStream ack pipelining.
    Sinks(sinks::SinksArgs),
    /// `listener replay`: stored events → no-op handler throughput, next to `SELECT count(*)`
    /// and a plain `COPY … TO STDOUT` of the same rows.
    Replay(replay::ReplayArgs),
    /// The listener's traces: the same backlog drained with telemetry off and with every event
    /// sampled and exported over OTLP to a receiver started by the bench; events/s and ratio.
    Traces(traces::TracesArgs),
    /// The operator console over 1M stored events: a page of events filtered by type, one
    /// aggregate's history and the outbox `pending` listing, p50/p99 of HTTP requests to it.
    Console(console::ConsoleArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Store(args) => store::run(args).await,
        Command::PerRow(args) => per_row::run(args).await,
        Command::Capture(args) => capture::run(args).await,
        Command::Contracts(args) => contracts::run(args).await,
        Command::Handlers(args) => handlers::run(args).await,
        Command::Pipeline(args) => pipeline::run(args).await,
        Command::Workers(args) => pipeline::run_workers(args).await,
        Command::Sinks(args) => sinks::run(args).await,
        Command::Replay(args) => replay::run(args).await,
        Command::Traces(args) => traces::run(args).await,
        Command::Console(args) => console::run(args).await,
    }
}
