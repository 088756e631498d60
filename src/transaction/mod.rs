//! The transaction: what `/new` accepts, what the store keeps and what the API
//! shows.

pub mod ingest;
pub mod raw_json;

use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Serialize, Serializer};

pub use ingest::{FieldError, IngestError, parse_request_body};
pub use trace::TraceContext;

pub mod trace;

/// Column sizes of `transactions`, declared once: validation uses them, and a
/// test checks the migrations agree.
pub mod limits {
    pub const REFERENCE: usize = 255;
    pub const EXTERNAL_REFERENCE: usize = 255;
    pub const IDEMPOTENCY_KEY: usize = 255;
    pub const TRANSACTION_TYPE: usize = 50;
    pub const STATUS: usize = 50;
    pub const SOURCE: usize = 50;
    pub const INSTRUCTION_TYPE: usize = 50;
    pub const CURRENCY: usize = 10;
    pub const PARTY_ID: usize = 255;
    pub const NAME: usize = 255;
    pub const WALLET_ADDRESS: usize = 255;
    pub const IP_ADDRESS: usize = 45;
    /// NUMERIC(20,6): 14 digits before the point, 6 after.
    pub const AMOUNT_INTEGER_DIGITS: usize = 14;
    pub const AMOUNT_SCALE: usize = 6;

    /// Every varchar column with its declared length, for the schema check.
    pub const VARCHAR_COLUMNS: &[(&str, usize)] = &[
        ("reference", REFERENCE),
        ("external_reference", EXTERNAL_REFERENCE),
        ("idempotency_key", IDEMPOTENCY_KEY),
        ("transaction_type", TRANSACTION_TYPE),
        ("status", STATUS),
        ("source", SOURCE),
        ("instruction_type", INSTRUCTION_TYPE),
        ("incoming_currency", CURRENCY),
        ("outgoing_currency", CURRENCY),
        ("payer_id", PARTY_ID),
        ("payee_id", PARTY_ID),
        ("first_name", NAME),
        ("last_name", NAME),
        ("wallet_address", WALLET_ADDRESS),
        ("ip_address", IP_ADDRESS),
        ("message_id", 255),
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionType {
    Deposit,
    Withdraw,
}

impl TransactionType {
    /// Case-insensitive, as clients have sent both spellings.
    pub fn parse(text: &str) -> Option<Self> {
        if text.eq_ignore_ascii_case("DEPOSIT") {
            Some(Self::Deposit)
        } else if text.eq_ignore_ascii_case("WITHDRAW") {
            Some(Self::Withdraw)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deposit => "DEPOSIT",
            Self::Withdraw => "WITHDRAW",
        }
    }
}

/// A validated transaction that is not stored yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransaction {
    pub reference: String,
    pub external_reference: String,
    pub idempotency_key: String,
    pub transaction_type: TransactionType,
    pub status: String,
    pub source: String,
    pub instruction_type: String,
    pub incoming_currency: String,
    pub outgoing_currency: String,
    pub value: Decimal,
    pub fee: Decimal,
    pub payer_id: Option<String>,
    pub payee_id: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub wallet_address: String,
    pub ip_address: Option<String>,
    /// The ledger payload as received, without `meta_data.token`: every send
    /// is built from these bytes.
    pub payload: String,
    /// The request's W3C trace context, carried with every send.
    pub trace: Option<TraceContext>,
}

/// A stored transaction, serialised with the old service's `to_dict` keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Transaction {
    pub id: i64,
    pub reference: String,
    pub external_reference: String,
    pub idempotency_key: String,
    pub transaction_type: String,
    pub status: String,
    pub incoming_currency: String,
    pub outgoing_currency: String,
    #[serde(serialize_with = "as_string")]
    pub value: Decimal,
    #[serde(serialize_with = "as_string")]
    pub fee: Decimal,
    pub payer_id: Option<String>,
    pub payee_id: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub wallet_address: String,
    pub source: String,
    pub instruction_type: String,
    pub ip_address: Option<String>,
    pub message_id: Option<String>,
    pub queue_sent_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// When the relay will try next; only while unsent.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
}

