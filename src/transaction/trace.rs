//! W3C trace context (https://www.w3.org/TR/trace-context/) as `/new`
//! receives it: kept with the row and carried to the queue unchanged, so
//! the ledger continues the dApp's trace. A malformed `traceparent` is
//! ignored (the transaction is taken without it), never refused.

/// The longest `tracestate` kept (the W3C limit is 32 members; 512 bytes is
/// what it recommends propagating at least).
pub const MAX_TRACESTATE: usize = 512;
/// A `traceparent` of a future version may be longer than version 00's 55
/// characters; this is the column's bound.
pub const MAX_TRACEPARENT: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    /// Kept only beside a valid `traceparent`.
    pub tracestate: Option<String>,
}

/// Which header was malformed (and ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Traceparent,
    Tracestate,
}

impl TraceContext {
    /// From the two headers. `Ok(None)` without a `traceparent`; a
    /// malformed `traceparent` drops both, a malformed `tracestate` only
    /// itself; either way the caller counts it and goes on.
    pub fn from_headers(
        traceparent: Option<&str>,
        tracestate: Option<&str>,
    ) -> (Option<TraceContext>, Option<Malformed>) {
        let Some(traceparent) = traceparent.map(str::trim) else { return (None, None) };
        if !is_traceparent(traceparent) {
            return (None, Some(Malformed::Traceparent));
        }
        let tracestate = tracestate.map(str::trim).filter(|s| !s.is_empty());
        let (tracestate, malformed) = match tracestate {
            Some(state) if is_tracestate(state) => (Some(state.to_owned()), None),
            Some(_) => (None, Some(Malformed::Tracestate)),
            None => (None, None),
        };
        (Some(TraceContext { traceparent: traceparent.to_owned(), tracestate }), malformed)
    }
}

/// `version-traceid-parentid-flags`, lower-case hex: version `ff` is
/// invalid, as are an all-zero trace id or parent id; version 00 is exactly
/// 55 characters, a later version may carry more after a `-`.
pub fn is_traceparent(text: &str) -> bool {
    let hex =
        |part: &str, len: usize| part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if text.len() < 55 || text.len() > MAX_TRACEPARENT || !text.is_ascii() {
        return false;
    }
    let (version, trace_id, parent_id, flags) = (&text[0..2], &text[3..35], &text[36..52], &text[53..55]);
    let dashes = [2, 35, 52].iter().all(|&i| text.as_bytes()[i] == b'-');
    let valid = dashes
        && hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    match version {
        "00" => valid && text.len() == 55,
        _ => valid && (text.len() == 55 || text.as_bytes()[55] == b'-'),
    }
}

/// Printable ASCII list members (`key=value`, comma separated), at most
/// [`MAX_TRACESTATE`] bytes: what can travel as an SQS string attribute.
pub fn is_tracestate(text: &str) -> bool {
    text.len() <= MAX_TRACESTATE
        && text.bytes().all(|b| (0x20..0x7f).contains(&b))
        && text.split(',').map(str::trim).filter(|m| !m.is_empty()).all(|member| member.contains('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_with_its_tracestate() {
        let (trace, malformed) = TraceContext::from_headers(Some(VALID), Some("congo=t61rcWkgMzE"));
        assert_eq!(malformed, None);
        let trace = trace.unwrap();
        assert_eq!(trace.traceparent, VALID);
        assert_eq!(trace.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(TraceContext::from_headers(None, Some("a=b")), (None, None), "no traceparent, nothing kept");
    }

    #[test]
    fn malformed_headers_are_ignored_and_named() {
        for bad in [
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::from_headers(Some(bad), None), (None, Some(Malformed::Traceparent)), "{bad}");
        }
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later";
        assert!(TraceContext::from_headers(Some(future), None).0.is_some(), "a later version may carry more");
        let (trace, malformed) = TraceContext::from_headers(Some(VALID), Some("\u{7f}bad"));
        assert_eq!((trace.unwrap().tracestate, malformed), (None, Some(Malformed::Tracestate)));
        let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE);
        assert_eq!(TraceContext::from_headers(Some(VALID), Some(&long)).1, Some(Malformed::Tracestate));
    }
}
