//! Lowercase hexadecimal, for digests in keys, ids and names.

/// `bytes` as lowercase hexadecimal, two digits each, in one allocation (a
/// `format!` per byte showed in the ingest profile: the payload digest of
/// every `/new` request).
pub fn lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_lowercase_digits_per_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(super::lower(&bytes), expected);
        assert_eq!(super::lower(&[]), "");
    }
}
