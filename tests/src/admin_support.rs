//! Helpers for the admin HTTP suite (`tests/tests/admin.rs`): a free port, scraping over real
//! HTTP, and reading values out of the Prometheus text format.

use std::time::{Duration, Instant};

/// A port that was free a moment ago (bound to 127.0.0.1:0, read, released).
pub fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    socket.local_addr().expect("local addr").port()
}

/// `GET http://127.0.0.1:<port><path>` with an optional bearer token: `(status, body)`, or `None`
/// when nothing listens (yet).
pub async fn get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("HTTP client");
    let mut request = client.get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.expect("response body")))
}

/// Waits until `GET path` answers at all; panics after `timeout`.
pub async fn wait_get(
    port: u16,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(answer) = get(port, path, token).await {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "nothing answers on port {port} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `/health` answers `status`; returns the body. Panics after `timeout` with the last
/// answer.
pub async fn wait_health(port: u16, token: Option<&str>, status: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = get(port, "/health", token).await;
        if let Some((got, body)) = &answer {
            if *got == status {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "/health did not answer {status} within {timeout:?}; last answer {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample `name{labels}` (labels in any order, all of them) in a Prometheus
/// text exposition; `None` when there is no such sample.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let mut found: Vec<(String, String)> = label_text
                .split(',')
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            found.sort();
            let mut wanted: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            wanted.sort();
            (found == wanted).then(|| value.parse().ok()).flatten()
        })
}

/// An expected sample: metric name, labels, value.
pub type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Scrapes `/metrics` until every `(name, labels, value)` holds exactly; returns the last text.
/// Panics after `timeout` naming the first expectation that did not hold.
pub async fn wait_samples(
    port: u16,
    token: Option<&str>,
    expected: &[Expected<'_>],
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, text) = wait_get(port, "/metrics", token, timeout).await;
        assert_eq!(status, 200, "{text}");
        let missing = expected
            .iter()
            .find(|(name, labels, value)| sample(&text, name, labels) != Some(*value));
        match missing {
            None => return text,
            Some((name, labels, value)) => assert!(
                Instant::now() < deadline,
                "{name}{labels:?} is not {value} after {timeout:?}:\n{text}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_by_name_and_labels() {
        let text = "# TYPE x counter\nx{a=\"1\",b=\"2\"} 3\nx{a=\"1\"} 4\ny 5\n";
        assert_eq!(sample(text, "x", &[("b", "2"), ("a", "1")]), Some(3.0));
        assert_eq!(sample(text, "x", &[("a", "1")]), Some(4.0));
        assert_eq!(sample(text, "y", &[]), Some(5.0));
        assert_eq!(sample(text, "x", &[]), None);
    }
}
