//! What the API and the page show, read from the database: each function takes the checked
//! parameters of its view and the caller's role, and returns JSON values shaped as the OpenAPI
//! document says.

use serde_json::{json, Value};

use super::db::Db;
use super::error::ApiError;
use super::params::{checked_text, Params};
use super::queries;
use super::role::Role;

/// The query parameters of [`events`].
pub const EVENT_FILTERS: [&str; 7] = [
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "from",
    "to",
    "after_position",
    "limit",
];
/// The query parameters of [`aggregate`].
pub const AGGREGATE_PAGING: [&str; 2] = ["after_version", "limit"];
/// The query parameters of [`outbox`].
pub const OUTBOX_FILTERS: [&str; 3] = ["status", "after_position", "limit"];
/// The statuses [`outbox`] filters by.
pub const OUTBOX_STATUSES: [&str; 4] = ["pending", "delivered", "dead_lettered", "all"];
/// The query parameters of [`dead_letters`].
pub const DEAD_LETTER_FILTERS: [&str; 3] = ["subscription", "after_id", "limit"];

/// A page of items and the cursor of the next one (null on the last page).
pub struct Page {
    /// The items, in cursor order.
    pub items: Vec<Value>,
    /// The value to pass as the cursor parameter for the next page.
    pub next: Value,
}

impl Page {
    /// `items` of a page of `limit`: `next` is `key` of the last item when the page is full.
    fn of(items: Vec<Value>, limit: i64, key: &str) -> Page {
        let full = i64::try_from(items.len()).unwrap_or(i64::MAX) >= limit;
        let next = items
            .last()
            .filter(|_| full)
            .map_or(Value::Null, |last| last[key].clone());
        Page { items, next }
    }

    /// `{"items": [...], "next": ...}`.
    pub fn to_json(&self) -> Value {
        json!({"items": self.items, "next": self.next})
    }
}

/// Events by aggregate, type, time range and position; payloads for developers and above.
pub async fn events(db: &Db, p: &Params, role: Role) -> Result<Page, ApiError> {
    let (aggregate_type, aggregate_id) = (p.text("aggregate_type")?, p.text("aggregate_id")?);
    let event_type = p.text("event_type")?;
    let (from, to) = (p.time("from")?, p.time("to")?);
    let after = p.integer("after_position")?.unwrap_or(0);
    let limit = p.limit()?;
    let payloads = role >= Role::Developer;
    let client = db.reader().await?;
    let sql = if event_type.is_some() {
        queries::EVENTS_OF_TYPE
    } else {
        queries::EVENTS
    };
    let items = queries::rows(
        &client,
        sql,
        &[
            &aggregate_type,
            &aggregate_id,
            &event_type,
            &from,
            &to,
            &after,
            &limit,
            &payloads,
        ],
        "listing events",
    )
    .await?;
    Ok(Page::of(items, limit, "position"))
}

/// One aggregate's events in version order.
pub async fn aggregate(
    db: &Db,
    aggregate_type: &str,
    aggregate_id: &str,
    p: &Params,
    role: Role,
) -> Result<Page, ApiError> {
    checked_text("aggregate_type", aggregate_type)?;
    checked_text("aggregate_id", aggregate_id)?;
    let after = p.integer("after_version")?.unwrap_or(0);
    let limit = p.limit()?;
    let payloads = role >= Role::Developer;
    let client = db.reader().await?;
    let items = queries::rows(
        &client,
        queries::AGGREGATE,
        &[&aggregate_type, &aggregate_id, &after, &limit, &payloads],
        "reading an aggregate's history",
    )
    .await?;
    Ok(Page::of(items, limit, "aggregate_version"))
}

/// A subscription's outbox entries by status (404 for an unknown subscription).
pub async fn outbox(db: &Db, name: &str, p: &Params) -> Result<Page, ApiError> {
    checked_text("name", name)?;
    let status = p.choice("status", &OUTBOX_STATUSES, "pending")?;
    let after = p.integer("after_position")?;
    let limit = p.limit()?;
    let client = db.reader().await?;
    let exists = queries::rows(
        &client,
        queries::SUBSCRIPTION_EXISTS,
        &[&name],
        "looking up a subscription",
    )
    .await?;
    if exists.first() != Some(&Value::Bool(true)) {
        return Err(ApiError::NotFound(format!(
            "subscription {name:?} does not exist"
        )));
    }
    let items = queries::rows(
        &client,
        queries::OUTBOX,
        &[&name, &status, &limit, &after],
        "listing an outbox",
    )
    .await?;
    Ok(Page::of(items, limit, "position"))
}

/// Dead letters, of one subscription or all, in id order.
pub async fn dead_letters(db: &Db, p: &Params) -> Result<Page, ApiError> {
    let subscription = p.text("subscription")?;
    let after = p.integer("after_id")?.unwrap_or(0);
    let limit = p.limit()?;
    let client = db.reader().await?;
    let items = queries::rows(
        &client,
        queries::DEAD_LETTERS,
        &[&subscription, &after, &limit],
        "listing dead letters",
    )
    .await?;
    Ok(Page::of(items, limit, "id"))
}

/// A list without parameters: event types, subscriptions, handlers.
pub async fn list(db: &Db, what: List, role: Role) -> Result<Vec<Value>, ApiError> {
    let client = db.reader().await?;
    let errors = role >= Role::Developer;
    let items = match what {
        List::EventTypes => {
            queries::rows(&client, queries::EVENT_TYPES, &[], "listing event types").await?
        }
        List::Subscriptions => {
            queries::rows(
                &client,
                queries::SUBSCRIPTIONS,
                &[],
                "listing subscriptions",
            )
            .await?
        }
        List::Handlers => {
            queries::rows(&client, queries::HANDLERS, &[&errors], "listing handlers").await?
        }
    };
    Ok(items)
}

/// The lists [`list`] reads.
#[derive(Debug, Clone, Copy)]
pub enum List {
    /// The distinct event types.
    EventTypes,
    /// Subscriptions with their lag.
    Subscriptions,
    /// Handlers with their statistics (the last error for developers and above).
    Handlers,
}
