//! Serializer vsn 1.0.0: JSON objects. Server → client objects carry only topic, event, payload
//! and ref, as Phoenix's V1 serializer does.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{DecodeError, Inbound, InboundPayload, json_opt_string, json_string, ref_from_json};

#[derive(Deserialize)]
struct WireIn {
    topic: String,
    event: String,
    payload: Option<Box<RawValue>>,
    #[serde(rename = "ref", default)]
    msg_ref: serde_json::Value,
    #[serde(default)]
    join_ref: serde_json::Value,
}

pub fn decode(text: &str) -> Result<Inbound, DecodeError> {
    let w: WireIn = serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    let payload = match w.payload {
        Some(p) => p,
        None => empty_object(),
    };
    Ok(Inbound {
        join_ref: ref_from_json(&w.join_ref)?,
        msg_ref: ref_from_json(&w.msg_ref)?,
        topic: w.topic,
        event: w.event,
        payload: InboundPayload::Json(payload),
    })
}

pub(crate) fn empty_object() -> Box<RawValue> {
    // `{}` is always valid; the default (null) is only there to avoid an unwrap.
    RawValue::from_string("{}".to_string()).unwrap_or_default()
}

pub fn encode(msg_ref: Option<&str>, topic: &str, event: &str, payload: &str) -> String {
    format!(
        "{{\"topic\":{},\"event\":{},\"payload\":{},\"ref\":{}}}",
        json_string(topic),
        json_string(event),
        payload,
        json_opt_string(msg_ref)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn decodes_realtime_js_join() {
        let m = decode(
            r#"{"topic":"realtime:room-1","event":"phx_join","payload":{"config":{}},"ref":"3","join_ref":"3"}"#,
        )
        .unwrap();
        assert_eq!(m.topic, "realtime:room-1");
        assert_eq!(m.event, "phx_join");
        assert_eq!(m.msg_ref.as_deref(), Some("3"));
        assert_eq!(m.join_ref.as_deref(), Some("3"));
        assert_eq!(m.json_payload().unwrap().get(), r#"{"config":{}}"#);
    }

    #[test]
    fn tolerates_missing_refs_and_payload() {
        let m = decode(r#"{"topic":"phoenix","event":"heartbeat","ref":7}"#).unwrap();
        assert_eq!(m.msg_ref.as_deref(), Some("7"));
        assert_eq!(m.join_ref, None);
        assert_eq!(m.json_payload().unwrap().get(), "{}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(decode("{"), Err(DecodeError::Json(_))));
        assert!(matches!(decode("[1,2]"), Err(DecodeError::Json(_))));
        assert!(matches!(
            decode(r#"{"topic":"t","event":"e","ref":{}}"#),
            Err(DecodeError::Shape(_))
        ));
    }

    #[test]
    fn encodes_only_v1_fields() {
        let s = encode(
            Some("3"),
            "realtime:a\"b",
            "phx_reply",
            r#"{"status":"ok"}"#,
        );
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            v,
            json!({"topic":"realtime:a\"b","event":"phx_reply","payload":{"status":"ok"},"ref":"3"})
        );
        let v: Value = serde_json::from_str(&encode(None, "t", "e", "{}")).unwrap();
        assert_eq!(v["ref"], Value::Null);
    }
}