/// Where a transaction stands on its way to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    Unsent,
    Sent,
    /// Dead-lettered: given up on until someone runs `txrelay retry`.
    Failed,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unsent => "unsent",
            Self::Sent => "sent",
            Self::Failed => "failed",
        }
    }
}

impl Transaction {
    pub fn delivery(&self) -> Delivery {
        if self.message_id.is_some() {
            Delivery::Sent
        } else if self.failed_at.is_some() {
            Delivery::Failed
        } else {
            Delivery::Unsent
        }
    }
}

impl fmt::Display for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Transaction #{} {} {} {} {}->{} [{}] {}",
            self.id,
            self.reference,
            self.transaction_type,
            format_args!("{:.6}", self.value),
            self.incoming_currency,
            self.outgoing_currency,
            self.status,
            self.delivery().as_str()
        )
    }
}

/// Amounts as stored, NUMERIC(20,6): always six decimals. (PostgreSQL sends
/// zero without its scale, so the scale is restored here.)
fn as_string<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_args!("{value:.6}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    pub(crate) fn sample() -> Transaction {
        let at = DateTime::parse_from_rfc3339("2026-11-26T10:00:00Z").unwrap().with_timezone(&Utc);
        Transaction {
            id: 7,
            reference: "MYK-000123".into(),
            external_reference: "ext-1".into(),
            idempotency_key: "idem-1".into(),
            transaction_type: "DEPOSIT".into(),
            status: "PENDING_PAYER".into(),
            incoming_currency: "EUR".into(),
            outgoing_currency: "EURC".into(),
            value: Decimal::from_str("100.000000").unwrap(),
            fee: Decimal::from_str("1.500000").unwrap(),
            payer_id: Some("user-1".into()),
            payee_id: None,
            first_name: Some("Ada".into()),
            last_name: Some("Lovelace".into()),
            wallet_address: "7xKX".into(),
            source: "ANCHOR_SOLANA".into(),
            instruction_type: "Transaction".into(),
            ip_address: Some("203.0.113.7".into()),
            message_id: None,
            queue_sent_at: None,
            created_at: at,
            updated_at: at,
            attempts: 0,
            last_error: None,
            next_attempt_at: Some(at),
            failed_at: None,
        }
    }

    #[test]
    fn json_form_uses_the_old_to_dict_keys_and_string_amounts() {
        let json = serde_json::to_value(sample()).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        for key in [
            "id",
            "reference",
            "external_reference",
            "idempotency_key",
            "transaction_type",
            "status",
            "incoming_currency",
            "outgoing_currency",
            "value",
            "fee",
            "payer_id",
            "payee_id",
            "first_name",
            "last_name",
            "wallet_address",
            "source",
            "instruction_type",
            "ip_address",
            "message_id",
            "queue_sent_at",
            "created_at",
            "updated_at",
            "attempts",
            "last_error",
            "failed_at",
        ] {
            assert!(keys.contains(&key), "missing {key}");
        }
        assert_eq!(json["value"], "100.000000");
        assert_eq!(json["fee"], "1.500000");
        let zero = Transaction { fee: Decimal::ZERO, value: Decimal::from_str("12.5").unwrap(), ..sample() };
        let json = serde_json::to_value(zero).unwrap();
        assert_eq!(json["fee"], "0.000000");
        assert_eq!(json["value"], "12.500000");
        assert_eq!(json["created_at"], "2026-11-26T10:00:00Z");
        assert_eq!(json["message_id"], serde_json::Value::Null);
    }

    #[test]
    fn display_string_names_the_transaction_and_its_delivery() {
        let mut tx = sample();
        assert_eq!(tx.to_string(), "Transaction #7 MYK-000123 DEPOSIT 100.000000 EUR->EURC [PENDING_PAYER] unsent");
        tx.message_id = Some("m-1".into());
        assert!(tx.to_string().ends_with(" sent"));
        tx.message_id = None;
        tx.failed_at = Some(tx.created_at);
        assert!(tx.to_string().ends_with(" failed"));
    }
}
