//! Where an event is published: the subject template, and stream names.

use super::super::template::{self, Part};
use crate::event::Event;

/// Why a subject template or a stream name is not usable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SubjectError(String);

/// A subject template such as `events.{aggregate_type}.{event_type}`.
///
/// Placeholders: `{aggregate_type}`, `{event_type}`, `{aggregate_id}`. Values are made valid
/// subject tokens: in the type names (dot-separated by design, so `Loan.Funded` spans two
/// tokens) and in the aggregate id (where a dot is replaced too) every character other than an
/// ASCII letter, digit, `-` or `_` becomes `_`, and an empty token becomes `_`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    parts: Vec<Part>,
    template: String,
}

impl SubjectTemplate {
    /// Parses `template`, refusing unknown placeholders, unbalanced braces, empty tokens, and
    /// characters that are not allowed in a subject (whitespace, `*`, `>`, non-ASCII).
    pub fn parse(template: &str) -> Result<SubjectTemplate, SubjectError> {
        let err = |why: String| SubjectError(format!("subject {template:?}: {why}"));
        let parts = template::parse(
            template,
            &[Part::AggregateType, Part::EventType, Part::AggregateId],
            |c| c.is_ascii_graphic() && !matches!(c, '*' | '>'),
        )
        .map_err(err)?;
        // Placeholders never render empty, so checking the literals' dots is enough.
        let shape: String = parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.as_str(),
                _ => "x",
            })
            .collect();
        if shape.split('.').any(str::is_empty) {
            return Err(err(
                "has an empty token (leading, trailing or double dot)".into()
            ));
        }
        Ok(SubjectTemplate {
            parts,
            template: template.to_string(),
        })
    }

    /// The template as written (a bounded metric label, unlike the rendered names).
    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The subject of `event`.
    pub fn render(&self, event: &Event) -> String {
        let mut subject = String::with_capacity(self.template.len() + 32);
        for part in &self.parts {
            match part {
                Part::Literal(s) => subject.push_str(s),
                Part::AggregateId => push_token(&mut subject, &event.aggregate_id),
                type_name => push_name(&mut subject, type_name.value(event).unwrap_or_default()),
            }
        }
        subject
    }

    /// The subject filter a created stream captures: the fixed tokens before the first
    /// placeholder, then `>` (`events.>` for the default); the template itself when it has no
    /// placeholder; `None` when it starts with a placeholder (no safe filter exists).
    pub fn stream_subject(&self) -> Option<String> {
        if !self.parts.iter().any(|p| !matches!(p, Part::Literal(_))) {
            return Some(self.template.clone());
        }
        let Some(Part::Literal(first)) = self.parts.first() else {
            return None;
        };
        let fixed = &first[..first.rfind('.')? + 1];
        Some(format!("{fixed}>"))
    }
}

fn token_char(c: char) -> char {
    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
        c
    } else {
        '_'
    }
}

/// A dot-separated name: each segment made a token.
fn push_name(subject: &mut String, name: &str) {
    for (i, segment) in name.split('.').enumerate() {
        if i > 0 {
            subject.push('.');
        }
        push_token(subject, segment);
    }
}

/// One token: disallowed characters (dots included) become `_`; empty becomes `_`.
fn push_token(subject: &mut String, value: &str) {
    if value.is_empty() {
        subject.push('_');
    }
    subject.extend(value.chars().map(token_char));
}

/// Checks a JetStream stream name: 1-255 ASCII letters, digits, `-` or `_`.
pub fn check_stream_name(name: &str) -> Result<(), SubjectError> {
    if name.is_empty()
        || name.len() > 255
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(SubjectError(format!(
            "stream {name:?}: use 1-255 ASCII letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(aggregate_type: &str, aggregate_id: &str, event_type: &str) -> Event {
        crate::event::sample(serde_json::json!({
            "aggregate_type": aggregate_type, "aggregate_id": aggregate_id,
            "event_type": event_type,
        }))
    }

    #[test]
    fn renders_placeholders_as_valid_tokens() {
        let t = SubjectTemplate::parse(super::super::DEFAULT_SUBJECT).unwrap();
        assert_eq!(
            t.render(&event("Loan", "42", "Loan.Funded")),
            "events.Loan.Loan.Funded"
        );
        let t = SubjectTemplate::parse("app.{aggregate_type}.{aggregate_id}.x").unwrap();
        assert_eq!(
            t.render(&event("Loan", "a.b *>c d@e", "Loan.Funded")),
            "app.Loan.a_b___c_d_e.x"
        );
        assert_eq!(t.render(&event("Lo*an", "", "X")), "app.Lo_an._.x");
    }

    #[test]
    fn refuses_bad_templates() {
        for bad in [
            "",
            "events.{aggregate}",
            "events.{event_type",
            "events.}",
            "events..{event_type}",
            ".events.{event_type}",
            "events.{event_type}.",
            "events.*",
            "events.>",
            "ev ents.{event_type}",
        ] {
            assert!(SubjectTemplate::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stream_subject_is_the_fixed_prefix() {
        let subject = |t: &str| SubjectTemplate::parse(t).unwrap().stream_subject();
        assert_eq!(
            subject(super::super::DEFAULT_SUBJECT).as_deref(),
            Some("events.>")
        );
        assert_eq!(subject("a.b.{event_type}.c").as_deref(), Some("a.b.>"));
        assert_eq!(subject("a.b-{event_type}").as_deref(), Some("a.>"));
        assert_eq!(subject("all.events").as_deref(), Some("all.events"));
        assert_eq!(subject("{aggregate_type}.events"), None);
        assert_eq!(subject("x{aggregate_type}.events"), None);
    }

    #[test]
    fn stream_names() {
        assert!(check_stream_name("DOMAIN_EVENTS").is_ok());
        assert!(check_stream_name("a.b").is_err());
        assert!(check_stream_name("").is_err());
        assert!(check_stream_name("a b").is_err());
    }
}
