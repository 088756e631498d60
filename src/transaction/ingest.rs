//! Turns a `/new` request body into a [`NewTransaction`], the way the old
//! service's `from_ledger_payload` mapped it, with every field checked and the
//! stored payload kept exactly as received minus `meta_data.token`.

use std::net::IpAddr;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::value::RawValue;

use super::raw_json::{self, Kind, RawObject};
use super::{NewTransaction, TransactionType, limits};

/// Why a body was refused. Messages never echo field values: a mistyped
/// field could be the client's credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("request body is not valid JSON: {0}")]
    Syntax(String),
    #[error("{}", .0)]
    Invalid(FieldError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct FieldError {
    /// Dotted path of the field at fault, `None` when the body as a whole is.
    pub field: Option<String>,
    pub message: String,
}

impl IngestError {
    fn at(field: String, message: impl Into<String>) -> Self {
        Self::Invalid(FieldError { field: Some(field), message: message.into() })
    }

    fn body(message: impl Into<String>) -> Self {
        Self::Invalid(FieldError { field: None, message: message.into() })
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Syntax(_) => None,
            Self::Invalid(e) => e.field.as_deref(),
        }
    }
}

type Result<T> = std::result::Result<T, IngestError>;

/// Parses the full `/new` body: `{"wallet_address": ..., "ledger_payload": {...}}`.
pub fn parse_request_body(body: &[u8]) -> Result<NewTransaction> {
    let text = std::str::from_utf8(body).map_err(|_| IngestError::Syntax("body is not valid UTF-8".into()))?;
    if raw_json::nesting_depth_exceeds(body, raw_json::MAX_DEPTH) {
        return Err(IngestError::body(format!("JSON nesting is deeper than {} levels", raw_json::MAX_DEPTH)));
    }
    let top = RawObject::parse(text).map_err(|e| {
        if e.is_data() {
            IngestError::body("request body must be a JSON object")
        } else {
            IngestError::Syntax(e.to_string())
        }
    })?;
    // Unknown members are stored and sent as they are, so a key said twice
    // anywhere is as ambiguous as one of ours said twice.
    if let Some(path) = raw_json::first_duplicate_key(text) {
        return Err(IngestError::at(path, "appears more than once"));
    }
    let top = Fields::new(top, "")?;
    // Members beside the two known ones are neither stored nor sent, but
    // the payload-wide string rules hold for the whole body all the same.
    top.check_every_string(&["ledger_payload"])?;
    let wallet_address = top.required_str("wallet_address", limits::WALLET_ADDRESS, Rule::Identifier)?;
    let ledger_payload = top.required("ledger_payload")?;
    from_ledger_payload(ledger_payload, wallet_address)
}

