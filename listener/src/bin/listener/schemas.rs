//! `listener schemas export DIR`: the event contracts registered in the database
//! (`domain_events.event_schemas`), one JSON Schema file per event type and version, for code
//! generators and consumers' own validators. Part of the binary only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use listener::config::ConfigArgs;

/// `listener schemas …`.
#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Write every registered event schema to DIR (created if missing), one file per event type
    /// and version named `<event_type>.v<event_version>.schema.json`; existing files of those
    /// names are replaced, others are left alone.
    Export {
        /// Directory to write the files to.
        dir: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// Reads the registry (`domain_events_reader` suffices) and writes the files.
pub fn run(command: &SchemaCommand) -> ExitCode {
    let SchemaCommand::Export { dir, config } = command;
    let dir = dir.clone();
    crate::process::with_database(config, |_, client| async move {
        let rows = client
            .query(
                "SELECT event_type, event_version, schema FROM domain_events.event_schemas \
                 ORDER BY event_type, event_version",
                &[],
            )
            .await
            .map_err(|source| listener::Error::Sql {
                context: "reading domain_events.event_schemas",
                source,
            })?;
        let schemas: Vec<(String, i32, serde_json::Value)> = rows
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        match write_all(&dir, &schemas) {
            Ok(()) => {
                println!(
                    "wrote {} schema file(s) to {}",
                    schemas.len(),
                    dir.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(err) => {
                eprintln!("error: cannot write to {}: {err}", dir.display());
                Ok(ExitCode::FAILURE)
            }
        }
    })
}

/// The file of one event type and version. Event type names are ASCII letters, digits, `_`,
/// `-` and dots (the extension refuses others), so they are safe as file names.
pub fn file_name(event_type: &str, event_version: i32) -> String {
    format!("{event_type}.v{event_version}.schema.json")
}

fn write_all(dir: &Path, schemas: &[(String, i32, serde_json::Value)]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (event_type, event_version, schema) in schemas {
        let mut text = serde_json::to_string_pretty(schema)?;
        text.push('\n');
        std::fs::write(dir.join(file_name(event_type, *event_version)), text)?;
    }
    Ok(())
}
