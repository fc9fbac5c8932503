//! `kind = "stdout"`: no keys of its own.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::sink::StdoutSink;
use crate::delivery::dispatch::Handler;
use crate::sink::config::{SinkConfig, SinkConfigError, SinkContext, SinkKind};

/// JSON lines on standard output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {}

impl SinkConfig for StdoutConfig {
    fn validate(&self) -> Result<(), SinkConfigError> {
        Ok(())
    }

    fn build(&self, _: &SinkContext<'_>) -> Result<Arc<dyn Handler>, SinkConfigError> {
        Ok(Arc::new(StdoutSink::new()))
    }
}

impl SinkKind for StdoutConfig {
    const KIND: &'static str = "stdout";
    const KEYS: &'static [&'static str] = &[];
}
