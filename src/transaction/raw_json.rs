//! Just enough JSON structure to validate a ledger payload and store it without
//! re-encoding anything: objects are read as ordered members whose values stay
//! the exact text received, so numbers keep every digit and unknown fields
//! pass through untouched.

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Deepest nesting of arrays and objects accepted anywhere in a request body.
pub const MAX_DEPTH: usize = 32;

/// The members of one JSON object, in document order, values unparsed.
#[derive(Debug)]
pub struct RawObject<'a> {
    members: Vec<(String, &'a RawValue)>,
}

impl<'a> RawObject<'a> {
    pub fn parse(text: &'a str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    pub fn members(&self) -> impl Iterator<Item = (&str, &'a RawValue)> {
        self.members.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// The first key that occurs twice: a payload that says two things about
    /// one field is refused rather than guessed at.
    pub fn duplicate_key(&self) -> Option<&str> {
        let mut seen = std::collections::HashSet::with_capacity(self.members.len());
        self.members.iter().map(|(k, _)| k.as_str()).find(|k| !seen.insert(*k))
    }

    /// Writes the object back compactly; `replace` may substitute a member's
    /// text or drop it (by returning `Some(None)`).
    pub fn write<F>(&self, out: &mut String, mut replace: F)
    where
        F: FnMut(&str) -> Option<Option<String>>,
    {
        out.push('{');
        let mut first = true;
        for (key, value) in &self.members {
            let text = match replace(key) {
                Some(Some(text)) => std::borrow::Cow::Owned(text),
                Some(None) => continue,
                None => std::borrow::Cow::Borrowed(value.get()),
            };
            if !first {
                out.push(',');
            }
            first = false;
            push_json_string(out, key);
            out.push(':');
            out.push_str(&text);
        }
        out.push('}');
    }

    pub fn to_json_with<F>(&self, replace: F) -> String
    where
        F: FnMut(&str) -> Option<Option<String>>,
    {
        let mut out = String::with_capacity(self.members.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum());
        self.write(&mut out, replace);
        out
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = RawObject<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<String>()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push((key, value));
                }
                Ok(RawObject { members })
            }
        }

        deserializer.deserialize_map(MembersVisitor)
    }
}

/// The path of the first key that occurs twice in one object, at any depth
/// of `text` (valid JSON, nesting already bounded): `a.b[2].c`.
pub fn first_duplicate_key(text: &str) -> Option<String> {
    fn walk(raw: &RawValue, path: &str) -> Option<String> {
        let join = |key: &str| if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
        match Kind::of(raw) {
            Kind::Object => {
                let object = RawObject::parse(raw.get()).ok()?;
                if let Some(key) = object.duplicate_key() {
                    return Some(join(key));
                }
                object.members().find_map(|(key, value)| walk(value, &join(key)))
            }
            Kind::Array => {
                let items: Vec<&RawValue> = serde_json::from_str(raw.get()).ok()?;
                items.iter().enumerate().find_map(|(i, item)| walk(item, &format!("{path}[{i}]")))
            }
            _ => None,
        }
    }
    let raw: &RawValue = serde_json::from_str(text).ok()?;
    walk(raw, "")
}

/// What kind of JSON value a raw text is, judged by its first byte (the text
/// is already known to be valid JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    pub fn of(raw: &RawValue) -> Self {
        match raw.get().as_bytes().first() {
            Some(b'n') => Self::Null,
            Some(b't' | b'f') => Self::Bool,
            Some(b'"') => Self::String,
            Some(b'[') => Self::Array,
            Some(b'{') => Self::Object,
            _ => Self::Number,
        }
    }

    pub fn article_name(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool => "a boolean",
            Self::Number => "a number",
            Self::String => "a string",
            Self::Array => "an array",
            Self::Object => "an object",
        }
    }
}

/// Deepest array/object nesting in `text`, counting only brackets outside strings.
/// Stops early once `limit` is exceeded.
pub fn nesting_depth_exceeds(text: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Why the strings inside a JSON text (keys and values, at any depth) are
/// not acceptable: control characters (raw or escaped), lone surrogate
/// escapes, or characters SQS refuses in a message body. `None` when clean.
pub fn string_problem(text: &str) -> Option<&'static str> {
    const CONTROL: &str = "must not contain control characters";
    let mut chars = text.chars();
    let mut in_string = false;
    let mut pending_high_surrogate = false;
    while let Some(c) = chars.next() {
        if !sqs_accepts(c) {
            return Some("contains characters SQS does not accept");
        }
        if !in_string {
            in_string = c == '"';
            continue;
        }
        match c {
            '"' if !pending_high_surrogate => in_string = false,
            '\\' => match chars.next() {
                Some('u') => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let Ok(unit) = u16::from_str_radix(&hex, 16) else { return Some("has an invalid \\u escape") };
                    match unit {
                        0xD800..=0xDBFF if !pending_high_surrogate => pending_high_surrogate = true,
                        0xDC00..=0xDFFF if pending_high_surrogate => pending_high_surrogate = false,
                        0xD800..=0xDFFF => return Some("must be valid Unicode (lone surrogate escape)"),
                        _ if pending_high_surrogate => return Some("must be valid Unicode (lone surrogate escape)"),
                        _ if char::from_u32(u32::from(unit)).is_some_and(char::is_control) => return Some(CONTROL),
                        _ => {}
                    }
                }
                Some('b' | 'f' | 'n' | 'r' | 't') => return Some(CONTROL),
                _ if pending_high_surrogate => return Some("must be valid Unicode (lone surrogate escape)"),
                _ => {}
            },
            _ if pending_high_surrogate => return Some("must be valid Unicode (lone surrogate escape)"),
            _ if c.is_control() => return Some(CONTROL),
            _ => {}
        }
    }
    None
}

