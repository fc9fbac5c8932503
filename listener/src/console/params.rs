//! Query parameters, checked one by one so that a 400 names the parameter. Values reach the
//! database only as bind parameters.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, Utc};

use super::error::ApiError;

/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 100;
/// The largest page a request may ask for.
pub const MAX_LIMIT: i64 = 500;
/// The longest text parameter accepted (names, ids, types).
const MAX_TEXT: usize = 1000;

/// A request's query parameters.
pub struct Params {
    values: HashMap<String, String>,
}

impl Params {
    /// Parses the raw query, refusing parameters not in `allowed` and repeated ones.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
            .map_err(|e| ApiError::bad("query", format!("cannot be decoded: {e}")))?;
        Params::from_pairs(pairs, allowed)
    }

    /// As [`Params::parse`] for the page's filter forms, which submit their empty fields too:
    /// an empty value is no value.
    pub fn parse_form(raw: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
            .map_err(|e| ApiError::bad("query", format!("cannot be decoded: {e}")))?;
        let given = pairs.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        Params::from_pairs(given, allowed)
    }

    fn from_pairs(pairs: Vec<(String, String)>, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut values = HashMap::new();
        for (name, value) in pairs {
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::bad(
                    name,
                    format!("unknown parameter; this route takes {}", allowed.join(", ")),
                ));
            }
            if values.contains_key(&name) {
                return Err(ApiError::bad(name, "given more than once"));
            }
            values.insert(name, value);
        }
        Ok(Params { values })
    }

    /// A text parameter (non-empty, no NUL, at most 1000 bytes), if given.
    pub fn text(&self, name: &str) -> Result<Option<String>, ApiError> {
        self.values
            .get(name)
            .map(|v| checked_text(name, v).map(str::to_string))
            .transpose()
    }

    /// An integer parameter, if given.
    pub fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.values
            .get(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::bad(name, "must be an integer"))
            })
            .transpose()
    }

    /// `limit`: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.integer("limit")? {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::bad(
                "limit",
                format!("must be between 1 and {MAX_LIMIT}"),
            )),
        }
    }

    /// An RFC 3339 time (years 1 to 9999), if given.
    pub fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.values
            .get(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .ok()
                    .filter(|t| (1..=9999).contains(&t.year()))
                    .ok_or_else(|| {
                        ApiError::bad(name, "must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z")
                    })
            })
            .transpose()
    }

    /// A parameter that must be one of `choices`; `default` when absent.
    pub fn choice(
        &self,
        name: &str,
        choices: &[&'static str],
        default: &'static str,
    ) -> Result<&'static str, ApiError> {
        match self.values.get(name) {
            None => Ok(default),
            Some(v) => choices
                .iter()
                .find(|c| **c == v.as_str())
                .copied()
                .ok_or_else(|| {
                    ApiError::bad(name, format!("must be one of {}", choices.join(", ")))
                }),
        }
    }
}

/// `value` if it is usable as a name or id: non-empty, without NUL, at most 1000 bytes.
pub fn checked_text<'a>(name: &str, value: &'a str) -> Result<&'a str, ApiError> {
    if value.is_empty() {
        return Err(ApiError::bad(name, "must not be empty"));
    }
    if value.len() > MAX_TEXT {
        return Err(ApiError::bad(
            name,
            format!("is longer than {MAX_TEXT} bytes"),
        ));
    }
    if value.contains('\0') {
        return Err(ApiError::bad(name, "must not contain NUL"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameter(err: ApiError) -> String {
        match err {
            ApiError::BadParameter { parameter, .. } => parameter,
            other => panic!("not a bad parameter: {other}"),
        }
    }

    #[test]
    fn errors_name_the_parameter() {
        let allowed = ["limit", "from", "event_type"];
        let p = |q: &str| Params::parse(Some(q), &allowed).expect("parses");
        assert_eq!(parameter(p("limit=0").limit().unwrap_err()), "limit");
        assert_eq!(parameter(p("limit=501").limit().unwrap_err()), "limit");
        assert_eq!(parameter(p("limit=x").limit().unwrap_err()), "limit");
        assert_eq!(p("").limit().unwrap(), DEFAULT_LIMIT);
        assert_eq!(
            parameter(p("from=yesterday").time("from").unwrap_err()),
            "from"
        );
        assert_eq!(
            parameter(p("event_type=a%00b").text("event_type").unwrap_err()),
            "event_type"
        );
        let unknown = Params::parse(Some("limit=1&sort=x"), &allowed)
            .err()
            .unwrap();
        assert_eq!(parameter(unknown), "sort");
        let twice = Params::parse(Some("limit=1&limit=2"), &allowed)
            .err()
            .unwrap();
        assert_eq!(parameter(twice), "limit");
        assert_eq!(
            p("from=2026-01-31T12:00:00%2B01:00")
                .time("from")
                .unwrap()
                .unwrap()
                .to_rfc3339(),
            "2026-01-31T11:00:00+00:00"
        );
    }
}
