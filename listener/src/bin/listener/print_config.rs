//! `listener print-config`: the effective configuration as TOML.

use std::process::ExitCode;

use listener::config::ConfigArgs;
use listener::error::report;

pub(crate) fn print_config(args: &ConfigArgs) -> ExitCode {
    let config = match args.load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(2);
        }
    };
    match toml::to_string_pretty(&config) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
