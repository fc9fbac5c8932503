//! What a new schema version breaks for consumers (and producers) of the previous one.
//!
//! Advisory and conservative: it compares the keywords that describe a payload's shape
//! (`type`, `properties`, `required`, `additionalProperties`, `enum`, `items`, bounds, `pattern`,
//! `format`), following local `$ref`s (`#/...`); combinators such as `anyOf` are not compared.
//! Pure functions over JSON values, unit-tested without a backend.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// One change of the new schema that an existing consumer or producer may trip over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where in the payload, as a JSON pointer; `*` stands for every item of an array.
    pub location: String,
    /// What kind of change, e.g. `required property added`.
    pub change: &'static str,
    /// The change in words (schema facts only).
    pub detail: String,
}

/// Lower bounds: the new schema narrows when it raises one (or adds one).
const LOWER_BOUNDS: [&str; 5] = [
    "minimum",
    "exclusiveMinimum",
    "minLength",
    "minItems",
    "minProperties",
];
/// Upper bounds: the new schema narrows when it lowers one (or adds one).
const UPPER_BOUNDS: [&str; 5] = [
    "maximum",
    "exclusiveMaximum",
    "maxLength",
    "maxItems",
    "maxProperties",
];

/// The breaking changes from `old` to `new`, in a stable order (by location, then kind).
pub fn breaking_changes(old: &Value, new: &Value) -> Vec<Change> {
    let mut changes = Vec::new();
    compare(old, old, new, new, "", &mut changes);
    changes.sort_by(|a, b| (&a.location, a.change).cmp(&(&b.location, b.change)));
    changes
}

/// A subschema with a local `$ref` followed (once per level, which is what shapes need).
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) if reference.starts_with('#') => {
            root.pointer(&reference[1..]).unwrap_or(schema)
        }
        _ => schema,
    }
}

/// The JSON types a schema allows; `None` when it does not restrict them.
fn types(schema: &Value) -> Option<BTreeSet<String>> {
    match schema.get("type")? {
        Value::String(t) => Some(BTreeSet::from([t.clone()])),
        Value::Array(ts) => Some(
            ts.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
        ),
        _ => None,
    }
}

fn allows(types: &BTreeSet<String>, t: &str) -> bool {
    types.contains(t) || (t == "integer" && types.contains("number"))
}

fn properties(schema: &Value) -> Option<&Map<String, Value>> {
    schema.get("properties").and_then(Value::as_object)
}

fn required(schema: &Value) -> BTreeSet<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Escapes a property name as one JSON pointer segment (RFC 6901).
pub fn pointer_segment(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

fn pointer(location: &str, name: &str) -> String {
    format!("{location}/{}", pointer_segment(name))
}

fn compare(
    old_root: &Value,
    old: &Value,
    new_root: &Value,
    new: &Value,
    location: &str,
    out: &mut Vec<Change>,
) {
    let old = resolve(old_root, old);
    let new = resolve(new_root, new);
    let mut push = |change: &'static str, detail: String| {
        out.push(Change {
            location: location.to_string(),
            change,
            detail,
        })
    };
    if let Some(new_types) = types(new) {
        let lost: Vec<String> = match types(old) {
            None => vec!["any type".to_string()],
            Some(old_types) => old_types
                .into_iter()
                .filter(|t| !allows(&new_types, t))
                .collect(),
        };
        if !lost.is_empty() {
            let now: Vec<&str> = new_types.iter().map(String::as_str).collect();
            push(
                "type narrowed",
                format!(
                    "no longer allows {}; now {}",
                    lost.join(", "),
                    now.join(", ")
                ),
            );
        }
    }
    if let Some(new_enum) = new.get("enum").and_then(Value::as_array) {
        match old.get("enum").and_then(Value::as_array) {
            None => push(
                "enum added",
                format!("only {} value(s) are allowed now", new_enum.len()),
            ),
            Some(old_enum) => {
                let removed: Vec<String> = old_enum
                    .iter()
                    .filter(|v| !new_enum.contains(v))
                    .map(Value::to_string)
                    .collect();
                if !removed.is_empty() {
                    push(
                        "enum values removed",
                        format!("no longer allows {}", removed.join(", ")),
                    );
                }
            }
        }
    }
    for bound in LOWER_BOUNDS {
        if let Some(n) = new.get(bound).and_then(Value::as_f64) {
            match old.get(bound).and_then(Value::as_f64) {
                Some(o) if n <= o => {}
                o => push("constraint tightened", bound_detail(bound, o, n)),
            }
        }
    }
    for bound in UPPER_BOUNDS {
        if let Some(n) = new.get(bound).and_then(Value::as_f64) {
            match old.get(bound).and_then(Value::as_f64) {
                Some(o) if n >= o => {}
                o => push("constraint tightened", bound_detail(bound, o, n)),
            }
        }
    }
    for keyword in ["pattern", "format"] {
        if let Some(n) = new.get(keyword) {
            if old.get(keyword) != Some(n) {
                push(
                    "constraint tightened",
                    format!("{keyword} is now {n} (was {})", shown(old.get(keyword))),
                );
            }
        }
    }
    let old_required = required(old);
    for name in required(new).difference(&old_required) {
        out.push(Change {
            location: pointer(location, name),
            change: "required property added",
            detail: format!("producers of the previous version may not send {name:?}"),
        });
    }
    let new_required = required(new);
    for name in old_required.difference(&new_required) {
        out.push(Change {
            location: pointer(location, name),
            change: "property no longer required",
            detail: format!("consumers of the previous version expect {name:?} to be present"),
        });
    }
    if new.get("additionalProperties") == Some(&Value::Bool(false))
        && old.get("additionalProperties") != Some(&Value::Bool(false))
    {
        out.push(Change {
            location: location.to_string(),
            change: "additional properties refused",
            detail: "properties the previous version did not name are refused now".to_string(),
        });
    }
    if let Some(old_properties) = properties(old) {
        let new_properties = properties(new);
        for (name, old_property) in old_properties {
            match new_properties.and_then(|p| p.get(name)) {
                None => out.push(Change {
                    location: pointer(location, name),
                    change: "property removed",
                    detail: format!(
                        "{name:?} is no longer described; consumers of the previous version read it"
                    ),
                }),
                Some(new_property) => compare(
                    old_root,
                    old_property,
                    new_root,
                    new_property,
                    &pointer(location, name),
                    out,
                ),
            }
        }
    }
    if let (Some(old_items), Some(new_items)) = (old.get("items"), new.get("items")) {
        if old_items.is_object() && new_items.is_object() {
            compare(
                old_root,
                old_items,
                new_root,
                new_items,
                &format!("{location}/*"),
                out,
            );
        }
    }
}

