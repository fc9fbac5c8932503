//! Response headers every console answer carries, and the cross-site check of POSTs.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;

/// Scripts, styles and requests from the console's own origin only; no framing, no inline code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Adds the security headers (CSP, no-sniff, frame-deny, referrer for this origin only, no
/// caching). Not `no-referrer`: with it a browser sends `Origin: null` on the console's own form
/// posts, which the cross-site check must refuse.
pub async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Refuses a POST another site could have made a browser send: its body must be JSON (an HTML
/// form cannot send that without a CORS preflight, which the console never grants), and it
/// must pass [`same_origin_form`].
pub fn same_origin_post(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::CrossSite("the body must be application/json"));
    }
    same_origin_form(headers)
}

/// Refuses a form POST from another site: `Sec-Fetch-Site` and `Origin`, when the browser sends
/// them, must name this origin (the session cookie is `SameSite=Strict` besides).
pub fn same_origin_form(headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(site) = headers.get("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return Err(ApiError::CrossSite("Sec-Fetch-Site is not same-origin"));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, rest)| rest);
        if host.is_none() || origin_host != host {
            return Err(ApiError::CrossSite("Origin is not this console"));
        }
    }
    Ok(())
}
