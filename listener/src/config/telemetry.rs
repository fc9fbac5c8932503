//! `[telemetry]`: OpenTelemetry traces of the handler calls, exported over OTLP/HTTP.

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ConfigError;

/// `[telemetry]`: spans of every handler call (and of the transaction, replay batch or redrive
/// around it), exported over OTLP/HTTP with protobuf bodies to a collector. Off unless
/// `enabled`.
///
/// The standard variables `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_TRACES_EXPORTER`
/// (`otlp` turns telemetry on, `none` off) and `OTEL_SDK_DISABLED` override the file;
/// `PGDE_TELEMETRY_*` and `--set telemetry.*` override those.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Export spans.
    pub enabled: bool,
    /// Base URL of the collector's OTLP/HTTP receiver; spans go to `<endpoint>/v1/traces`.
    pub endpoint: String,
    /// The full URL to post spans to, when it is not `<endpoint>/v1/traces`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traces_endpoint: Option<String>,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Which traces to record (the `OTEL_TRACES_SAMPLER` names).
    pub sampler: SamplerKind,
    /// The ratio of the `traceidratio` samplers, 0 to 1.
    #[serde(deserialize_with = "number")]
    pub sampler_arg: f64,
    /// Spans waiting for export at most; beyond, new spans are dropped (never waited for).
    pub queue_size: usize,
    /// Spans sent in one request at most.
    pub batch_size: usize,
    /// How often waiting spans are sent.
    pub export_interval_ms: u64,
    /// How long one export may take before it is given up (its spans are dropped).
    pub export_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> TelemetryConfig {
        TelemetryConfig {
            enabled: false,
            endpoint: "http://localhost:4318".into(),
            traces_endpoint: None,
            service_name: "pg_domain_events_listener".into(),
            sampler: SamplerKind::ParentbasedAlwaysOn,
            sampler_arg: 1.0,
            queue_size: 2048,
            batch_size: 512,
            export_interval_ms: 5000,
            export_timeout_ms: 10_000,
        }
    }
}

/// A sampler, by its `OTEL_TRACES_SAMPLER` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// Every trace.
    AlwaysOn,
    /// No trace.
    AlwaysOff,
    /// A share (`sampler_arg`) of the traces, by trace id.
    Traceidratio,
    /// As the event's stored trace context says; every new trace.
    ParentbasedAlwaysOn,
    /// As the event's stored trace context says; no new trace.
    ParentbasedAlwaysOff,
    /// As the event's stored trace context says; a share of the new traces.
    ParentbasedTraceidratio,
}

/// An integer or a float (`OTEL_TRACES_SAMPLER_ARG=1` is typed as an integer).
fn number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Float(f64),
        Integer(i64),
    }
    Ok(match Number::deserialize(deserializer)? {
        Number::Float(f) => f,
        Number::Integer(i) => i as f64,
    })
}

/// The standard `OTEL_*` variables, as the `[telemetry]` keys they set (`OTEL_SDK_DISABLED` is
/// applied last, by [`otel_disabled`]).
pub(super) const OTEL_VARIABLES: [(&str, &str); 5] = [
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "endpoint"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "traces_endpoint"),
    ("OTEL_SERVICE_NAME", "service_name"),
    ("OTEL_TRACES_SAMPLER", "sampler"),
    ("OTEL_TRACES_SAMPLER_ARG", "sampler_arg"),
];

/// `OTEL_TRACES_EXPORTER`: `otlp` turns telemetry on, `none` off; `None` for anything else.
pub(super) fn otel_exporter(value: &str) -> Option<bool> {
    match value.trim() {
        "otlp" => Some(true),
        "none" => Some(false),
        _ => None,
    }
}

/// `OTEL_SDK_DISABLED=true` turns telemetry off, whatever else says.
pub(super) fn otel_disabled(value: &str) -> bool {
    value.trim().eq_ignore_ascii_case("true")
}

impl TelemetryConfig {
    /// Where spans are posted.
    pub fn traces_url(&self) -> String {
        match self.traces_endpoint.as_deref().filter(|e| !e.is_empty()) {
            Some(url) => url.to_string(),
            None => format!("{}/v1/traces", self.endpoint.trim_end_matches('/')),
        }
    }

