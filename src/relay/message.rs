//! Builds the SQS message of a stored transaction. Every send of one row has
//! the same bytes: the stored payload, plus the relay's own ledger token as
//! `meta_data.token` when one is configured.

use crate::queue::OutboundMessage;
use crate::secret::Secret;
use crate::store::ClaimedRow;
use crate::transaction::raw_json::{RawObject, push_json_string};

pub fn outbound(row: &ClaimedRow, ledger_token: Option<&Secret>) -> Result<OutboundMessage, String> {
    Ok(OutboundMessage {
        id: row.id,
        body: body(&row.payload, ledger_token)?,
        idempotency_key: row.idempotency_key.clone(),
        reference: row.reference.clone(),
        source: row.source.clone(),
        group_id: row.wallet_address.clone(),
        traceparent: row.traceparent.clone(),
        tracestate: row.tracestate.clone(),
    })
}

/// The message body. Without a token the stored bytes go out untouched.
pub fn body(payload: &str, ledger_token: Option<&Secret>) -> Result<String, String> {
    let Some(token) = ledger_token else {
        return Ok(payload.to_owned());
    };
    let root = RawObject::parse(payload).map_err(|_| "stored payload is not a JSON object".to_owned())?;
    let meta = root.get("meta_data").ok_or_else(|| "stored payload has no meta_data".to_owned())?;
    let meta = RawObject::parse(meta.get()).map_err(|_| "stored meta_data is not a JSON object".to_owned())?;
    let mut meta_text =
        String::with_capacity(meta.members().map(|(k, v)| k.len() + v.get().len() + 4).sum::<usize>() + 64);
    // Drop any token that found its way into the stored payload: only the
    // relay's own is ever sent.
    meta.write(&mut meta_text, |key| (key == "token").then_some(None));
    meta_text.pop();
    if meta_text.len() > 1 {
        meta_text.push(',');
    }
    meta_text.push_str("\"token\":");
    push_json_string(&mut meta_text, token.expose());
    meta_text.push('}');
    Ok(root.to_json_with(|key| (key == "meta_data").then(|| Some(meta_text.clone()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORED: &str = r#"{"meta_data":{"idempotency_key":"k","n":1.10},"payload":{"value":"1.00"}}"#;

    #[test]
    fn without_a_token_the_stored_payload_is_sent_verbatim() {
        assert_eq!(body(STORED, None).unwrap(), STORED);
    }

    #[test]
    fn the_relay_token_is_added_to_meta_data_and_nothing_else_changes() {
        let token = Secret::new("ledger \"svc\" token");
        let sent = body(STORED, Some(&token)).unwrap();
        assert_eq!(
            sent,
            r#"{"meta_data":{"idempotency_key":"k","n":1.10,"token":"ledger \"svc\" token"},"payload":{"value":"1.00"}}"#
        );
        assert_eq!(body(STORED, Some(&token)).unwrap(), sent, "same bytes every time");
    }

    #[test]
    fn a_stored_token_is_replaced_and_empty_meta_data_works() {
        let token = Secret::new("relay");
        let sent = body(r#"{"meta_data":{"token":"client"}}"#, Some(&token)).unwrap();
        assert_eq!(sent, r#"{"meta_data":{"token":"relay"}}"#);
    }

    #[test]
    fn a_payload_that_is_not_an_object_is_an_error() {
        let token = Secret::new("t");
        assert!(body("[]", Some(&token)).is_err());
        assert!(body(r#"{"payload":{}}"#, Some(&token)).is_err());
    }
}
