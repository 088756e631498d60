//! Durations written the way Kubernetes users write them: `500ms`, `60s`, `5m`,
//! `1h30m`, `30d`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the CRD schema enforces; [`HumanDuration::from_str`] accepts exactly this.
pub const PATTERN: &str = "^([0-9]+(ms|s|m|h|d))+$";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for HumanDuration {
    fn from(value: Duration) -> Self {
        Self(value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: expected a number followed by ms, s, m, h or d, such as 60s, 5m or 1h30m")]
pub struct ParseDurationError {
    input: String,
}

impl FromStr for HumanDuration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = || ParseDurationError { input: input.chars().take(64).collect() };
        if input.is_empty() {
            return Err(fail());
        }
        let mut total: u64 = 0;
        let mut rest = input;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(fail());
            }
            let amount: u64 = rest[..digits].parse().map_err(|_| fail())?;
            rest = &rest[digits..];
            let (unit_millis, unit_len) = if rest.starts_with("ms") {
                (1, 2)
            } else if rest.starts_with('s') {
                (1_000, 1)
            } else if rest.starts_with('m') {
                (60_000, 1)
            } else if rest.starts_with('h') {
                (3_600_000, 1)
            } else if rest.starts_with('d') {
                (86_400_000, 1)
            } else {
                return Err(fail());
            };
            rest = &rest[unit_len..];
            let millis = amount.checked_mul(unit_millis).ok_or_else(fail)?;
            total = total.checked_add(millis).ok_or_else(fail)?;
        }
        Ok(Self(Duration::from_millis(total)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if millis >= size {
                write!(f, "{}{unit}", millis / size)?;
                millis %= size;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": PATTERN,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_combinations() {
        let cases =
            [("500ms", 500), ("60s", 60_000), ("5m", 300_000), ("1h30m", 5_400_000), ("30d", 2_592_000_000), ("0s", 0)];
        for (text, millis) in cases {
            assert_eq!(text.parse::<HumanDuration>().unwrap().get(), Duration::from_millis(millis), "{text}");
        }
    }

    #[test]
    fn rejects_what_the_schema_pattern_rejects() {
        for text in ["", "5", "m", "5 m", "-5s", "1.5s", "5min", "5M", "99999999999999999999d"] {
            assert!(text.parse::<HumanDuration>().is_err(), "{text:?} should be rejected");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["5m", "1h30m", "30d", "1m0s500ms", "0s", "2s"] {
            let parsed: HumanDuration = text.parse().unwrap();
            let again: HumanDuration = parsed.to_string().parse().unwrap();
            assert_eq!(parsed, again, "{text}");
        }
        assert_eq!(HumanDuration::from_secs(300).to_string(), "5m");
        assert_eq!(HumanDuration::from_secs(90).to_string(), "1m30s");
    }
}
