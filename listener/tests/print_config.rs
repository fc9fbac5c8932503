//! `listener print-config` output is part of the interface (operators diff it, the fuzz target
//! reloads it): a file naming every built-in sink and every key it takes prints exactly the
//! pinned text, and an unknown or foreign key is refused naming the handler and the key.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn print_config(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_listener"))
        .arg("print-config")
        .arg("--config")
        .arg(path)
        // Overrides from the environment (`PGDE_*`) would change what is printed.
        .env_clear()
        .output()
        .expect("run listener print-config")
}

#[test]
fn every_sink_prints_the_pinned_configuration() {
    let output = print_config(&fixture("every-sink.toml"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = std::fs::read_to_string(fixture("every-sink.printed.toml")).expect("pinned");
    let printed = String::from_utf8(output.stdout).expect("utf-8");
    assert_eq!(printed, expected, "print-config output changed");
}
