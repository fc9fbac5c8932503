//! HTML of the page's views. Every value from the database is escaped; links carry their
//! parameters URL-encoded.

use std::fmt::Write;

use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::data::{Page, OUTBOX_STATUSES};
use super::error::ApiError;
use super::params::Params;
use super::role::Role;

/// The page's views, in the order of its navigation bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Events with filters.
    Events,
    /// One aggregate's timeline with payload diffs.
    Aggregate,
    /// A subscription's outbox by status.
    Outbox,
    /// Dead letters, with redrive buttons for operators.
    DeadLetters,
    /// Handler statistics.
    Handlers,
    /// Subscription lag.
    Subscriptions,
}

impl View {
    /// The `view` parameter's values.
    pub const NAMES: [&'static str; 6] = [
        "events",
        "aggregate",
        "outbox",
        "dead-letters",
        "handlers",
        "subscriptions",
    ];
    const ALL: [View; 6] = [
        View::Events,
        View::Aggregate,
        View::Outbox,
        View::DeadLetters,
        View::Handlers,
        View::Subscriptions,
    ];

    /// The view named `name` (one of [`View::NAMES`]).
    pub fn from_name(name: &str) -> View {
        let at = View::NAMES.iter().position(|n| *n == name).unwrap_or(0);
        View::ALL[at]
    }

    fn name(self) -> &'static str {
        View::NAMES[View::ALL.iter().position(|v| *v == self).unwrap_or(0)]
    }

    /// The lowest role that may open the view.
    pub fn needs(self) -> Role {
        match self {
            View::Outbox | View::DeadLetters => Role::Developer,
            _ => Role::Viewer,
        }
    }
}

/// `text` escaped for HTML text and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as text: strings bare, everything else as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `/?view=…&k=v…`, escaped for an attribute.
fn link(view: View, pairs: &[(&str, &str)]) -> String {
    let mut query = vec![("view", view.name())];
    query.extend_from_slice(pairs);
    esc(&format!(
        "/?{}",
        serde_urlencoded::to_string(&query).unwrap_or_default()
    ))
}

/// The whole document around a view's `body`.
pub fn layout(current: View, role: Role, body: &str) -> String {
    let mut nav = String::new();
    for view in View::ALL
        .into_iter()
        .filter(|v| *v != View::Aggregate && role >= v.needs())
    {
        let class = if view == current {
            " class=\"current\""
        } else {
            ""
        };
        let _ = write!(
            nav,
            "<a href=\"{}\"{class}>{}</a>",
            link(view, &[]),
            view.name().replace('-', " ")
        );
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>pg_domain_events console</title>\
         <link rel=\"stylesheet\" href=\"/console.css\"><script src=\"/console.js\" defer></script></head>\
         <body><header><strong>pg_domain_events</strong>{nav}<span class=\"role\" id=\"role\">{}</span>\
         <form method=\"post\" action=\"/session/end\"><button type=\"submit\">sign out</button></form></header>\
         <main>{body}</main></body></html>",
        role.name()
    )
}

/// The sign-in form, with an optional message.
pub fn sign_in(message: Option<&str>) -> String {
    let message = message.map_or(String::new(), |m| {
        format!("<p class=\"error\">{}</p>", esc(m))
    });
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign in: pg_domain_events console</title>\
         <link rel=\"stylesheet\" href=\"/console.css\"></head><body><form class=\"signin\" method=\"post\" action=\"/session\">\
         <h1>pg_domain_events console</h1>{message}<label>Token<input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\"></label>\
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form></body></html>"
    )
}

/// An error in place of a view.
pub fn error(status: StatusCode, message: &str) -> String {
    format!(
        "<p class=\"error\" id=\"error\">{} {}</p>",
        status.as_u16(),
        esc(message)
    )
}

fn field(p: &Params, name: &str, label: &str) -> Result<String, ApiError> {
    let value = p.text(name)?.unwrap_or_default();
    Ok(format!(
        "<label>{label}<input name=\"{name}\" id=\"{name}\" value=\"{}\"></label>",
        esc(&value)
    ))
}

