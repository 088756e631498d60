//! Credentials that must never reach a log line, an error message, `Debug`
//! output or a Kubernetes status: the type itself refuses to print them.

use std::fmt;

/// A credential (database URL, AWS key, ledger or API token).
///
/// `Debug` prints a placeholder and there is no `Display` or `Serialize`, so
/// the only way to the value is the explicit [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_contains_the_value() {
        let secret = Secret::new("postgres://relay:hunter2@db/payments");
        let printed = format!("{secret:?} {:?}", Some(&secret));
        assert!(!printed.contains("hunter2"), "{printed}");
        assert_eq!(secret.expose(), "postgres://relay:hunter2@db/payments");
    }
}
