//! Overrides of the file: `--set table.key=value` and the dedicated flags, typed as TOML.

use crate::error::ConfigError;

/// Overrides given on the command line, applied after the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `(dotted key, value)` pairs, e.g. `("database.port", "5433")`.
    pub pairs: Vec<(String, String)>,
}

/// Sets `section.key` to `value`, typed as TOML when it parses as a TOML value (numbers,
/// booleans, arrays) and as a string otherwise.
pub(super) fn set(
    table: &mut toml::Table,
    section: &str,
    key: &str,
    value: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    let typed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    set_value(table, section, key, typed, origin)
}

/// Sets `section.key` to `value`, as typed by the caller.
pub(super) fn set_value(
    table: &mut toml::Table,
    section: &str,
    key: &str,
    typed: toml::Value,
    origin: &str,
) -> Result<(), ConfigError> {
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let inner = entry.as_table_mut().ok_or_else(|| {
        ConfigError::invalid(
            Some(origin.to_string()),
            format!("{section} is not a table"),
        )
    })?;
    inner.insert(key.to_string(), typed);
    Ok(())
}
