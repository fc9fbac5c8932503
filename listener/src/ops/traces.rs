//! OpenTelemetry traces: the exporter (`[telemetry]`), the W3C trace context an event carries,
//! and the spans of delivery — one per transaction (or replay batch, or redrive) and one per
//! handler call, the latter a child of the context the event was raised in.
//!
//! Spans never carry payloads or metadata, only ids, names and outcomes. Export runs on the
//! batch processor's own thread with a bounded queue: when the collector is slow or away, spans
//! are dropped, and delivery never waits for it.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Link, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

use crate::config::telemetry::{SamplerKind, TelemetryConfig};
use crate::error::ConfigError;
use crate::event::Event;

/// Span attribute keys (bounded values, never payloads).
pub mod attribute {
    /// The event's id.
    pub const EVENT_ID: &str = "pg_domain_events.event.id";
    /// The event's type.
    pub const EVENT_TYPE: &str = "pg_domain_events.event.type";
    /// The event's aggregate type.
    pub const AGGREGATE_TYPE: &str = "pg_domain_events.aggregate.type";
    /// The handler's name.
    pub const HANDLER: &str = "pg_domain_events.handler";
    /// The call's number, from 1 (retries count up).
    pub const ATTEMPT: &str = "pg_domain_events.attempt";
    /// `ok`, or the error type: `transient`, `definite`, `panic`, `timeout`.
    pub const OUTCOME: &str = "pg_domain_events.outcome";
    /// `stream`, `replay` or `redrive`.
    pub const DELIVERY: &str = "pg_domain_events.delivery";
    /// Events of a transaction (or replay batch).
    pub const EVENTS: &str = "pg_domain_events.events";
    /// The transaction's commit LSN (stream delivery).
    pub const COMMIT_LSN: &str = "pg_domain_events.commit_lsn";
}

/// The running exporter of a listener; [`Telemetry::shutdown`] sends what is left.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Starts the exporter of `config`, or `None` when telemetry is off. Nothing is sent yet:
    /// a collector that is not there is noticed (and logged) at the first export.
    pub fn start(config: &TelemetryConfig) -> Result<Option<Telemetry>, ConfigError> {
        if !config.enabled {
            return Ok(None);
        }
        config.validate()?;
        let timeout = Duration::from_millis(config.export_timeout_ms);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(config.traces_url())
            .with_timeout(timeout)
            .build()
            .map_err(|e| ConfigError::invalid(Some("telemetry".into()), e.to_string()))?;
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(config.queue_size)
            .with_max_export_batch_size(config.batch_size)
            .with_scheduled_delay(Duration::from_millis(config.export_interval_ms))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batches)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler(config))
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        Ok(Some(Telemetry { provider }))
    }

    /// Spans of stream delivery, exported by this.
    pub fn tracing(&self) -> Tracing {
        Tracing {
            tracer: Some(self.provider.tracer("pg_domain_events_listener")),
            delivery: Delivery::Stream,
        }
    }

    /// Sends the spans still queued, waiting for the export (bounded by its timeout): call it
    /// from `spawn_blocking` in an async task. The exporter stops when the last clone of its
    /// [`Tracing`] is gone.
    pub fn flush(&self) {
        if let Err(err) = self.provider.force_flush() {
            tracing::warn!(error = %err, "telemetry: could not send the last spans");
        }
    }
}

fn sampler(config: &TelemetryConfig) -> Sampler {
    let ratio = config.sampler_arg;
    match config.sampler {
        SamplerKind::AlwaysOn => Sampler::AlwaysOn,
        SamplerKind::AlwaysOff => Sampler::AlwaysOff,
        SamplerKind::Traceidratio => Sampler::TraceIdRatioBased(ratio),
        SamplerKind::ParentbasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        SamplerKind::ParentbasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        SamplerKind::ParentbasedTraceidratio => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
    }
}

/// How events reach the handlers, marked on every span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// Followed as they commit.
    #[default]
    Stream,
    /// `listener replay`.
    Replay,
    /// A dead letter delivered again.
    Redrive,
}

impl Delivery {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Stream => "stream",
            Delivery::Replay => "replay",
            Delivery::Redrive => "redrive",
        }
    }

    fn batch_span(self) -> &'static str {
        match self {
            Delivery::Stream => "pg_domain_events transaction",
            Delivery::Replay => "pg_domain_events replay batch",
            Delivery::Redrive => "pg_domain_events redrive",
        }
    }
}

/// Starts the spans of delivery; off (and free) unless built by [`Telemetry::tracing`].
#[derive(Clone, Default)]
pub struct Tracing {
    tracer: Option<SdkTracer>,
    delivery: Delivery,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("on", &self.tracer.is_some())
            .field("delivery", &self.delivery)
            .finish()
    }
}

impl Tracing {
    /// No spans.
    pub fn off() -> Tracing {
        Tracing::default()
    }

    /// Whether spans are started.
    pub fn is_on(&self) -> bool {
        self.tracer.is_some()
    }

    /// The same exporter, spans marked as of `delivery`.
    pub fn delivering(&self, delivery: Delivery) -> Tracing {
        Tracing {
            tracer: self.tracer.clone(),
            delivery,
        }
    }

