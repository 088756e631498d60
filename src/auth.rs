//! Bearer tokens for the HTTP API.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// The tokens one endpoint accepts; several at once so they can be rotated.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenSet {
    tokens: Vec<Secret>,
}

impl TokenSet {
    /// Tokens separated by commas or new lines; blanks are ignored.
    pub fn parse(text: &str) -> Self {
        let tokens = text.split([',', '\n']).map(str::trim).filter(|t| !t.is_empty()).map(Secret::new).collect();
        Self { tokens }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Compares against every token in constant time per token, without
    /// stopping at the first match, so timing tells nothing about which
    /// token (or how much of one) matched.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = presented.as_bytes();
        let mut matched = subtle::Choice::from(0);
        for token in &self.tokens {
            matched |= token.expose().as_bytes().ct_eq(presented);
        }
        matched.into()
    }

    /// Reads `Authorization: Bearer <token>`.
    pub fn accepts_header(&self, authorization: Option<&str>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some((scheme, token)) = value.split_once(' ') else {
            return false;
        };
        scheme.eq_ignore_ascii_case("bearer") && self.accepts(token.trim())
    }
}

/// Hashes the token values, so a change of tokens can be detected without
/// keeping a copy around.
impl std::hash::Hash for TokenSet {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for token in &self.tokens {
            token.expose().hash(state);
        }
    }
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSet({} tokens)", self.tokens.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comma_and_newline_separated_tokens() {
        let set = TokenSet::parse("alpha, beta\n\ngamma,");
        assert_eq!(set.len(), 3);
        assert!(set.accepts("beta"));
        assert!(set.accepts("gamma"));
        assert!(!set.accepts("delta"));
        assert!(!set.accepts(""));
        assert!(!set.accepts("alph"));
    }

    #[test]
    fn bearer_header_is_required() {
        let set = TokenSet::parse("s3cret");
        assert!(set.accepts_header(Some("Bearer s3cret")));
        assert!(set.accepts_header(Some("bearer s3cret")));
        assert!(!set.accepts_header(Some("Basic s3cret")));
        assert!(!set.accepts_header(Some("s3cret")));
        assert!(!set.accepts_header(None));
        assert!(!TokenSet::default().accepts_header(Some("Bearer ")));
    }

    #[test]
    fn debug_does_not_print_tokens() {
        assert_eq!(format!("{:?}", TokenSet::parse("s3cret")), "TokenSet(1 tokens)");
    }
}
