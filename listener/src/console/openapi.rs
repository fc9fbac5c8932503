//! The OpenAPI 3.0 document of the console's API (`GET /api/openapi.json`).

use serde_json::{json, Value};

use super::params::{DEFAULT_LIMIT, MAX_LIMIT};

/// A name or id: what [`super::params::checked_text`] accepts.
fn text() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 1000, "pattern": "^[^\\u0000]*$"})
}

fn query(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description})
}

fn path(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": text(), "description": description})
}

fn limit() -> Value {
    query(
        "limit",
        json!({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}),
        "Page size.",
    )
}

fn cursor(name: &str, description: &str) -> Value {
    query(
        name,
        json!({"type": "integer", "format": "int64"}),
        description,
    )
}

fn time(name: &str, description: &str) -> Value {
    query(
        name,
        json!({"type": "string", "format": "date-time"}),
        description,
    )
}

fn reference(schema: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{schema}")})
}

/// A GET answering `schema` with 200, and the errors every route has.
fn get(summary: &str, role: &str, parameters: Vec<Value>, schema: &str, not_found: bool) -> Value {
    let mut responses = errors(not_found);
    responses["200"] = json!({"description": "OK", "content": {"application/json": {"schema": reference(schema)}}});
    json!({"get": {
        "summary": summary,
        "description": format!("Role: {role} or above."),
        "parameters": parameters,
        "responses": responses,
    }})
}

fn errors(not_found: bool) -> Value {
    let error = |description: &str| json!({"description": description, "content": {"application/json": {"schema": reference("Error")}}});
    let mut responses = json!({
        "400": error("A parameter is invalid (named in `parameter`)."),
        "401": error("No token, or an unknown one."),
        "403": error("The token's role is not allowed here."),
        "503": error("The database is unavailable."),
    });
    if not_found {
        responses["404"] = error("Not found.");
    }
    responses
}

fn nullable(schema: Value) -> Value {
    let mut schema = schema;
    schema["nullable"] = json!(true);
    schema
}

fn schemas() -> Value {
    let string = json!({"type": "string"});
    let integer = json!({"type": "integer", "format": "int64"});
    let time = json!({"type": "string", "format": "date-time"});
    let object = json!({"type": "object"});
    let event_properties = json!({
        "position": integer, "id": {"type": "string", "format": "uuid"},
        "aggregate_type": string, "aggregate_id": string, "aggregate_version": integer,
        "event_type": string, "event_version": integer, "occurred_at": time,
        "recorded_at": time,
        "payload": {"type": "object", "description": "Developer and operator only."},
        "metadata": {"type": "object", "description": "Developer and operator only."},
    });
    let event_required = json!([
        "position",
        "id",
        "aggregate_type",
        "aggregate_id",
        "aggregate_version",
        "event_type",
        "event_version",
        "occurred_at",
        "recorded_at"
    ]);
    let mut outbox_properties = event_properties.clone();
    for (key, schema) in [
        (
            "status",
            json!({"type": "string", "enum": ["pending", "delivered", "dead_lettered"]}),
        ),
        ("handler", nullable(string.clone())),
        ("last_error", nullable(string.clone())),
        ("attempts", nullable(integer.clone())),
        ("last_failed_at", nullable(time.clone())),
        ("redrive_requested_at", nullable(time.clone())),
    ] {
        outbox_properties[key] = schema;
    }
    let page = |item: &str, cursor: &str| {
        json!({"type": "object", "required": ["items", "next"], "properties": {
            "items": {"type": "array", "items": reference(item)},
            "next": nullable(json!({"type": "integer", "format": "int64", "description": format!("Pass as `{cursor}` for the next page; null on the last page.")})),
        }})
    };
    let list = |item: Value| json!({"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": item}}});
    json!({
        "Error": {"type": "object", "required": ["error", "message"], "properties": {
            "error": {"type": "string", "enum": ["bad_parameter", "unauthorized", "forbidden", "cross_site", "not_found", "unavailable"]},
            "message": string, "parameter": string}},
        "Event": {"type": "object", "required": event_required, "properties": event_properties},
        "EventPage": page("Event", "after_position"),
        "AggregatePage": page("Event", "after_version"),
        "OutboxEntry": {"type": "object", "required": event_required, "properties": outbox_properties},
        "OutboxPage": page("OutboxEntry", "after_position"),
        "DeadLetter": {"type": "object", "required": ["id", "subscription", "handler", "event_id", "position", "error", "attempts"], "properties": {
            "id": integer, "subscription": string, "handler": string,
            "event_id": {"type": "string", "format": "uuid"}, "position": integer,
            "error": string, "attempts": integer, "first_failed_at": time,
            "last_failed_at": time, "redrive_requested_at": nullable(time.clone()),
            "event_type": nullable(string.clone()), "aggregate_type": nullable(string.clone()),
            "aggregate_id": nullable(string.clone())}},
        "DeadLetterPage": page("DeadLetter", "after_id"),
        "EventTypes": list(string.clone()),
        "Subscriptions": list(json!({"type": "object", "required": ["name", "mode", "position"], "properties": {
            "name": string, "mode": {"type": "string", "enum": ["replication", "notify"]},
            "position": integer, "lsn": nullable(string.clone()), "updated_at": time,
            "events_behind": nullable(integer.clone()), "bytes_behind": nullable(integer.clone()),
            "slot_wal_retained": nullable(integer.clone()), "slot_active": nullable(json!({"type": "boolean"})),
            "slot_wal_status": nullable(string.clone()), "recovering": {"type": "boolean"}}})),
        "Handlers": list(json!({"type": "object", "required": ["name", "mode", "enabled"], "properties": {
            "name": string, "mode": {"type": "string", "enum": ["sync", "async"]},
            "enabled": {"type": "boolean"}, "priority": integer,
            "calls": nullable(integer.clone()), "successes": nullable(integer.clone()),
            "failures": nullable(integer.clone()), "total_ms": nullable(json!({"type": "number"})),
            "max_ms": nullable(json!({"type": "number"})), "last_error_at": nullable(time.clone()),
            "last_error": nullable(json!({"type": "string", "description": "Developer and operator only."}))}})),
        "RedriveRequest": {"type": "object", "required": ["subscription", "event_id"], "additionalProperties": false, "properties": {
            "subscription": text(), "event_id": {"type": "string", "format": "uuid"}}},
        "RedriveResult": {"type": "object", "required": ["redrive_requested"], "properties": {
            "redrive_requested": {"type": "integer", "minimum": 1}}},
        "Object": object,
    })
}