    /// How these spans' events are delivered.
    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// Starts the span of a transaction (replay batch, redrive): a new trace, the parent of
    /// the handler calls of events raised without a trace context. An empty context when off;
    /// the span ends with [`end_batch`] (or when the last clone of the context is dropped).
    pub fn batch(&self) -> Context {
        let Some(tracer) = &self.tracer else {
            return Context::new();
        };
        let span = tracer
            .span_builder(self.delivery.batch_span())
            .with_kind(SpanKind::Consumer)
            .with_attributes([KeyValue::new(attribute::DELIVERY, self.delivery.as_str())])
            .start_with_context(tracer, &Context::new());
        Context::new().with_span(span)
    }

    /// Starts the span of one call of `handler` on `event`: a child of the trace context
    /// stored with the event (linked to `batch`), or, for an event raised without one, of
    /// `batch`. `None` when off.
    pub fn handler_call(
        &self,
        batch: &Context,
        event: &Event,
        handler: &str,
        attempt: u32,
    ) -> Option<Context> {
        let tracer = self.tracer.as_ref()?;
        let batch_span = batch.span().span_context().clone();
        let (parent, links) = match stored_context(event) {
            Some(stored) => {
                let links = if batch_span.is_valid() {
                    vec![Link::with_context(batch_span)]
                } else {
                    Vec::new()
                };
                (stored, links)
            }
            None => (batch.clone(), Vec::new()),
        };
        let span = tracer
            .span_builder(format!("handle {handler}"))
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new(attribute::EVENT_ID, event.id.to_string()),
                KeyValue::new(attribute::EVENT_TYPE, event.event_type.clone()),
                KeyValue::new(attribute::AGGREGATE_TYPE, event.aggregate_type.clone()),
                KeyValue::new(attribute::HANDLER, handler.to_string()),
                KeyValue::new(attribute::ATTEMPT, i64::from(attempt)),
                KeyValue::new(attribute::DELIVERY, self.delivery.as_str()),
            ])
            .with_links(links)
            .start_with_context(tracer, &parent);
        Some(parent.with_span(span))
    }
}

/// Ends a handler call's span: `None` succeeded, else the error type (an error status that
/// names the type only: an error's text may quote what the event carried).
pub(crate) fn end_call(call: &Context, error_type: Option<&'static str>) {
    let span = call.span();
    match error_type {
        None => {
            span.set_attribute(KeyValue::new(attribute::OUTCOME, "ok"));
            span.set_status(Status::Ok);
        }
        Some(error_type) => {
            span.set_attribute(KeyValue::new(attribute::OUTCOME, error_type));
            span.set_status(Status::error(error_type));
        }
    }
    span.end();
}

/// Ends a transaction's span with the number of its events (and its commit LSN, if any).
pub(crate) fn end_batch(batch: &Context, events: u64, commit_lsn: Option<String>) {
    let span = batch.span();
    span.set_attribute(KeyValue::new(attribute::EVENTS, events as i64));
    if let Some(lsn) = commit_lsn {
        span.set_attribute(KeyValue::new(attribute::COMMIT_LSN, lsn));
    }
    span.end();
}

/// The trace context the event was raised in (`metadata.traceparent`, `metadata.tracestate`),
/// if it has a valid one.
pub fn stored_context(event: &Event) -> Option<Context> {
    #[derive(serde::Deserialize)]
    struct Stored {
        #[serde(default)]
        traceparent: Option<serde_json::Value>,
        #[serde(default)]
        tracestate: Option<serde_json::Value>,
    }
    let stored = serde_json::from_str::<Stored>(event.metadata.get()).ok()?;
    let mut carrier = HashMap::new();
    for (key, value) in [
        ("traceparent", stored.traceparent),
        ("tracestate", stored.tracestate),
    ] {
        if let Some(serde_json::Value::String(value)) = value {
            carrier.insert(key.to_string(), value);
        }
    }
    carrier.get("traceparent")?;
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// The `traceparent` / `tracestate` of the current handler call's span, for a sink to pass on
/// (so that a consumer's spans are children of the call); `None` outside a traced call.
pub fn current_headers() -> Option<Vec<(String, String)>> {
    let context = Context::current();
    let span_context: SpanContext = context.span().span_context().clone();
    if !span_context.is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    let mut headers: Vec<(String, String)> = carrier.into_iter().collect();
    headers.sort();
    Some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_with(metadata: serde_json::Value) -> Event {
        crate::event::sample(serde_json::json!({ "metadata": metadata }))
    }

    #[test]
    fn the_stored_context_is_read_from_the_metadata() {
        let event = event_with(serde_json::json!({
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tracestate": "vendor=x",
        }));
        let context = stored_context(&event).expect("a context");
        let span = context.span().span_context().clone();
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span.is_sampled() && span.is_remote());
        assert_eq!(span.trace_state().header(), "vendor=x");
        for metadata in [
            serde_json::json!({}),
            serde_json::json!({"traceparent": 7}),
            serde_json::json!({"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}),
            serde_json::json!({"tracestate": "vendor=x"}),
        ] {
            assert!(
                stored_context(&event_with(metadata.clone())).is_none(),
                "{metadata}"
            );
        }
    }

    #[test]
    fn off_starts_nothing() {
        let tracing = Tracing::off();
        let batch = tracing.batch();
        assert!(!batch.span().span_context().is_valid());
        let event = event_with(serde_json::json!({}));
        assert!(tracing.handler_call(&batch, &event, "h", 1).is_none());
        assert!(current_headers().is_none());
    }
}
