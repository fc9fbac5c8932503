//! Configuration loading on arbitrary input: the TOML file, `PGDE_*` environment overrides and
//! `--set` flag overrides, merged and validated by `config::Config::load`. Whatever the input, it
//! returns a configuration or a `ConfigError`; a panic is a bug. A configuration that loads must
//! also survive what the binary does with it next (names, filters, retry delays) and load again,
//! unchanged in meaning, from its own serialization.
//!
//! An input is three parts separated by a line `%%`: the file's bytes (not necessarily UTF-8),
//! then `NAME=VALUE` environment lines, then `table.key=value` flag lines.

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use listener::config::{Config, Overrides};

/// Separates the file, the environment and the flags.
const SEPARATOR: &[u8] = b"\n%%\n";

fn parts(data: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let mut rest = data;
    let mut next = || match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        Some(at) => {
            let part = &rest[..at];
            rest = &rest[at + SEPARATOR.len()..];
            part
        }
        None => std::mem::take(&mut rest),
    };
    (next(), next(), next())
}

fn pairs(text: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A file of this process's own (`Config::load` reads a path), rewritten for every input.
fn scratch_file() -> PathBuf {
    std::env::temp_dir().join(format!("pgde-fuzz-config-{}.toml", std::process::id()))
}

fn load(file: &[u8], env: &[(String, String)], flags: &Overrides) -> Option<Config> {
    let path = scratch_file();
    std::fs::write(&path, file).expect("write the scratch config file");
    Config::load(Some(&path), env, flags).ok()
}

fuzz_target!(|data: &[u8]| {
    let (file, env, flags) = parts(data);
    let env = pairs(env);
    let flags = Overrides {
        pairs: pairs(flags),
    };
    let Some(config) = load(file, &env, &flags) else {
        return;
    };
    let _ = config.replication.subscription_name();
    for handler in &config.handlers {
        let _ = handler.name();
        handler
            .filters()
            .expect("a validated handler's filters parse");
        let retry = handler.retry();
        for attempt in [0, 1, 2, 31, 32, 64, u32::MAX] {
            let _ = retry.backoff(attempt);
        }
    }
    // What validated once validates again from its own TOML (the password is never written).
    if let Ok(text) = toml::to_string(&config) {
        let again = load(text.as_bytes(), &env, &Overrides::default());
        assert!(
            again.is_some(),
            "a valid configuration does not reload:\n{text}"
        );
    }
});