/// The event list with its filters.
pub fn events(page: &Page, p: &Params, role: Role) -> Result<String, ApiError> {
    let mut out = String::from("<h1>Events</h1><form class=\"filters\" method=\"get\" action=\"/\"><input type=\"hidden\" name=\"view\" value=\"events\">");
    for (name, label) in [
        ("aggregate_type", "Aggregate type"),
        ("aggregate_id", "Aggregate id"),
        ("event_type", "Event type"),
    ] {
        out.push_str(&field(p, name, label)?);
    }
    out.push_str("<button type=\"submit\" id=\"filter\">Filter</button></form><table id=\"events\"><tr><th>position</th><th>recorded</th><th>aggregate</th><th>version</th><th>event type</th>");
    if role >= Role::Developer {
        out.push_str("<th>payload</th>");
    }
    out.push_str("</tr>");
    for e in &page.items {
        let (kind, id) = (plain(&e["aggregate_type"]), plain(&e["aggregate_id"]));
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td><a class=\"aggregate\" href=\"{}\">{}/{}</a></td><td>{}</td><td>{}</td>",
            e["position"], esc(&plain(&e["recorded_at"])),
            link(View::Aggregate, &[("aggregate_type", &kind), ("aggregate_id", &id)]),
            esc(&kind), esc(&id), e["aggregate_version"], esc(&plain(&e["event_type"]))
        );
        if role >= Role::Developer {
            let _ = write!(
                out,
                "<td class=\"json payload\">{}</td>",
                esc(&e["payload"].to_string())
            );
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    if let Some(next) = page.next.as_i64() {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        for name in ["aggregate_type", "aggregate_id", "event_type"] {
            if let Some(v) = p.text(name)? {
                pairs.push((name, v));
            }
        }
        pairs.push(("after_position", next.to_string()));
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let _ = write!(
            out,
            "<a class=\"next\" href=\"{}\">next page</a>",
            link(View::Events, &pairs)
        );
    }
    Ok(out)
}

/// What changed between two payloads, key by key (top level).
fn diff(before: Option<&Map<String, Value>>, after: &Map<String, Value>) -> String {
    let empty = Map::new();
    let before = before.unwrap_or(&empty);
    let mut out = String::from("<ul class=\"diff\">");
    for (key, value) in after {
        match before.get(key) {
            None => {
                let _ = write!(
                    out,
                    "<li class=\"added\">+ {}: {}</li>",
                    esc(key),
                    esc(&value.to_string())
                );
            }
            Some(old) if old != value => {
                let _ = write!(
                    out,
                    "<li class=\"changed\">~ {}: {} → {}</li>",
                    esc(key),
                    esc(&old.to_string()),
                    esc(&value.to_string())
                );
            }
            Some(_) => {}
        }
    }
    for (key, value) in before.iter().filter(|(k, _)| !after.contains_key(*k)) {
        let _ = write!(
            out,
            "<li class=\"removed\">- {}: {}</li>",
            esc(key),
            esc(&value.to_string())
        );
    }
    out.push_str("</ul>");
    out
}

/// One aggregate's timeline; developers see each version's payload diff to the one before.
pub fn timeline(kind: &str, id: &str, page: &Page, role: Role) -> String {
    let mut out = format!(
        "<h1>{} {}</h1><ol class=\"timeline\" id=\"timeline\">",
        esc(kind),
        esc(id)
    );
    let mut previous: Option<&Map<String, Value>> = None;
    for e in &page.items {
        let _ = write!(
            out,
            "<li class=\"version\"><strong>v{}</strong> {} <small>{}</small>",
            e["aggregate_version"],
            esc(&plain(&e["event_type"])),
            esc(&plain(&e["recorded_at"]))
        );
        if role >= Role::Developer {
            if let Some(payload) = e["payload"].as_object() {
                out.push_str(&diff(previous, payload));
                previous = Some(payload);
            }
        }
        out.push_str("</li>");
    }
    out.push_str("</ol>");
    if let Some(next) = page.next.as_i64() {
        let next = next.to_string();
        let _ = write!(
            out,
            "<a class=\"next\" href=\"{}\">later versions</a>",
            link(
                View::Aggregate,
                &[
                    ("aggregate_type", kind),
                    ("aggregate_id", id),
                    ("after_version", &next)
                ]
            )
        );
    }
    out
}

/// A subscription's outbox by status.
pub fn outbox(
    subscriptions: &[Value],
    chosen: Option<&str>,
    page: Option<&Page>,
    p: &Params,
) -> Result<String, ApiError> {
    let status = p.choice("status", &OUTBOX_STATUSES, "pending")?;
    let mut out = String::from("<h1>Outbox</h1><form class=\"filters\" method=\"get\" action=\"/\"><input type=\"hidden\" name=\"view\" value=\"outbox\"><label>Subscription<select name=\"subscription\" id=\"subscription\">");
    for s in subscriptions {
        let name = plain(&s["name"]);
        let selected = if Some(name.as_str()) == chosen {
            " selected"
        } else {
            ""
        };
        let _ = write!(out, "<option{selected}>{}</option>", esc(&name));
    }
    out.push_str("</select></label><label>Status<select name=\"status\" id=\"status\">");
    for s in OUTBOX_STATUSES {
        let selected = if s == status { " selected" } else { "" };
        let _ = write!(out, "<option{selected}>{s}</option>");
    }
    out.push_str("</select></label><button type=\"submit\">Show</button></form>");
    let Some(page) = page else {
        out.push_str("<p>No subscription yet.</p>");
        return Ok(out);
    };
    out.push_str("<table id=\"outbox\"><tr><th>position</th><th>status</th><th>aggregate</th><th>event type</th><th>handler</th><th>last error</th></tr>");
    for e in &page.items {
        let state = plain(&e["status"]);
        let _ = write!(
            out,
            "<tr><td>{}</td><td class=\"status-{}\">{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e["position"], esc(&state), esc(&state), esc(&plain(&e["aggregate_type"])), esc(&plain(&e["aggregate_id"])),
            esc(&plain(&e["event_type"])), esc(&plain(&e["handler"])), esc(&plain(&e["last_error"]))
        );
    }
    out.push_str("</table>");
    if let (Some(next), Some(name)) = (page.next.as_i64(), chosen) {
        let next = next.to_string();
        let _ = write!(
            out,
            "<a class=\"next\" href=\"{}\">next page</a>",
            link(
                View::Outbox,
                &[
                    ("subscription", name),
                    ("status", status),
                    ("after_position", &next)
                ]
            )
        );
    }
    Ok(out)
}

/// Dead letters; operators get a redrive button per row.
pub fn dead_letters(page: &Page, role: Role) -> String {
    let mut out = String::from("<h1>Dead letters</h1><table id=\"dead-letters\"><tr><th>subscription</th><th>handler</th><th>event</th><th>attempts</th><th>last failed</th><th>error</th><th></th></tr>");
    for d in &page.items {
        let (subscription, event_id) = (plain(&d["subscription"]), plain(&d["event_id"]));
        let button = if role >= Role::Operator {
            format!("<button class=\"redrive\" data-subscription=\"{}\" data-event-id=\"{}\">redrive</button>", esc(&subscription), esc(&event_id))
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<tr class=\"dead-letter\" data-event-id=\"{}\"><td>{}</td><td>{}</td><td>{} {}/{}</td><td>{}</td><td>{}</td><td>{}</td><td>{button}</td></tr>",
            esc(&event_id), esc(&subscription), esc(&plain(&d["handler"])), esc(&plain(&d["event_type"])),
            esc(&plain(&d["aggregate_type"])), esc(&plain(&d["aggregate_id"])), d["attempts"],
            esc(&plain(&d["last_failed_at"])), esc(&plain(&d["error"]))
        );
    }
    out.push_str("</table>");
    out
}

/// A table of `columns` of each item.
fn table(id: &str, title: &str, items: &[Value], columns: &[&str]) -> String {
    let mut out = format!("<h1>{title}</h1><table id=\"{id}\"><tr>");
    for c in columns {
        let _ = write!(out, "<th>{}</th>", c.replace('_', " "));
    }
    out.push_str("</tr>");
    for item in items {
        out.push_str("<tr>");
        for c in columns {
            let _ = write!(out, "<td>{}</td>", esc(&plain(&item[*c])));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}

/// Handler statistics.
pub fn handlers(items: &[Value]) -> String {
    table(
        "handlers",
        "Handlers",
        items,
        &[
            "name",
            "mode",
            "enabled",
            "priority",
            "calls",
            "successes",
            "failures",
            "total_ms",
            "max_ms",
            "last_error_at",
        ],
    )
}

/// Subscription lag.
pub fn subscriptions(items: &[Value]) -> String {
    table(
        "subscriptions",
        "Subscriptions",
        items,
        &[
            "name",
            "mode",
            "position",
            "events_behind",
            "bytes_behind",
            "slot_active",
            "slot_wal_status",
            "recovering",
            "updated_at",
        ],
    )
}
