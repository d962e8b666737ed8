//! Serializer vsn 2.0.0 text frames: `[join_ref, ref, topic, event, payload]`.

use serde_json::value::RawValue;

use super::{DecodeError, Inbound, InboundPayload, json_opt_string, json_string, ref_from_json};

pub fn decode(text: &str) -> Result<Inbound, DecodeError> {
    let parts: Vec<Box<RawValue>> =
        serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    // Extra trailing elements are ignored, as the Elixir server does.
    if parts.len() < 5 {
        return Err(DecodeError::Shape("array needs 5 elements"));
    }
    let mut it = parts.into_iter();
    let mut next_value = || -> Result<serde_json::Value, DecodeError> {
        let raw = it
            .next()
            .ok_or(DecodeError::Shape("array needs 5 elements"))?;
        serde_json::from_str(raw.get()).map_err(|e| DecodeError::Json(e.to_string()))
    };
    let join_ref = ref_from_json(&next_value()?)?;
    let msg_ref = ref_from_json(&next_value()?)?;
    let topic = match next_value()? {
        serde_json::Value::String(s) => s,
        _ => return Err(DecodeError::Shape("topic must be a string")),
    };
    let event = match next_value()? {
        serde_json::Value::String(s) => s,
        _ => return Err(DecodeError::Shape("event must be a string")),
    };
    let payload = it
        .next()
        .ok_or(DecodeError::Shape("array needs 5 elements"))?;
    Ok(Inbound {
        join_ref,
        msg_ref,
        topic,
        event,
        payload: InboundPayload::Json(payload),
    })
}

pub fn encode(
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &str,
) -> String {
    format!(
        "[{},{},{},{},{}]",
        json_opt_string(join_ref),
        json_opt_string(msg_ref),
        json_string(topic),
        json_string(event),
        payload
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn round_trip() {
        let s = encode(
            Some("3"),
            Some("12"),
            "realtime:room-1",
            "phx_join",
            r#"{"config":{"private":true}}"#,
        );
        let m = decode(&s).unwrap();
        assert_eq!(m.join_ref.as_deref(), Some("3"));
        assert_eq!(m.msg_ref.as_deref(), Some("12"));
        assert_eq!(m.topic, "realtime:room-1");
        assert_eq!(m.event, "phx_join");
        assert_eq!(
            m.json_payload().unwrap().get(),
            r#"{"config":{"private":true}}"#
        );
    }

    #[test]
    fn nulls_and_extra_elements() {
        let m = decode(r#"[null,"7","phoenix","heartbeat",{},"extra"]"#).unwrap();
        assert_eq!(m.join_ref, None);
        assert_eq!(m.msg_ref.as_deref(), Some("7"));
        let s = encode(None, None, "t", "broadcast", "{}");
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, json!([null, null, "t", "broadcast", {}]));
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(matches!(decode("[1,2,3,4]"), Err(DecodeError::Shape(_))));
        assert!(matches!(
            decode(r#"[null,null,1,"e",{}]"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode(r#"[null,null,"t",null,{}]"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode(r#"[[],null,"t","e",{}]"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode(r#"{"topic":"t"}"#),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(decode("[null,"), Err(DecodeError::Json(_))));
        assert!(matches!(decode(""), Err(DecodeError::Json(_))));
    }

    #[test]
    fn escapes_strings() {
        let s = encode(Some("a\"b"), None, "t\\", "e\n", "1");
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, json!(["a\"b", null, "t\\", "e\n", 1]));
    }
}
