//! Roles and tokens. A request carries a token as `Authorization: Bearer <token>` (the API) or
//! in the console's session cookie (the page); the token names the role.

use std::borrow::Cow;

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::role::Role;

/// The name of the page's session cookie (`HttpOnly`, `SameSite=Strict`).
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

/// The token a request carries: the bearer token, else the session cookie (which holds it
/// hex-encoded, so that any token is a valid cookie value).
pub fn token(headers: &HeaderMap) -> Option<Cow<'_, [u8]>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match bearer {
        Some(token) => Some(Cow::Borrowed(token)),
        None => session_cookie(headers).map(Cow::Owned),
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<Vec<u8>> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .find_map(|pair| {
            pair.strip_prefix(SESSION_COOKIE.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
        })
        .filter(|v| !v.is_empty())
        .and_then(|v| hex::decode(v).ok())
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
        headers.insert(
            header::COOKIE,
            "a=1; pgde_console=746f6b; b=2".parse().unwrap(),
        );
        assert_eq!(token(&headers).as_deref(), Some(&b"tok"[..]));
        headers.insert(header::AUTHORIZATION, "Bearer other".parse().unwrap());
        assert_eq!(token(&headers).as_deref(), Some(&b"other"[..]));
    }
}