/// The characters SQS allows in a message body.
fn sqs_accepts(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

pub fn push_json_string(out: &mut String, value: &str) {
    // Encoding a plain string cannot fail; the `if let` only avoids an unwrap.
    if let Ok(text) = serde_json::to_string(value) {
        out.push_str(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_member_order_and_exact_value_text() {
        let text = r#"{"b": 1.10, "a": {"x": 12345678901234567890.123456789}, "c": "é\u00e9"}"#;
        let object = RawObject::parse(text).unwrap();
        let keys: Vec<_> = object.members().map(|(k, _)| k).collect();
        assert_eq!(keys, ["b", "a", "c"]);
        assert_eq!(object.get("b").unwrap().get(), "1.10");
        assert_eq!(
            object.to_json_with(|_| None),
            r#"{"b":1.10,"a":{"x": 12345678901234567890.123456789},"c":"é\u00e9"}"#
        );
    }

    #[test]
    fn replacing_and_dropping_members() {
        let object = RawObject::parse(r#"{"token":"t","k":1,"m":{}}"#).unwrap();
        let out = object.to_json_with(|key| match key {
            "token" => Some(None),
            "m" => Some(Some("[]".into())),
            _ => None,
        });
        assert_eq!(out, r#"{"k":1,"m":[]}"#);
        let only_dropped = RawObject::parse(r#"{"token":"t"}"#).unwrap().to_json_with(|_| Some(None));
        assert_eq!(only_dropped, "{}");
    }

    #[test]
    fn finds_duplicate_keys() {
        assert_eq!(RawObject::parse(r#"{"a":1,"b":2,"a":3}"#).unwrap().duplicate_key(), Some("a"));
        assert_eq!(RawObject::parse(r#"{"a":1,"b":2}"#).unwrap().duplicate_key(), None);
    }

    #[test]
    fn rejects_non_objects() {
        assert!(RawObject::parse("[1]").is_err());
        assert!(RawObject::parse(r#""x""#).is_err());
    }

    #[test]
    fn depth_counts_only_structure_outside_strings() {
        assert!(!nesting_depth_exceeds(br#"{"a":"[[[[[[[[[[[[[[[[[[[["}"#, 2));
        assert!(!nesting_depth_exceeds(br#"{"a":{"b":[1]}}"#, 3));
        assert!(nesting_depth_exceeds(br#"{"a":{"b":[1]}}"#, 2));
        assert!(!nesting_depth_exceeds(br#"{"a":"\"[[["}"#, 1));
    }

    #[test]
    fn string_problems_are_found_at_any_depth_raw_or_escaped() {
        for clean in [r#"{"a":"plain","b":[1,"é\u00e9 \ud83d\ude00"],"c":{"d":"\"quoted\" \\ \/"}}"#, "1e400", r#""""#]
        {
            assert_eq!(string_problem(clean), None, "{clean}");
        }
        for dirty in [
            r#"{"a":"\u0000"}"#,
            r#"{"deep":[{"x":"tab\there"}]}"#,
            r#"{"a\n":1}"#,
            r#"{"a":"\u001f"}"#,
            r#"{"a":"\u009f"}"#,
            "{\"a\":\"\u{7f}\"}",
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\ud800x"}"#,
            r#"{"a":"\udc00"}"#,
            "{\"a\":\"\u{FFFF}\"}",
        ] {
            assert!(string_problem(dirty).is_some(), "{dirty} should be refused");
        }
    }

    #[test]
    fn kind_of_raw_values() {
        let object = RawObject::parse(r#"{"n":null,"b":true,"x":-1,"s":"","a":[],"o":{}}"#).unwrap();
        let kinds: Vec<_> = object.members().map(|(_, v)| Kind::of(v)).collect();
        assert_eq!(kinds, [Kind::Null, Kind::Bool, Kind::Number, Kind::String, Kind::Array, Kind::Object]);
    }
}