/// Maps a ledger payload and its wallet address to a transaction, like the old
/// service's `Transaction.from_ledger_payload`.
pub fn from_ledger_payload(ledger_payload: &RawValue, wallet_address: String) -> Result<NewTransaction> {
    let root = Fields::object(ledger_payload, "ledger_payload".into())?;
    let meta = Fields::object(root.required("meta_data")?, root.path("meta_data"))?;
    let body = Fields::object(root.required("payload")?, root.path("payload"))?;

    let idempotency_key = meta.required_str("idempotency_key", limits::IDEMPOTENCY_KEY, Rule::Identifier)?;
    let instruction_type = meta.required_str("instruction_type", limits::INSTRUCTION_TYPE, Rule::Identifier)?;
    let ip_address = meta
        .optional_str("ip_address", limits::IP_ADDRESS, Rule::Identifier)?
        .map(|ip| match IpAddr::from_str(&ip) {
            Ok(_) => Ok(ip),
            Err(_) => Err(IngestError::at(meta.path("ip_address"), "must be an IPv4 or IPv6 address")),
        })
        .transpose()?;

    // The client's credential is dropped before storing; it must still be
    // what the document says it is.
    if let Some(token) = meta.present("token") {
        let kind = Kind::of(token);
        if kind != Kind::String {
            return Err(IngestError::at(meta.path("token"), format!("must be a string, got {}", kind.article_name())));
        }
    }
    meta.check_every_string(&[])?;
    body.check_every_string(&[])?;
    root.check_every_string(&["meta_data", "payload"])?;
    let transaction_type_text = body.required_str("transaction_type", limits::TRANSACTION_TYPE, Rule::Identifier)?;
    let transaction_type = TransactionType::parse(&transaction_type_text)
        .ok_or_else(|| IngestError::at(body.path("transaction_type"), "must be DEPOSIT or WITHDRAW"))?;

    let transaction = NewTransaction {
        reference: body.required_str("reference", limits::REFERENCE, Rule::Identifier)?,
        external_reference: body.required_str("external_reference", limits::EXTERNAL_REFERENCE, Rule::Identifier)?,
        idempotency_key,
        transaction_type,
        status: body.required_str("status", limits::STATUS, Rule::Identifier)?,
        source: body.required_str("source", limits::SOURCE, Rule::Identifier)?,
        instruction_type,
        incoming_currency: body.required_str("incoming_currency", limits::CURRENCY, Rule::Code)?,
        outgoing_currency: body.required_str("outgoing_currency", limits::CURRENCY, Rule::Code)?,
        value: body.amount("value")?,
        fee: body.amount("fee")?,
        payer_id: body.optional_str("payer", limits::PARTY_ID, Rule::Identifier)?,
        payee_id: body.optional_str("payee", limits::PARTY_ID, Rule::Identifier)?,
        first_name: body.optional_str("first_name", limits::NAME, Rule::Name)?,
        last_name: body.optional_str("last_name", limits::NAME, Rule::Name)?,
        wallet_address,
        ip_address,
        payload: stored_payload(&root.object, &meta.object),
        // From the request's headers, not its body (the HTTP edge sets it).
        trace: None,
    };
    Ok(transaction)
}

/// The ledger payload as received, with `meta_data.token` removed: the
/// client's credential is never stored.
fn stored_payload(root: &RawObject<'_>, meta: &RawObject<'_>) -> String {
    root.to_json_with(|key| match key {
        "meta_data" => Some(Some(meta.to_json_with(|k| (k == "token").then_some(None)))),
        _ => None,
    })
}

#[derive(Clone, Copy)]
enum Rule {
    /// Identifiers and codes: no leading or trailing whitespace.
    Identifier,
    /// Currency codes: ASCII letters and digits.
    Code,
    /// Personal names: any printable text.
    Name,
}

