//! Input validation: every field is checked before anything happens, and all violations of
//! a request are reported together, each naming its field.

use crate::model::{Purpose, Purposes};

use super::pb;
use super::status::ApiError;

/// Accepted device-token length, in bytes.
pub const TOKEN_LEN: std::ops::RangeInclusive<usize> = 16..=128;
/// Longest accepted policy version.
pub const POLICY_VERSION_MAX: usize = 64;
/// Most entries in a `purposes` list (there are two purposes; the slack is for new ones).
pub const PURPOSES_MAX: usize = 8;
/// Most violations one error lists; the rest are only counted, so a request with 100,000
/// bad values gets one short error (and costs no more than its first few).
pub const VIOLATIONS_LISTED: usize = 10;

/// Collects field violations; [`Violations::finish`] turns them into one error. It keeps the
/// first [`VIOLATIONS_LISTED`] and counts the rest.
#[derive(Debug, Default)]
pub struct Violations(Vec<(String, String)>, usize);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.0.len() < VIOLATIONS_LISTED {
            self.0.push((field.into(), description.into()));
        } else {
            self.1 += 1;
        }
    }

    /// `Ok` when no violation was recorded.
    pub fn finish(mut self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            return Ok(());
        }
        if self.1 > 0 {
            self.0.push(more_violations(self.1));
        }
        Err(ApiError::InvalidArgument(self.0))
    }

    /// `Ok(values)` when no violation was recorded. A parser yields `None` only after
    /// recording a violation, so with none recorded every value is present.
    pub fn finish_with<T>(self, values: Option<T>) -> Result<T, ApiError> {
        self.finish()?;
        // Unwrap safety: see above — a missing value always comes with a violation.
        Ok(values.expect("a value that failed to parse recorded a violation"))
    }

    /// Checks a device token: 16-128 characters of `[A-Za-z0-9._~-]`.
    pub fn device_token(&mut self, field: &str, token: &str) {
        if token.is_empty() {
            self.add(field, "required");
        } else if !TOKEN_LEN.contains(&token.len()) {
            self.add(
                field,
                format!(
                    "must be {}-{} characters long",
                    TOKEN_LEN.start(),
                    TOKEN_LEN.end()
                ),
            );
        } else if !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        {
            self.add(field, "may contain only A-Z, a-z, 0-9 and . _ ~ -");
        }
    }

    /// Checks a list of purposes: known values, no duplicates.
    pub fn purposes(&mut self, field: &str, raw: &[i32]) -> Purposes {
        if raw.len() > PURPOSES_MAX {
            // Refused as a whole: checking each of a huge list is work nobody needs.
            self.add(field, format!("at most {PURPOSES_MAX} purposes"));
            return Purposes::NONE;
        }
        let mut seen = Vec::with_capacity(raw.len());
        for (i, value) in raw.iter().enumerate() {
            match pb::Purpose::try_from(*value) {
                Ok(pb::Purpose::NearbyOffers) => seen.push(Purpose::NearbyOffers),
                Ok(pb::Purpose::FootTraffic) => seen.push(Purpose::FootTraffic),
                Ok(pb::Purpose::Unspecified) => self.add(
                    format!("{field}[{i}]"),
                    "PURPOSE_UNSPECIFIED is not a purpose",
                ),
                Err(_) => self.add(format!("{field}[{i}]"), format!("unknown purpose {value}")),
            }
        }
        let set: Purposes = seen.iter().copied().collect();
        if set.iter().count() != seen.len() {
            self.add(field, "lists a purpose more than once");
        }
        set
    }

    /// Checks a policy version: 1-64 printable characters.
    pub fn policy_version(&mut self, field: &str, v: &str) {
        if v.trim().is_empty() {
            self.add(field, "required");
        } else if v.len() > POLICY_VERSION_MAX {
            self.add(
                field,
                format!("must be at most {POLICY_VERSION_MAX} characters"),
            );
        } else if v.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        }
    }
}

/// The summary entry that stands for `n` violations not listed.
pub fn more_violations(n: usize) -> (String, String) {
    (
        "request".to_string(),
        format!("and {n} more violations not listed"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: impl FnOnce(&mut Violations), expected: &[&str]) {
        let mut v = Violations::default();
        f(&mut v);
        let fields: Vec<&str> = v.0.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, expected);
    }

    #[test]
    fn tokens() {
        check(|v| v.device_token("t", "abcdefgh-12345678"), &[]);
        check(|v| v.device_token("t", ""), &["t"]);
        check(|v| v.device_token("t", "short"), &["t"]);
        check(|v| v.device_token("t", &"a".repeat(129)), &["t"]);
        check(|v| v.device_token("t", "abcdefgh 12345678"), &["t"]);
        check(|v| v.device_token("t", "abcdefgh\u{e9}12345678"), &["t"]);
    }

    #[test]
    fn purposes() {
        check(
            |v| {
                v.purposes("p", &[1, 2]);
            },
            &[],
        );
        check(
            |v| {
                v.purposes("p", &[0]);
            },
            &["p[0]"],
        );
        check(
            |v| {
                v.purposes("p", &[1, 9]);
            },
            &["p[1]"],
        );
        check(
            |v| {
                v.purposes("p", &[2, 2]);
            },
            &["p"],
        );
    }

    #[test]
    fn long_lists_are_refused_whole_and_violations_are_capped() {
        check(
            |v| {
                v.purposes("p", &vec![9; 100_000]);
            },
            &["p"],
        );
        let mut v = Violations::default();
        for i in 0..100_000 {
            v.add(format!("f[{i}]"), "bad");
        }
        let Err(ApiError::InvalidArgument(listed)) = v.finish() else {
            panic!("violations must fail");
        };
        assert_eq!(listed.len(), VIOLATIONS_LISTED + 1);
        assert_eq!(
            listed[VIOLATIONS_LISTED].1,
            "and 99990 more violations not listed"
        );
    }

    #[test]
    fn policy_versions() {
        check(|v| v.policy_version("pv", "2026-11"), &[]);
        check(|v| v.policy_version("pv", " "), &["pv"]);
        check(|v| v.policy_version("pv", &"x".repeat(65)), &["pv"]);
        check(|v| v.policy_version("pv", "a\nb"), &["pv"]);
    }
}
