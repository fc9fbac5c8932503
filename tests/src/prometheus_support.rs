//! Helpers for the monitoring suite (`tests/tests/monitoring.rs`): a real Prometheus of a test's
//! own (Debian's package, unpacked by `scripts/setup.sh` into `.pg/prometheus/`) on a free port,
//! scraping a listener and loading the shipped alert rules, and its HTTP query API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::admin_support::{free_port, get};

/// The repository's root (the tests crate's parent).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_path_buf()
}

/// The server binary: `PGDE_PROMETHEUS`, else the one `scripts/setup.sh` unpacked.
pub fn prometheus_binary() -> PathBuf {
    if let Ok(path) = std::env::var("PGDE_PROMETHEUS") {
        return PathBuf::from(path);
    }
    let unpacked = repo_root().join(".pg/prometheus/usr/bin/prometheus");
    assert!(
        unpacked.is_file(),
        "the monitoring tests need Prometheus: run scripts/setup.sh"
    );
    unpacked
}

/// A Prometheus process with its own data directory, killed on drop.
pub struct Prometheus {
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `127.0.0.1:<target_port>/metrics` every second as job
    /// `pg_domain_events_listener`, evaluating `rule_file` every second; waits until ready.
    pub async fn start(target_port: u16, rule_file: &Path) -> Prometheus {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("pgde-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: pg_domain_events_listener\n    \
                 static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n",
                rules = rule_file.display()
            ),
        )
        .expect("prometheus.yml");
        let child = Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("prometheus.log")).expect("log file"),
            ))
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(port, "/-/ready", None).await.map(|(s, _)| s) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "prometheus is not ready after 30 s: {}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        prometheus
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates `expr` now through `/api/v1/query`: `Ok(result vector)`, or `Err(the error
    /// Prometheus gave)` for an expression it refuses.
    pub async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (status, body) = get(self.port, &path, None)
            .await
            .expect("prometheus answers");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
        if status != 200 || answer["status"] != "success" {
            return Err(format!("{status}: {}", answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The left side of an alert expression's final comparison (`… > 60` → `…`), outside
/// parentheses: what must return series whether or not the alert fires.
pub fn without_threshold(expr: &str) -> &str {
    let bytes = expr.as_bytes();
    let mut depth = 0i32;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => depth -= 1,
            b'>' | b'<' if depth == 0 => return expr[..i].trim(),
            b'=' if depth == 0 && bytes.get(i + 1) == Some(&b'=') => return expr[..i].trim(),
            _ => {}
        }
    }
    expr.trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_the_final_comparison_only_outside_brackets() {
        assert_eq!(
            without_threshold("max by (h) (x{a=\"b\"}) > 60"),
            "max by (h) (x{a=\"b\"})"
        );
        assert_eq!(
            without_threshold("up{job=\"l\"} == 0 or absent(up)"),
            "up{job=\"l\"}"
        );
        assert_eq!(without_threshold("rate(x[5m])"), "rate(x[5m])");
        assert_eq!(percent_encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }
}