fn shown(value: Option<&Value>) -> String {
    value.map_or_else(|| "absent".to_string(), Value::to_string)
}

fn bound_detail(bound: &str, old: Option<f64>, new: f64) -> String {
    match old {
        Some(old) => format!("{bound} is now {new} (was {old})"),
        None => format!("{bound} {new} is new"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "type": "object",
            "required": ["loan_id", "amount"],
            "properties": {
                "loan_id": {"type": "string"},
                "amount": {"type": "number", "minimum": 0},
                "currency": {"enum": ["EUR", "USD", "PLN"]},
                "note": {"type": "string"},
                "borrower": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}
                },
                "tags": {"type": "array", "items": {"type": ["string", "number"]}}
            }
        })
    }

    /// Applies `edit` to a copy of the base schema.
    fn edited(edit: impl FnOnce(&mut Value)) -> Value {
        let mut schema = base();
        edit(&mut schema);
        schema
    }

    /// A case: its name, the new schema, the expected (location, change) pairs.
    type Case = (&'static str, Value, Vec<(&'static str, &'static str)>);

    #[test]
    fn compatibility_cases() {
        // An empty expectation means compatible.
        let cases: Vec<Case> = vec![
            ("unchanged", base(), vec![]),
            (
                "optional property added",
                edited(|s| {
                    s["properties"]["channel"] = json!({"type": "string"});
                }),
                vec![],
            ),
            (
                "type widened",
                edited(|s| s["properties"]["loan_id"]["type"] = json!(["string", "integer"])),
                vec![],
            ),
            (
                "integer to number is a widening",
                edited(|s| {
                    s["properties"]["borrower"]["properties"]["age"]["type"] = json!("number")
                }),
                vec![],
            ),
            (
                "required property added",
                edited(|s| s["required"] = json!(["loan_id", "amount", "currency"])),
                vec![("/currency", "required property added")],
            ),
            (
                "property no longer required",
                edited(|s| s["required"] = json!(["loan_id"])),
                vec![("/amount", "property no longer required")],
            ),
            (
                "type narrowed",
                edited(|s| s["properties"]["amount"]["type"] = json!("integer")),
                vec![("/amount", "type narrowed")],
            ),
            (
                "property removed",
                edited(|s| {
                    s["properties"].as_object_mut().unwrap().remove("note");
                }),
                vec![("/note", "property removed")],
            ),
            (
                "nested type narrowed",
                edited(|s| {
                    s["properties"]["borrower"]["properties"]["name"]["type"] = json!("null")
                }),
                vec![("/borrower/name", "type narrowed")],
            ),
            (
                "array item type narrowed",
                edited(|s| s["properties"]["tags"]["items"]["type"] = json!("string")),
                vec![("/tags/*", "type narrowed")],
            ),
            (
                "enum value removed",
                edited(|s| s["properties"]["currency"]["enum"] = json!(["EUR", "USD"])),
                vec![("/currency", "enum values removed")],
            ),
            (
                "enum value added",
                edited(|s| {
                    s["properties"]["currency"]["enum"] = json!(["EUR", "USD", "PLN", "CHF"])
                }),
                vec![],
            ),
            (
                "minimum raised",
                edited(|s| s["properties"]["amount"]["minimum"] = json!(100)),
                vec![("/amount", "constraint tightened")],
            ),
            (
                "maximum added",
                edited(|s| s["properties"]["note"]["maxLength"] = json!(10)),
                vec![("/note", "constraint tightened")],
            ),
            (
                "additional properties refused",
                edited(|s| s["additionalProperties"] = json!(false)),
                vec![("", "additional properties refused")],
            ),
            (
                "untyped becomes typed",
                edited(|s| s["properties"]["currency"]["type"] = json!("string")),
                vec![("/currency", "type narrowed")],
            ),
            (
                "a local $ref is followed",
                edited(|s| {
                    s["$defs"] = json!({"money": {"type": "integer"}});
                    s["properties"]["amount"] = json!({"$ref": "#/$defs/money"});
                }),
                vec![("/amount", "type narrowed")],
            ),
            (
                "several at once",
                edited(|s| {
                    s["required"] = json!(["loan_id", "amount", "note"]);
                    s["properties"].as_object_mut().unwrap().remove("tags");
                }),
                vec![
                    ("/note", "required property added"),
                    ("/tags", "property removed"),
                ],
            ),
        ];
        for (case, new, expected) in cases {
            let found: Vec<(String, &str)> = breaking_changes(&base(), &new)
                .into_iter()
                .map(|c| (c.location, c.change))
                .collect();
            let expected: Vec<(String, &str)> = expected
                .into_iter()
                .map(|(l, c)| (l.to_string(), c))
                .collect();
            assert_eq!(found, expected, "case {case:?}");
        }
    }
}
