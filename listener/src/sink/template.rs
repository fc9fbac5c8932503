//! Destination templates with placeholders (`events.{aggregate_type}`), shared by the handlers
//! that name a destination per event: NATS subjects and Kafka topics. Each handler adds its own
//! rules for literals and rendered values.

use crate::event::Event;

/// A part of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Part {
    Literal(String),
    AggregateType,
    EventType,
    AggregateId,
}

impl Part {
    fn placeholder(name: &str) -> Option<Part> {
        match name {
            "aggregate_type" => Some(Part::AggregateType),
            "event_type" => Some(Part::EventType),
            "aggregate_id" => Some(Part::AggregateId),
            _ => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Part::Literal(_) => "",
            Part::AggregateType => "{aggregate_type}",
            Part::EventType => "{event_type}",
            Part::AggregateId => "{aggregate_id}",
        }
    }

    /// The event's value for a placeholder; `None` for a literal.
    pub(crate) fn value<'e>(&self, event: &'e Event) -> Option<&'e str> {
        match self {
            Part::Literal(_) => None,
            Part::AggregateType => Some(&event.aggregate_type),
            Part::EventType => Some(&event.event_type),
            Part::AggregateId => Some(&event.aggregate_id),
        }
    }
}

/// Splits `template` into literals and the placeholders in `allowed`, refusing unknown
/// placeholders, unbalanced braces and literal characters for which `literal_char` is false.
/// The error says what is wrong, without naming the template.
pub(crate) fn parse(
    template: &str,
    allowed: &[Part],
    literal_char: impl Fn(char) -> bool,
) -> Result<Vec<Part>, String> {
    if template.is_empty() {
        return Err("is empty".into());
    }
    let mut parts = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            Some(0) if rest.starts_with('{') => {
                let end = rest.find('}').ok_or("an unclosed '{'")?;
                let name = &rest[1..end];
                let part = Part::placeholder(name)
                    .filter(|p| allowed.contains(p))
                    .ok_or_else(|| {
                        let names: Vec<&str> = allowed.iter().map(Part::name).collect();
                        format!("unknown placeholder {{{name}}}; use {}", names.join(", "))
                    })?;
                parts.push(part);
                rest = &rest[end + 1..];
            }
            Some(0) => return Err("a '}' without '{'".into()),
            found => {
                let end = found.unwrap_or(rest.len());
                let literal = &rest[..end];
                if let Some(c) = literal.chars().find(|&c| !literal_char(c)) {
                    return Err(format!("the character {c:?} is not allowed"));
                }
                parts.push(Part::Literal(literal.to_string()));
                rest = &rest[end..];
            }
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_literals_and_placeholders() {
        let parts = parse(
            "a.{aggregate_type}-{event_type}",
            &[Part::AggregateType, Part::EventType],
            |c| c != ' ',
        )
        .unwrap();
        assert_eq!(
            parts,
            [
                Part::Literal("a.".into()),
                Part::AggregateType,
                Part::Literal("-".into()),
                Part::EventType
            ]
        );
    }

    #[test]
    fn refuses_what_is_not_allowed() {
        let allowed = [Part::AggregateType];
        let err = |t: &str| parse(t, &allowed, |c| c != ' ').unwrap_err();
        assert_eq!(err(""), "is empty");
        assert_eq!(err("a.{aggregate_type"), "an unclosed '{'");
        assert_eq!(err("a}"), "a '}' without '{'");
        assert_eq!(
            err("a.{aggregate_id}"),
            "unknown placeholder {aggregate_id}; use {aggregate_type}"
        );
        assert_eq!(err("a b"), "the character ' ' is not allowed");
    }
}
