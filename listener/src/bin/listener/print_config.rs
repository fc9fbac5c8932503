//! `listener print-config`: the effective configuration as TOML.

use std::process::ExitCode;

use listener::config::ConfigArgs;

use crate::process::load_config;

pub(crate) fn print_config(args: &ConfigArgs) -> ExitCode {
    let config = match load_config(args) {
        Ok(config) => config,
        Err(code) => return code,
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
