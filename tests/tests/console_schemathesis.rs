//! schemathesis (PyPI, installed by `scripts/setup.sh` into `.pg/schemathesis`) against the
//! operator console's OpenAPI document, served by a running listener over a seeded database:
//! positive and negative inputs for every operation; no answer may be a server error, and every
//! answer must be documented and match its schema.

use std::path::PathBuf;

use e2e::console_support::*;
use e2e::TestDb;
use serde_json::json;

fn schemathesis() -> PathBuf {
    std::env::var_os("PGDE_SCHEMATHESIS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.pg/schemathesis/bin/schemathesis"),
        PathBuf::from,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let db = TestDb::new().await;
    db.client
        .query(
            "SELECT id FROM domain_events.raise_events($1)",
            &[&json!([
                {"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Created", "payload": {"amount": 1}},
                {"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Funded", "payload": {"amount": 2}},
            ])],
        )
        .await
        .expect("raise_events");
    let console = ConsoleUnderTest::start(&db).await;
    let binary = schemathesis();
    assert!(
        binary.exists(),
        "{} is missing: run scripts/setup.sh",
        binary.display()
    );
    let output = tokio::process::Command::new(&binary)
        .args([
            "run",
            &format!("http://127.0.0.1:{}/api/openapi.json", console.port),
            "--header",
            &format!("Authorization: Bearer {OPERATOR}"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "40",
            "--workers",
            "1",
            "--seed",
            "19",
            "--request-timeout",
            "10",
            "--generation-database",
            "none",
        ])
        .env("NO_COLOR", "1")
        // It keeps a cache of what it found in its working directory: not in the checkout.
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .output()
        .await
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    console.stop(&db).await;
}
