//! `kind = "sql"`: the function each event is applied with, exactly once.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::sink::{quote_function, SqlHandler};
use crate::delivery::dispatch::Handler;
use crate::sink::config::{Purpose, SinkConfig, SinkConfigError, SinkContext, SinkKind};

/// A SQL function called exactly once per event ([`SqlHandler`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// The function `schema.function(event jsonb)` to call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
}

impl SqlConfig {
    /// A handler calling `function` (`schema.function`).
    pub fn new(function: impl Into<String>) -> SqlConfig {
        SqlConfig {
            function: Some(function.into()),
        }
    }

    fn function(&self) -> Result<&str, SinkConfigError> {
        let function = self.function.as_deref().ok_or_else(|| {
            SinkConfigError::new("kind = \"sql\" needs function = \"schema.function\"")
        })?;
        quote_function(function).map_err(|e| SinkConfigError(e.to_string()))?;
        Ok(function)
    }
}

impl SinkConfig for SqlConfig {
    fn validate(&self) -> Result<(), SinkConfigError> {
        self.function().map(|_| ())
    }

    fn build(&self, context: &SinkContext<'_>) -> Result<Arc<dyn Handler>, SinkConfigError> {
        let sql = SqlHandler::new(
            context.database.clone(),
            self.function()?,
            context.handler.to_string(),
            context.subscription,
        )
        .map_err(|e| SinkConfigError(e.to_string()))?
        .with_mode(context.mode);
        Ok(match context.purpose {
            Purpose::Stream => Arc::new(sql),
            Purpose::Replay => Arc::new(sql.for_replay()),
        })
    }

    /// Its position row advances in stream order: one worker only.
    fn needs_stream_order(&self) -> bool {
        true
    }
}

impl SinkKind for SqlConfig {
    const KIND: &'static str = "sql";
    const KEYS: &'static [&'static str] = &["function"];
}