/// The whole document.
pub fn document() -> Value {
    let mut redrive_responses = errors(true);
    redrive_responses["200"] = json!({"description": "The dead letters of the event are marked for redelivery by the subscription's listener.",
        "content": {"application/json": {"schema": reference("RedriveResult")}}});
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "pg_domain_events operator console",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Read-only views of stored events, outboxes and dead letters, and the redrive of dead letters. Every route needs a bearer token; its role (viewer, developer, operator) decides what it may see. Pages are keyset-paginated: pass `next` back as the cursor parameter.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/events": get("Events by aggregate, type, time and position", "viewer (payload and metadata: developer)", vec![
                query("aggregate_type", text(), "Only this aggregate type."),
                query("aggregate_id", text(), "Only this aggregate id."),
                query("event_type", text(), "Only this event type."),
                time("from", "Recorded at or after this time."),
                time("to", "Recorded before this time."),
                cursor("after_position", "Events after this position (the previous page's `next`)."),
                limit(),
            ], "EventPage", false),
            "/api/aggregates/{aggregate_type}/{aggregate_id}": get("One aggregate's history, in version order", "viewer (payload and metadata: developer)", vec![
                path("aggregate_type", "The aggregate type."),
                path("aggregate_id", "The aggregate id."),
                cursor("after_version", "Versions after this one (the previous page's `next`)."),
                limit(),
            ], "AggregatePage", false),
            "/api/event-types": get("The event types stored", "viewer", vec![], "EventTypes", false),
            "/api/subscriptions": get("Subscriptions and their lag", "viewer", vec![], "Subscriptions", false),
            "/api/subscriptions/{name}/outbox": get("A subscription's outbox entries by status", "developer", vec![
                path("name", "The subscription."),
                query("status", json!({"type": "string", "enum": ["pending", "delivered", "dead_lettered", "all"], "default": "pending"}), "Entry status."),
                cursor("after_position", "Entries after this position (the previous page's `next`)."),
                limit(),
            ], "OutboxPage", true),
            "/api/dead-letters": get("Dead letters", "developer", vec![
                query("subscription", text(), "Only this subscription's."),
                cursor("after_id", "Dead letters after this id (the previous page's `next`)."),
                limit(),
            ], "DeadLetterPage", false),
            "/api/dead-letters/redrive": {"post": {
                "summary": "Redrive the dead letters of one event",
                "description": "Role: operator. The body must be application/json; a browser's cross-site request is refused (403).",
                "requestBody": {"required": true, "content": {"application/json": {"schema": reference("RedriveRequest")}}},
                "responses": redrive_responses,
            }},
            "/api/handlers": get("Handlers and their statistics", "viewer (last error: developer)", vec![], "Handlers", false),
            "/api/openapi.json": {"get": {"summary": "This document", "security": [],
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": reference("Object")}}}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
    })
}
