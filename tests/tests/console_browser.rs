//! The operator console's page in a real headless Chromium (Debian `chromium` and
//! `chromium-driver`): signing in with a token, filtering to one aggregate and reading its
//! history, a viewer seeing no payloads, and an operator redriving a dead letter until it is
//! gone. Screenshots of the main views are written to `target/console-screenshots/`
//! (`docs/console.md` shows them).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::browser_support::Browser;
use e2e::console_support::*;
use e2e::TestDb;
use listener::{Event, Filter, Handler, HandlerError, Registry, RetryPolicy};
use serde_json::json;

/// Fails `Mail.Send` events while `broken` is set.
#[derive(Clone)]
struct Mailer {
    broken: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Handler for Mailer {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        if event.event_type == "Mail.Send" && self.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::transient("smtp: connection refused"));
        }
        Ok(())
    }
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots")
}

async fn sign_in(browser: &Browser, port: u16, token: &str) {
    browser.clear_cookies().await;
    browser.goto(&format!("http://127.0.0.1:{port}/")).await;
    browser.fill("#token", token).await;
    browser.click("#sign-in").await;
    browser.find("#role").await;
}

/// Filters the event list to Loan 42 and opens its timeline.
async fn open_loan_42(browser: &Browser) {
    browser.fill("#aggregate_type", "Loan").await;
    browser.fill("#aggregate_id", "42").await;
    browser.click("#filter").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while browser.all("#events a.aggregate").await.len() != 3 {
        assert!(Instant::now() < deadline, "{}", browser.source().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    browser.click("#events a.aggregate").await;
    browser.find("#timeline").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_filter_read_history_and_redrive_in_a_real_browser() {
    let db = TestDb::new().await;
    let broken = Arc::new(AtomicBool::new(true));
    let mut registry = Registry::new();
    registry.register(
        "mailer",
        [Filter::All],
        RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        },
        Mailer {
            broken: Arc::clone(&broken),
        },
    );
    let console = ConsoleUnderTest::start_with(&db, registry).await;
    // Wait until the subscription delivers what commits from now on.
    let deadline = Instant::now() + Duration::from_secs(60);
    while db
        .client
        .query_opt(
            "SELECT 1 FROM domain_events.subscription WHERE name = $1",
            &[&console.subscription],
        )
        .await
        .expect("subscription")
        .is_none()
    {
        assert!(Instant::now() < deadline, "the listener did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.client
        .query(
            "SELECT id FROM domain_events.raise_events($1)",
            &[&json!([
                {"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Created", "payload": {"amount": 100000, "term_months": 12}},
                {"aggregate_type": "Loan", "aggregate_id": "7", "event_type": "Loan.Created", "payload": {"amount": 5000}},
                {"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Approved", "payload": {"amount": 90000, "term_months": 12, "rate": 7.5}},
                {"aggregate_type": "Loan", "aggregate_id": "42", "event_type": "Loan.Funded", "payload": {"amount": 90000, "rate": 7.5}},
                {"aggregate_type": "Mail", "aggregate_id": "m-1", "event_type": "Mail.Send", "payload": {"to": "borrower@example.com"}},
            ])],
        )
        .await
        .expect("raise_events");
    let deadline = Instant::now() + Duration::from_secs(60);
    while e2e::listener_support::dead_letters(&db.client, &console.subscription)
        .await
        .is_empty()
    {
        assert!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let browser = Browser::start().await;
    let port = console.port;

    // A viewer: the history, without payloads.
    sign_in(&browser, port, VIEWER).await;
    assert_eq!(browser.text("#role").await, "viewer");
    open_loan_42(&browser).await;
    let timeline = browser.text("#timeline").await;
    assert!(
        timeline.contains("v1 Loan.Created") && timeline.contains("v3 Loan.Funded"),
        "{timeline}"
    );
    let source = browser.source().await;
    assert!(
        !source.contains("90000") && !source.contains("term_months"),
        "a viewer saw a payload"
    );
    browser
        .goto(&format!("http://127.0.0.1:{port}/?view=events"))
        .await;
    assert!(browser.all("td.payload").await.is_empty());
    assert!(!browser.source().await.contains("borrower@example.com"));

    // A developer: the same history with payload diffs between versions.
    sign_in(&browser, port, DEVELOPER).await;
    browser.screenshot(&screenshots().join("events.png")).await;
    open_loan_42(&browser).await;
    let timeline = browser.text("#timeline").await;
    assert!(timeline.contains("~ amount: 100000 → 90000"), "{timeline}");
    assert!(timeline.contains("+ rate: 7.5"), "{timeline}");
    assert!(timeline.contains("- term_months: 12"), "{timeline}");
    browser
        .screenshot(&screenshots().join("timeline.png"))
        .await;
    browser
        .goto(&format!("http://127.0.0.1:{port}/?view=outbox&status=all"))
        .await;
    assert!(browser.text("#outbox").await.contains("dead_lettered"));
    browser.screenshot(&screenshots().join("outbox.png")).await;
    browser
        .goto(&format!("http://127.0.0.1:{port}/?view=dead-letters"))
        .await;
    assert!(
        browser.all("button.redrive").await.is_empty(),
        "a developer may not redrive"
    );

    // An operator redrives the dead letter once the mailer works again: it disappears.
    sign_in(&browser, port, OPERATOR).await;
    browser
        .goto(&format!("http://127.0.0.1:{port}/?view=dead-letters"))
        .await;
    assert_eq!(browser.all("tr.dead-letter").await.len(), 1);
    browser
        .screenshot(&screenshots().join("dead-letters.png"))
        .await;
    broken.store(false, Ordering::SeqCst);
    browser.click("button.redrive").await;
    // The request is the page's fetch: leaving the page before it answered would cancel it.
    browser.find("tr.redriven").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        browser
            .goto(&format!("http://127.0.0.1:{port}/?view=dead-letters"))
            .await;
        if browser.all("tr.dead-letter").await.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead letter is still there after a redrive"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        e2e::listener_support::dead_letters(&db.client, &console.subscription)
            .await
            .is_empty()
    );
    for view in ["handlers", "subscriptions"] {
        browser
            .goto(&format!("http://127.0.0.1:{port}/?view={view}"))
            .await;
        browser.find(&format!("#{view}")).await;
        browser
            .screenshot(&screenshots().join(format!("{view}.png")))
            .await;
    }
    drop(browser);
    console.stop(&db).await;
}
