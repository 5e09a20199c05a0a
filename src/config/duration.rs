//! Human durations as the config file writes them: `"90s"`, `"15m"`, `"2h"`, `"7d"`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as a whole number followed by one unit: `s`, `m`, `h` or `d`.
///
/// Kept strict on purpose: an operator reading `"1.5h"` or `"2 hours"` in a diff should see it
/// refused, not guessed at.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// `n` seconds.
    pub const fn secs(n: u64) -> Dur {
        Dur(Duration::from_secs(n))
    }
    /// `n` minutes.
    pub const fn mins(n: u64) -> Dur {
        Dur(Duration::from_secs(n * 60))
    }
    /// `n` hours.
    pub const fn hours(n: u64) -> Dur {
        Dur(Duration::from_secs(n * 3600))
    }
    /// `n` days of 24 hours.
    pub const fn days(n: u64) -> Dur {
        Dur(Duration::from_secs(n * 86_400))
    }
    /// The duration as [`Duration`].
    pub fn get(self) -> Duration {
        self.0
    }
    /// Whole seconds.
    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || {
            format!(
                "invalid duration {s:?}: expected a whole number and a unit s, m, h or d, like \"90s\", \"15m\", \"2h\", \"7d\""
            )
        };
        let Some(unit) = s.chars().last() else {
            return Err(bad());
        };
        let digits = &s[..s.len() - unit.len_utf8()];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let factor = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        n.checked_mul(factor)
            .filter(|secs| *secs <= 100 * 365 * 86_400)
            .map(Dur::secs)
            .ok_or_else(|| format!("duration {s:?} is longer than 100 years"))
    }
}

impl fmt::Display for Dur {
    /// The largest unit that represents the value exactly, so `Dur::days(7)` prints `7d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        if s == 0 {
            return write!(f, "0s");
        }
        for (unit, factor) in [('d', 86_400), ('h', 3600), ('m', 60)] {
            if s.is_multiple_of(factor) {
                return write!(f, "{}{unit}", s / factor);
            }
        }
        write!(f, "{s}s")
    }
}

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (text, secs, shown) in [
            ("90s", 90, "90s"),
            ("15m", 900, "15m"),
            ("2h", 7200, "2h"),
            ("7d", 604_800, "7d"),
            ("120m", 7200, "2h"),
            ("0s", 0, "0s"),
        ] {
            let d: Dur = text.parse().unwrap();
            assert_eq!(d.as_secs(), secs, "{text}");
            assert_eq!(d.to_string(), shown, "{text}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for text in [
            "",
            "h",
            "1.5h",
            "2 hours",
            "-1h",
            "10",
            "3w",
            "99999999999999d",
        ] {
            assert!(text.parse::<Dur>().is_err(), "{text:?} should be refused");
        }
    }
}