    /// Checks the keys (no I/O), whether or not telemetry is enabled, so that a mistake shows
    /// before it is turned on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| {
            Err(ConfigError::invalid(
                Some(format!("telemetry.{key}")),
                message,
            ))
        };
        for (key, url) in [
            ("endpoint", Some(self.endpoint.as_str())),
            ("traces_endpoint", self.traces_endpoint.as_deref()),
        ] {
            if let Some(url) = url {
                let ok = ["http://", "https://"]
                    .iter()
                    .any(|scheme| url.len() > scheme.len() && url.starts_with(scheme))
                    && !url.contains(char::is_whitespace);
                if !ok {
                    return invalid(
                        key,
                        format!("{url:?}: use an http:// or https:// URL, e.g. \"http://localhost:4318\""),
                    );
                }
            }
        }
        if self.service_name.trim().is_empty() {
            return invalid("service_name", "must not be empty".into());
        }
        if !(0.0..=1.0).contains(&self.sampler_arg) {
            return invalid(
                "sampler_arg",
                format!("{}: must be between 0 and 1", self.sampler_arg),
            );
        }
        if self.queue_size == 0 || self.batch_size == 0 || self.batch_size > self.queue_size {
            return invalid(
                "batch_size",
                "queue_size and batch_size must be positive, batch_size at most queue_size".into(),
            );
        }
        if self.export_interval_ms == 0 || self.export_timeout_ms == 0 {
            return invalid(
                "export_interval_ms",
                "export_interval_ms and export_timeout_ms must be positive".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn load(
        file: &str,
        env: &[(&str, &str)],
        flags: &[(&str, &str)],
    ) -> Result<Config, ConfigError> {
        let path = std::env::temp_dir().join(format!(
            "pgde-telemetry-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, format!("{file}\n[[handlers]]\nkind = \"stdout\"\n")).expect("write");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let flags = Overrides {
            pairs: flags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let loaded = Config::load(Some(&path), &env, &flags);
        let _ = std::fs::remove_file(&path);
        loaded
    }

    #[test]
    fn off_by_default_and_posting_to_the_local_collector() {
        let config = load("", &[], &[]).expect("loads");
        assert_eq!(config.telemetry, TelemetryConfig::default());
        assert!(!config.telemetry.enabled);
        assert_eq!(
            config.telemetry.traces_url(),
            "http://localhost:4318/v1/traces"
        );
    }

    #[test]
    fn file_then_otel_variables_then_pgde_variables_then_flags() {
        let file = "[telemetry]\nendpoint = \"http://file:4318/\"\nservice_name = \"file\"\nsampler_arg = 0.1";
        let config = load(
            file,
            &[
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318"),
                ("OTEL_SERVICE_NAME", "from-otel"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                // An integer: still the ratio 1.
                ("OTEL_TRACES_SAMPLER_ARG", "1"),
                ("PGDE_TELEMETRY_SERVICE_NAME", "from-pgde"),
            ],
            &[("telemetry.export_interval_ms", "250")],
        )
        .expect("loads");
        let t = &config.telemetry;
        assert!(t.enabled);
        assert_eq!(t.traces_url(), "http://otel:4318/v1/traces");
        assert_eq!(t.service_name, "from-pgde");
        assert_eq!(t.sampler, SamplerKind::ParentbasedTraceidratio);
        assert_eq!(t.sampler_arg, 1.0);
        assert_eq!(t.export_interval_ms, 250);

        let traces = load(
            "[telemetry]\nenabled = true",
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c:443/traces")],
            &[],
        )
        .expect("loads");
        assert_eq!(traces.telemetry.traces_url(), "https://c:443/traces");
        let integer = load("", &[("PGDE_TELEMETRY_SAMPLER_ARG", "0")], &[]).expect("loads");
        assert_eq!(integer.telemetry.sampler_arg, 0.0);
    }

    #[test]
    fn the_sdk_switch_and_the_none_exporter_turn_it_off() {
        for env in [
            [
                ("OTEL_SDK_DISABLED", "true"),
                ("OTEL_TRACES_EXPORTER", "otlp"),
            ],
            [
                ("OTEL_TRACES_EXPORTER", "none"),
                ("OTEL_SDK_DISABLED", "false"),
            ],
        ] {
            let config = load("[telemetry]\nenabled = true", &env, &[]).expect("loads");
            assert!(!config.telemetry.enabled, "{env:?}");
        }
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        for (file, env, key) in [
            (
                "[telemetry]\nendpoint = \"collector:4318\"",
                vec![],
                "telemetry.endpoint",
            ),
            (
                "",
                vec![("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://x")],
                "telemetry.traces_endpoint",
            ),
            (
                "[telemetry]\nsampler_arg = 1.5",
                vec![],
                "telemetry.sampler_arg",
            ),
            (
                "",
                vec![("OTEL_TRACES_SAMPLER_ARG", "half")],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                "[telemetry]\nservice_name = \" \"",
                vec![],
                "telemetry.service_name",
            ),
            (
                "[telemetry]\nqueue_size = 10\nbatch_size = 20",
                vec![],
                "telemetry.batch_size",
            ),
            (
                "[telemetry]\nexport_timeout_ms = 0",
                vec![],
                "telemetry.export_interval_ms",
            ),
        ] {
            let err = load(file, &env, &[]).expect_err(file).to_string();
            assert!(err.contains(key), "{file:?} {env:?}: {err}");
        }
        let err = load("", &[("OTEL_TRACES_SAMPLER", "sometimes")], &[])
            .expect_err("an unknown sampler")
            .to_string();
        assert!(err.contains("sometimes"), "{err}");
    }
}
