//! What the console's routes share.

use super::auth::Tokens;
use super::db::Db;

/// The console's tokens and connections.
pub struct Console {
    /// The configured tokens.
    pub tokens: Tokens,
    /// The console's connections.
    pub db: Db,
    /// How long a sign-in on the page lasts (`console.session_max_age_secs`).
    pub session_max_age_secs: u64,
}
