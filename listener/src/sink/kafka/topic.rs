//! Where a record goes: the topic template, and the partition of its key.

use super::super::template::{self, Part};
use crate::event::Event;

/// The longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// Why a topic template is not usable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TopicError(String);

/// A topic template such as `events.{aggregate_type}`.
///
/// Placeholders: `{aggregate_type}` and `{event_type}` (a topic per aggregate would make
/// millions of topics, so `{aggregate_id}` is refused: it is the record key). Rendered values
/// keep ASCII letters, digits, `.`, `_` and `-`; every other character becomes `_`, and an empty
/// value becomes `_`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
    template: String,
}

fn topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

impl TopicTemplate {
    /// Parses `template`, refusing unknown placeholders, unbalanced braces, characters a topic
    /// name cannot hold, and fixed names that are too long or are `.` / `..`.
    pub fn parse(template: &str) -> Result<TopicTemplate, TopicError> {
        let err = |why: String| TopicError(format!("topic {template:?}: {why}"));
        let parts = template::parse(
            template,
            &[Part::AggregateType, Part::EventType],
            topic_char,
        )
        .map_err(err)?;
        let fixed: usize = parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.len(),
                _ => 1,
            })
            .sum();
        if fixed > MAX_TOPIC_LEN {
            return Err(err(format!("is longer than {MAX_TOPIC_LEN} characters")));
        }
        if template == "." || template == ".." {
            return Err(err("is not a valid topic name".into()));
        }
        Ok(TopicTemplate {
            parts,
            template: template.to_string(),
        })
    }

    /// The template as written (a bounded metric label, unlike the rendered names).
    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The topic of `event`; an error when the rendered name is longer than Kafka allows (or is
    /// `.` / `..`), which no retry can cure.
    pub fn render(&self, event: &Event) -> Result<String, TopicError> {
        let mut topic = String::with_capacity(self.template.len() + 16);
        for part in &self.parts {
            match part {
                Part::Literal(s) => topic.push_str(s),
                placeholder => match placeholder.value(event).unwrap_or_default() {
                    "" => topic.push('_'),
                    value => {
                        topic.extend(value.chars().map(|c| if topic_char(c) { c } else { '_' }))
                    }
                },
            }
        }
        if topic.len() > MAX_TOPIC_LEN || topic == "." || topic == ".." {
            return Err(TopicError(format!(
                "topic {topic:?} (from {:?}) is not a valid topic name: at most \
                 {MAX_TOPIC_LEN} characters, not \".\" or \"..\"",
                self.template
            )));
        }
        Ok(topic)
    }
}

/// Kafka's default partitioner for keyed records (`Utils.murmur2` of the Java client, then
/// `toPositive(hash) % partitions`), so that an aggregate lands in the same partition as it
/// would from any other Kafka producer.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// Murmur2, 32-bit, seed `0x9747b28c`, as in the Kafka Java client.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::sink::kafka) fn event(
        aggregate_type: &str,
        event_type: &str,
        metadata: &str,
    ) -> Event {
        crate::event::sample(serde_json::json!({
            "aggregate_type": aggregate_type, "event_type": event_type,
            "aggregate_version": 3, "event_version": 2,
            "metadata": serde_json::from_str::<serde_json::Value>(metadata).unwrap(),
            "recorded_at": "2026-11-23T16:37:01.123987Z",
        }))
    }

    #[test]
    fn murmur2_matches_the_java_client() {
        // Kafka's UtilsTest.testMurmur2.
        for (key, hash) in [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, hash, "{key}");
        }
        assert_eq!(partition_for(b"21", 1), 0);
        assert_eq!(partition_for(b"21", 7), ((-973932308i32 & 0x7fff_ffff) % 7));
    }

    #[test]
    fn renders_topics() {
        let t = TopicTemplate::parse(super::super::DEFAULT_TOPIC).unwrap();
        assert_eq!(
            t.render(&event("Loan", "Loan.Funded", "{}")).unwrap(),
            "events.Loan"
        );
        let t = TopicTemplate::parse("app-{aggregate_type}.{event_type}").unwrap();
        assert_eq!(
            t.render(&event("Lo an/ü", "Loan.Funded", "{}")).unwrap(),
            "app-Lo_an__.Loan.Funded"
        );
        assert_eq!(t.render(&event("", "X", "{}")).unwrap(), "app-_.X");
        let long = "x".repeat(300);
        assert!(t.render(&event(&long, "X", "{}")).is_err());
    }

    #[test]
    fn refuses_bad_topic_templates() {
        for bad in [
            "",
            "events.{aggregate_id}",
            "events.{tenant}",
            "events.{aggregate_type",
            "events }",
            "ev ents",
            "events/{aggregate_type}",
            ".",
            "..",
        ] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad:?}");
        }
        assert!(TopicTemplate::parse(&"x".repeat(250)).is_err());
        assert!(TopicTemplate::parse("all-events").is_ok());
    }
}