struct Fields<'a> {
    object: RawObject<'a>,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn new(object: RawObject<'a>, prefix: impl Into<String>) -> Result<Self> {
        let fields = Self { object, prefix: prefix.into() };
        if let Some(key) = fields.object.duplicate_key() {
            return Err(IngestError::at(fields.path(key), "appears more than once"));
        }
        Ok(fields)
    }

    fn object(raw: &'a RawValue, path: String) -> Result<Self> {
        let kind = Kind::of(raw);
        if kind != Kind::Object {
            return Err(IngestError::at(path, format!("must be an object, got {}", kind.article_name())));
        }
        let object = RawObject::parse(raw.get()).map_err(|_| IngestError::at(path.clone(), "must be an object"))?;
        Self::new(object, path)
    }

    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_owned() } else { format!("{}.{key}", self.prefix) }
    }

    /// Unknown fields are stored and sent as they are, so their strings
    /// obey the same rules as the known ones, at any depth.
    fn check_every_string(&self, checked_already: &[&str]) -> Result<()> {
        for (key, value) in self.object.members().filter(|(key, _)| !checked_already.contains(key)) {
            let key_text = serde_json::to_string(key).unwrap_or_default();
            if let Some(problem) = raw_json::string_problem(&key_text).or_else(|| raw_json::string_problem(value.get()))
            {
                return Err(IngestError::at(self.path(key), problem));
            }
        }
        Ok(())
    }

    fn present(&self, key: &str) -> Option<&'a RawValue> {
        self.object.get(key).filter(|raw| Kind::of(raw) != Kind::Null)
    }

    fn required(&self, key: &str) -> Result<&'a RawValue> {
        self.present(key).ok_or_else(|| IngestError::at(self.path(key), "is required"))
    }

    fn string(&self, key: &str, raw: &RawValue, max_chars: usize, rule: Rule) -> Result<String> {
        let kind = Kind::of(raw);
        if kind != Kind::String {
            return Err(IngestError::at(self.path(key), format!("must be a string, got {}", kind.article_name())));
        }
        let value: String =
            serde_json::from_str(raw.get()).map_err(|_| IngestError::at(self.path(key), "must be a valid string"))?;
        let fail = |message: &str| Err(IngestError::at(self.path(key), message));
        if value.trim().is_empty() {
            return fail("must not be empty");
        }
        if value.chars().count() > max_chars {
            return fail(&format!("must be at most {max_chars} characters"));
        }
        if value.chars().any(char::is_control) {
            return fail("must not contain control characters");
        }
        match rule {
            Rule::Identifier | Rule::Code if value.trim() != value => fail("must not start or end with whitespace"),
            Rule::Code if !value.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                fail("must contain only letters and digits")
            }
            _ => Ok(value),
        }
    }

    fn required_str(&self, key: &str, max_chars: usize, rule: Rule) -> Result<String> {
        let raw = self.required(key)?;
        self.string(key, raw, max_chars, rule)
    }

    fn optional_str(&self, key: &str, max_chars: usize, rule: Rule) -> Result<Option<String>> {
        self.present(key).map(|raw| self.string(key, raw, max_chars, rule)).transpose()
    }

    /// A money amount: a decimal string or JSON number, read from its exact
    /// text (never through a float), non-negative and within NUMERIC(20,6).
    fn amount(&self, key: &str) -> Result<Decimal> {
        let raw = self.required(key)?;
        let text = match Kind::of(raw) {
            Kind::Number => raw.get().to_owned(),
            Kind::String => self.string(key, raw, 64, Rule::Identifier)?,
            other => {
                return Err(IngestError::at(
                    self.path(key),
                    format!("must be a decimal string or number, got {}", other.article_name()),
                ));
            }
        };
        parse_amount(&text).map_err(|message| IngestError::at(self.path(key), message))
    }
}

