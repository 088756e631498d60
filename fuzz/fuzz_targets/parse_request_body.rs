//! Any bytes into the `/new` parser: it must never panic, and whatever it
//! accepts must be a transaction the store and the queue can take.
#![no_main]

use libfuzzer_sys::fuzz_target;
use txrelay::transaction::raw_json::RawObject;
use txrelay::transaction::{limits, parse_request_body};

fuzz_target!(|data: &[u8]| {
    let Ok(tx) = parse_request_body(data) else { return };
    // Raw parsing: unknown fields may hold numbers no f64 can represent,
    // which the relay stores and forwards untouched.
    let stored = RawObject::parse(&tx.payload).expect("the stored payload is a JSON object");
    let meta = RawObject::parse(stored.get("meta_data").expect("meta_data is kept").get()).expect("meta_data is an object");
    assert!(meta.get("token").is_none(), "the client's token is never stored");
    assert!(tx.value >= rust_decimal_zero() && tx.fee >= rust_decimal_zero());
    assert!(tx.value.scale() as usize <= limits::AMOUNT_SCALE && tx.fee.scale() as usize <= limits::AMOUNT_SCALE);
    for (text, max) in [
        (&tx.reference, limits::REFERENCE),
        (&tx.external_reference, limits::EXTERNAL_REFERENCE),
        (&tx.idempotency_key, limits::IDEMPOTENCY_KEY),
        (&tx.wallet_address, limits::WALLET_ADDRESS),
        (&tx.status, limits::STATUS),
        (&tx.incoming_currency, limits::CURRENCY),
    ] {
        assert!(!text.is_empty() && text.chars().count() <= max);
        assert!(!text.chars().any(char::is_control));
    }
    // Parsing is deterministic: the same bytes give the same transaction.
    assert_eq!(parse_request_body(data).ok().as_ref(), Some(&tx));
});

fn rust_decimal_zero() -> rust_decimal::Decimal {
    rust_decimal::Decimal::ZERO
}
