//! Roles and tokens. A request carries a token as `Authorization: Bearer <token>` (the API) or
//! in the console's session cookie (the page); the token names the role.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::role::Role;

/// The name of the page's session cookie (`HttpOnly`, `SameSite=Strict`, `Max-Age`).
pub const SESSION_COOKIE: &str = "pgde_console";

/// The configured tokens, kept as SHA-256 digests.
pub struct Tokens {
    digests: Vec<(Role, [u8; 32])>,
}

impl Tokens {
    /// Tokens and the role each grants.
    pub fn new(tokens: impl IntoIterator<Item = (Role, String)>) -> Tokens {
        Tokens {
            digests: tokens
                .into_iter()
                .map(|(role, token)| (role, Sha256::digest(token.as_bytes()).into()))
                .collect(),
        }
    }

    /// The role `given` grants. The guess is hashed and compared with every digest in constant
    /// time, so neither its length nor its content nor which role matched shows in the timing.
    pub fn role_of(&self, given: &[u8]) -> Option<Role> {
        let given: [u8; 32] = Sha256::digest(given).into();
        self.digests.iter().fold(None, |found, (role, digest)| {
            let matched = bool::from(given.ct_eq(digest));
            if matched {
                found.max(Some(*role))
            } else {
                found
            }
        })
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The session cookie's value for `token`, valid for `max_age_secs` from now: the token
/// hex-encoded (so that any token is a valid cookie value), a dot, and the expiry in Unix
/// seconds. The console checks the expiry itself, not only the browser: a cookie a browser
/// restores past its `Max-Age` signs nobody in. (Forging a later expiry needs the token, which
/// grants access anyway.)
pub fn session_value(token: &[u8], max_age_secs: u64) -> String {
    format!(
        "{}.{}",
        hex::encode(token),
        now_secs().saturating_add(max_age_secs)
    )
}

/// The token a request carries: the bearer token, else the session cookie if it has not
/// expired.
pub fn token(headers: &HeaderMap) -> Option<Cow<'_, [u8]>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match bearer {
        Some(token) => Some(Cow::Borrowed(token)),
        None => session_cookie(headers, now_secs()).map(Cow::Owned),
    }
}

/// The token in the session cookie, if its expiry is after `now`.
fn session_cookie(headers: &HeaderMap, now: u64) -> Option<Vec<u8>> {
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .find_map(|pair| {
            pair.strip_prefix(SESSION_COOKIE.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
        })?;
    let dot = value.iter().position(|b| *b == b'.')?;
    let (token, expires) = (&value[..dot], &value[dot + 1..]);
    let expires: u64 = std::str::from_utf8(expires).ok()?.parse().ok()?;
    if token.is_empty() || expires <= now {
        return None;
    }
    hex::decode(token).ok()
}

/// The caller's role, if it is at least `needed`: 401 without a known token, 403 below it.
pub fn require(tokens: &Tokens, headers: &HeaderMap, needed: Role) -> Result<Role, ApiError> {
    let role = token(headers)
        .and_then(|t| tokens.role_of(&t))
        .ok_or(ApiError::Unauthorized)?;
    if role < needed {
        return Err(ApiError::Forbidden { needed });
    }
    Ok(role)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_the_highest_matching_role() {
        let tokens = Tokens::new([
            (Role::Viewer, "v".to_string()),
            (Role::Operator, "o".to_string()),
            (Role::Developer, "o".to_string()),
        ]);
        assert_eq!(tokens.role_of(b"v"), Some(Role::Viewer));
        assert_eq!(tokens.role_of(b"o"), Some(Role::Operator));
        assert_eq!(tokens.role_of(b"x"), None);
        assert_eq!(tokens.role_of(b""), None);
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        let mut headers = HeaderMap::new();
        let value = session_value(b"tok", 60);
        headers.insert(
            header::COOKIE,
            format!("a=1; pgde_console={value}; b=2").parse().unwrap(),
        );
        assert_eq!(token(&headers).as_deref(), Some(&b"tok"[..]));
        headers.insert(header::AUTHORIZATION, "Bearer other".parse().unwrap());
        assert_eq!(token(&headers).as_deref(), Some(&b"other"[..]));
    }

    #[test]
    fn an_expired_or_undated_cookie_carries_no_token() {
        let cookie = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::COOKIE,
                format!("pgde_console={value}").parse().unwrap(),
            );
            headers
        };
        assert_eq!(
            session_cookie(&cookie("746f6b.1000"), 999).as_deref(),
            Some(&b"tok"[..])
        );
        assert_eq!(session_cookie(&cookie("746f6b.1000"), 1000), None);
        assert_eq!(session_cookie(&cookie("746f6b"), 0), None, "no expiry");
        assert_eq!(session_cookie(&cookie("746f6b.soon"), 0), None);
        assert_eq!(session_cookie(&cookie(".1000"), 0), None);
    }
}
