//! The console's roles.

/// What a token allows; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Counts, lag, event types and handler statistics; no payloads or metadata.
    Viewer,
    /// Also payloads, metadata, outbox entries and dead letters.
    Developer,
    /// Also redrive of dead letters.
    Operator,
}

impl Role {
    /// Every role, lowest first (the order of the `*_token_env` keys).
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Developer, Role::Operator];

    /// The role's name as the API and the documentation spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Operator => "operator",
        }
    }
}
