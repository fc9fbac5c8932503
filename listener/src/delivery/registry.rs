//! The registry: handlers with their names, filters, retry policies and failure policies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::delivery::handler::{Filter, Handler};
use crate::delivery::retry::{OnFailure, RetryPolicy};

pub(crate) struct Registration {
    pub(crate) name: String,
    pub(crate) filters: Vec<Filter>,
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) retry: RetryPolicy,
    pub(crate) on_failure: OnFailure,
    /// Disabled from SQL (`domain_events.disable_handler` on its registry row): its calls
    /// wait, and with them the subscription's position, until it is enabled again.
    pub(crate) paused: AtomicBool,
}

/// The handlers and their filters.
#[derive(Default)]
pub struct Registry {
    pub(crate) entries: Vec<Registration>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `handler` under `name` for events passing any of `filters`.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        filters: impl IntoIterator<Item = Filter>,
        retry: RetryPolicy,
        handler: impl Handler,
    ) -> &mut Registry {
        self.register_arc(name, filters, retry, Arc::new(handler))
    }

    /// Like [`Registry::register`], for a handler already shared elsewhere.
    pub fn register_arc(
        &mut self,
        name: impl Into<String>,
        filters: impl IntoIterator<Item = Filter>,
        retry: RetryPolicy,
        handler: Arc<dyn Handler>,
    ) -> &mut Registry {
        self.register_with(name, filters, retry, OnFailure::default(), handler)
    }

    /// Registers `handler` with an explicit [`OnFailure`] (the other methods dead-letter).
    pub fn register_with(
        &mut self,
        name: impl Into<String>,
        filters: impl IntoIterator<Item = Filter>,
        retry: RetryPolicy,
        on_failure: OnFailure,
        handler: Arc<dyn Handler>,
    ) -> &mut Registry {
        self.entries.push(Registration {
            name: name.into(),
            filters: filters.into_iter().collect(),
            handler,
            retry: RetryPolicy {
                max_attempts: retry.max_attempts.max(1),
                ..retry
            },
            on_failure,
            paused: AtomicBool::new(false),
        });
        self
    }

    /// Number of registered handlers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Names of the registered handlers, in registration order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|r| r.name.as_str()).collect()
    }

    /// The filters of handler `name`, as written in the configuration.
    pub fn filters(&self, name: &str) -> Option<Vec<String>> {
        self.entry(name)
            .map(|r| r.filters.iter().map(Filter::to_string).collect())
    }

    /// Pauses (`true`) or resumes handler `name`: a paused handler's next call waits until it
    /// is resumed, holding its event (and the subscription's position) where it is. Returns
    /// whether that changed anything.
    pub fn set_paused(&self, name: &str, paused: bool) -> bool {
        self.entry(name)
            .is_some_and(|r| r.paused.swap(paused, Ordering::Relaxed) != paused)
    }

    fn entry(&self, name: &str) -> Option<&Registration> {
        self.entries.iter().find(|r| r.name == name)
    }

    /// Names of the handlers `event_type` is routed to, in registration order.
    pub fn routes(&self, event_type: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|r| r.filters.iter().any(|f| f.matches(event_type)))
            .map(|r| r.name.as_str())
            .collect()
    }
}
