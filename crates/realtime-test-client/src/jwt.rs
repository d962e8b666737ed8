//! HS256 tokens signed with a shared secret (`realtime.jwt_secret`), as a Supabase anon key or
//! a Supabase Auth user token is.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;

/// The JOSE header of every well-formed token here.
pub const HS256_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Base64url without padding, the encoding of every JWT part.
pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `header.claims.signature`: signs whatever texts it is given, so fuzz tests can build tokens
/// with odd headers or claims that are not JSON objects.
pub fn sign(header_json: &str, claims_json: &str, secret: &str) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header_json.as_bytes()),
        b64url(claims_json.as_bytes())
    );
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(&mac.finalize().into_bytes()))
}

/// [`sign`] for a header and claims given as JSON values (rendered compactly).
pub fn sign_json(header: &Value, claims: &Value, secret: &str) -> String {
    sign(&header.to_string(), &claims.to_string(), secret)
}

/// A token with exactly `claims` under the [`HS256_HEADER`].
pub fn sign_claims(claims: &Value, secret: &str) -> String {
    sign(HS256_HEADER, &claims.to_string(), secret)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A token for `role` (and user `sub`, as Supabase Auth issues them), issued now and valid for
/// a day (longer than any test or benchmark run).
pub fn token(secret: &str, role: &str, sub: Option<&str>) -> String {
    let now = now_secs();
    let mut claims = serde_json::json!({"role": role, "iat": now, "exp": now + 24 * 3600});
    if let Some(sub) = sub {
        claims["sub"] = sub.into();
    }
    sign_claims(&claims, secret)
}

/// An anon token valid for a day, as a Supabase anon key.
pub fn anon_token(secret: &str) -> String {
    token(secret, "anon", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hs256_signature_matches_openssl() {
        // `printf e30.e30 | openssl dgst -sha256 -hmac k -binary`, base64url without padding.
        assert_eq!(
            sign("{}", "{}", "k"),
            "e30.e30.U2HnhEsqIJ2joZZVwxmVt6h2cgNNje9sFTHzPTW3q9M"
        );
        let empty = serde_json::json!({});
        assert_eq!(sign_json(&empty, &empty, "k"), sign("{}", "{}", "k"));
    }

    #[test]
    fn tokens_carry_role_sub_and_a_day() {
        let t = token("s", "authenticated", Some("u1"));
        let claims = t.split('.').nth(1).expect("claims");
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .expect("base64url");
        let claims: Value = serde_json::from_slice(&claims).expect("JSON");
        assert_eq!(claims["role"], "authenticated");
        assert_eq!(claims["sub"], "u1");
        assert_eq!(
            claims["exp"]
                .as_u64()
                .zip(claims["iat"].as_u64())
                .map(|(e, i)| e - i),
            Some(24 * 3600)
        );
        assert!(t.starts_with(&b64url(HS256_HEADER.as_bytes())));
        assert!(anon_token("s").split('.').count() == 3);
    }
}