/// Plain decimal notation only (`123`, `0.5`, `100.000001`): exponents, signs,
/// and bare dots are refused instead of interpreted.
pub fn parse_amount(text: &str) -> std::result::Result<Decimal, String> {
    if text.starts_with('-') {
        return Err("must not be negative".into());
    }
    let (integer, fraction) = match text.split_once('.') {
        Some((integer, fraction)) => (integer, Some(fraction)),
        None => (text, None),
    };
    let digits_only = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only(integer) || fraction.is_some_and(|f| !digits_only(f)) {
        return Err("must be a plain decimal number such as \"100.50\"".into());
    }
    let significant_integer_digits = integer.trim_start_matches('0').len();
    if significant_integer_digits > limits::AMOUNT_INTEGER_DIGITS {
        return Err(format!("must have at most {} digits before the decimal point", limits::AMOUNT_INTEGER_DIGITS));
    }
    if fraction.is_some_and(|f| f.len() > limits::AMOUNT_SCALE) {
        return Err(format!("must have at most {} decimal places", limits::AMOUNT_SCALE));
    }
    Decimal::from_str_exact(text).map_err(|_| "must be a plain decimal number such as \"100.50\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn body(mutate: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut value = json!({
            "wallet_address": "7xKXwallet",
            "ledger_payload": {
                "meta_data": {"source": "DAPP", "instruction_type": "Transaction", "created_at": "2026-11-26T10:00:00Z",
                              "token": "client-secret-token", "idempotency_key": "idem-1", "ip_address": "203.0.113.7"},
                "payload": {"external_reference": "ext-1", "source": "ANCHOR_SOLANA", "reference": "MYK-000123",
                            "first_name": "Ada", "last_name": "Lovelace", "transaction_type": "deposit", "status": "PENDING_PAYER",
                            "incoming_currency": "EUR", "outgoing_currency": "EURC", "value": "100.00", "fee": "1.50",
                            "payer": "user-1", "payee": null}}
        });
        mutate(&mut value);
        serde_json::to_vec(&value).unwrap()
    }

    fn field_of(result: Result<NewTransaction>) -> String {
        match result {
            Err(IngestError::Invalid(e)) => e.field.unwrap_or_default(),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn maps_columns_like_from_ledger_payload() {
        let tx = parse_request_body(&body(|_| {})).unwrap();
        assert_eq!(tx.reference, "MYK-000123");
        assert_eq!(tx.external_reference, "ext-1");
        assert_eq!(tx.idempotency_key, "idem-1");
        assert_eq!(tx.transaction_type, TransactionType::Deposit);
        assert_eq!(tx.transaction_type.as_str(), "DEPOSIT");
        assert_eq!(tx.status, "PENDING_PAYER");
        assert_eq!(tx.source, "ANCHOR_SOLANA");
        assert_eq!(tx.instruction_type, "Transaction");
        assert_eq!(tx.value, Decimal::from_str("100.00").unwrap());
        assert_eq!(tx.fee, Decimal::from_str("1.5").unwrap());
        assert_eq!(tx.payer_id.as_deref(), Some("user-1"));
        assert_eq!(tx.payee_id, None);
        assert_eq!(tx.first_name.as_deref(), Some("Ada"));
        assert_eq!(tx.wallet_address, "7xKXwallet");
        assert_eq!(tx.ip_address.as_deref(), Some("203.0.113.7"));
    }

    #[test]
    fn stored_payload_is_the_input_without_the_token() {
        let input = br#"{"wallet_address":"w","ledger_payload":{"meta_data":{"token":"client-secret","idempotency_key":"k","instruction_type":"Transaction","extra":[1, 2]},"payload":{"reference":"r","external_reference":"e","source":"S","transaction_type":"WITHDRAW","status":"P","incoming_currency":"EUR","outgoing_currency":"EUR","value":12345678901234.123456,"fee":0,"unknown":{"deep": 1.10}}, "trailer": true}}"#;
        let tx = parse_request_body(input).unwrap();
        assert_eq!(
            tx.payload,
            r#"{"meta_data":{"idempotency_key":"k","instruction_type":"Transaction","extra":[1, 2]},"payload":{"reference":"r","external_reference":"e","source":"S","transaction_type":"WITHDRAW","status":"P","incoming_currency":"EUR","outgoing_currency":"EUR","value":12345678901234.123456,"fee":0,"unknown":{"deep": 1.10}},"trailer":true}"#
        );
        assert!(!tx.payload.contains("client-secret"));
        assert_eq!(tx.value.to_string(), "12345678901234.123456");
    }

    #[test]
    fn required_fields_are_named_when_missing() {
        let cases = [("wallet_address", "wallet_address"), ("ledger_payload", "ledger_payload")];
        for (key, field) in cases {
            assert_eq!(field_of(parse_request_body(&body(|v| drop(v.as_object_mut().unwrap().remove(key))))), field);
        }
        for key in [
            "reference",
            "external_reference",
            "transaction_type",
            "status",
            "incoming_currency",
            "outgoing_currency",
            "value",
            "fee",
            "source",
        ] {
            let bytes = body(|v| drop(v["ledger_payload"]["payload"].as_object_mut().unwrap().remove(key)));
            assert_eq!(field_of(parse_request_body(&bytes)), format!("ledger_payload.payload.{key}"));
        }
        for key in ["idempotency_key", "instruction_type"] {
            let bytes = body(|v| drop(v["ledger_payload"]["meta_data"].as_object_mut().unwrap().remove(key)));
            assert_eq!(field_of(parse_request_body(&bytes)), format!("ledger_payload.meta_data.{key}"));
        }
    }

    #[test]
    fn amounts_are_exact_non_negative_and_bounded() {
        for good in ["0", "100", "100.5", "0.000001", "99999999999999.999999", "00012.10"] {
            assert!(parse_amount(good).is_ok(), "{good}");
        }
        for bad in ["-1", "-0", "1e3", "1.", ".5", "1.0000001", "100000000000000", "", " 1", "+1", "NaN", "1,5", "0x10"]
        {
            assert!(parse_amount(bad).is_err(), "{bad:?} should be rejected");
        }
        let as_number = br#"{"wallet_address":"w","ledger_payload":{"meta_data":{"idempotency_key":"k","instruction_type":"T"},"payload":{"reference":"r","external_reference":"e","source":"S","transaction_type":"DEPOSIT","status":"P","incoming_currency":"EUR","outgoing_currency":"EUR","value":0.1,"fee":1e2}}}"#;
        assert_eq!(field_of(parse_request_body(as_number)), "ledger_payload.payload.fee");
        let bytes = body(|v| v["ledger_payload"]["payload"]["value"] = json!(-5));
        assert_eq!(field_of(parse_request_body(&bytes)), "ledger_payload.payload.value");
        let bytes = body(|v| v["ledger_payload"]["payload"]["fee"] = json!(true));
        assert_eq!(field_of(parse_request_body(&bytes)), "ledger_payload.payload.fee");
    }

    #[test]
    fn enums_strings_and_addresses_are_checked() {
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|v| v["ledger_payload"]["payload"]["transaction_type"] = json!("REFUND")),
                "ledger_payload.payload.transaction_type",
            ),
            (
                Box::new(|v| v["ledger_payload"]["meta_data"]["ip_address"] = json!("999.1.1.1")),
                "ledger_payload.meta_data.ip_address",
            ),
            (Box::new(|v| v["ledger_payload"]["payload"]["reference"] = json!(42)), "ledger_payload.payload.reference"),
            (
                Box::new(|v| v["ledger_payload"]["payload"]["reference"] = json!("a".repeat(256))),
                "ledger_payload.payload.reference",
            ),
            (
                Box::new(|v| v["ledger_payload"]["payload"]["reference"] = json!("ref\u{0}x")),
                "ledger_payload.payload.reference",
            ),
            (
                Box::new(|v| v["ledger_payload"]["payload"]["reference"] = json!(" ref")),
                "ledger_payload.payload.reference",
            ),
            (Box::new(|v| v["ledger_payload"]["payload"]["reference"] = json!("")), "ledger_payload.payload.reference"),
            (
                Box::new(|v| v["ledger_payload"]["payload"]["incoming_currency"] = json!("EU R")),
                "ledger_payload.payload.incoming_currency",
            ),
            (
                Box::new(|v| v["ledger_payload"]["payload"]["incoming_currency"] = json!("EUROSTABLECOIN")),
                "ledger_payload.payload.incoming_currency",
            ),
            (
                Box::new(|v| v["ledger_payload"]["payload"]["first_name"] = json!("A\nB")),
                "ledger_payload.payload.first_name",
            ),
            (Box::new(|v| v["ledger_payload"]["payload"]["payer"] = json!(7)), "ledger_payload.payload.payer"),
            (Box::new(|v| v["ledger_payload"]["payload"] = json!([])), "ledger_payload.payload"),
            (Box::new(|v| v["ledger_payload"]["meta_data"] = json!("x")), "ledger_payload.meta_data"),
            (Box::new(|v| v["wallet_address"] = json!(["w"])), "wallet_address"),
        ];
        for (mutate, field) in cases {
            assert_eq!(field_of(parse_request_body(&body(mutate))), field);
        }
        let tx = parse_request_body(&body(|v| v["ledger_payload"]["meta_data"]["ip_address"] = json!("2001:db8::1")))
            .unwrap();
        assert_eq!(tx.ip_address.as_deref(), Some("2001:db8::1"));
        let tx = parse_request_body(&body(|v| v["ledger_payload"]["payload"]["transaction_type"] = json!("Withdraw")))
            .unwrap();
        assert_eq!(tx.transaction_type, TransactionType::Withdraw);
    }

    #[test]
    fn unknown_fields_obey_the_string_rules_too() {
        let bytes = body(|v| v["ledger_payload"]["payload"]["memo"] = json!({"deep": ["ok", "bad\u{0}"]}));
        assert_eq!(field_of(parse_request_body(&bytes)), "ledger_payload.payload.memo");
        let bytes = body(|v| v["ledger_payload"]["meta_data"]["note"] = json!("line\nbreak"));
        assert_eq!(field_of(parse_request_body(&bytes)), "ledger_payload.meta_data.note");
        let bytes = body(|v| v["ledger_payload"]["extra"] = json!("\u{FFFF}"));
        assert_eq!(field_of(parse_request_body(&bytes)), "ledger_payload.extra");
        let lone = br#"{"wallet_address":"w","ledger_payload":{"meta_data":{"idempotency_key":"k","instruction_type":"T"},"payload":{"reference":"r","external_reference":"e","source":"S","transaction_type":"DEPOSIT","status":"P","incoming_currency":"EUR","outgoing_currency":"EUR","value":"1","fee":"0","x":"\ud800"}}}"#;
        assert_eq!(field_of(parse_request_body(lone)), "ledger_payload.payload.x");
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let input = br#"{"wallet_address":"w","ledger_payload":{"meta_data":{"idempotency_key":"k","instruction_type":"T"},"payload":{"reference":"r","external_reference":"e","source":"S","transaction_type":"DEPOSIT","status":"P","incoming_currency":"EUR","outgoing_currency":"EUR","value":"1","value":"1000","fee":"0"}}}"#;
        assert_eq!(field_of(parse_request_body(input)), "ledger_payload.payload.value");
    }

    #[test]
    fn duplicate_keys_are_refused_at_every_depth() {
        let deep = br#"{"wallet_address":"w","ledger_payload":{"meta_data":{"idempotency_key":"k","instruction_type":"T"},"payload":{"reference":"r","external_reference":"e","source":"S","transaction_type":"DEPOSIT","status":"P","incoming_currency":"EUR","outgoing_currency":"EUR","value":"1","fee":"0","extra":{"notes":[{"a":1},{"b":2,"b":3}]}}}}"#;
        assert_eq!(field_of(parse_request_body(deep)), "ledger_payload.payload.extra.notes[1].b");
        let unknown_top = br#"{"wallet_address":"w","x":{"y":1,"y":2},"ledger_payload":{"meta_data":{"idempotency_key":"k","instruction_type":"T"},"payload":{"reference":"r","external_reference":"e","source":"S","transaction_type":"DEPOSIT","status":"P","incoming_currency":"EUR","outgoing_currency":"EUR","value":"1","fee":"0"}}}"#;
        assert_eq!(field_of(parse_request_body(unknown_top)), "x.y");
    }

    #[test]
    fn syntax_errors_and_shapes_are_told_apart() {
        assert!(matches!(parse_request_body(b"{not json"), Err(IngestError::Syntax(_))));
        assert!(matches!(parse_request_body(b"\xff\xfe"), Err(IngestError::Syntax(_))));
        assert!(matches!(parse_request_body(b"[1,2]"), Err(IngestError::Invalid(FieldError { field: None, .. }))));
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        let nested = format!(r#"{{"wallet_address":"w","ledger_payload":{deep}}}"#);
        assert!(matches!(
            parse_request_body(nested.as_bytes()),
            Err(IngestError::Invalid(FieldError { field: None, .. }))
        ));
    }

    #[test]
    fn error_messages_never_echo_values() {
        let bytes = body(|v| v["ledger_payload"]["payload"]["reference"] = json!({"token": "client-secret-token"}));
        let err = parse_request_body(&bytes).unwrap_err();
        assert!(!err.to_string().contains("client-secret-token"), "{err}");
    }
}
