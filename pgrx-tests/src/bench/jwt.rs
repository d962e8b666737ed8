//! HS256 tokens signed with the cluster's `realtime.jwt_secret`, as a Supabase anon key is.

use base64::Engine;
use hmac::{Hmac, Mac};

use super::stats::now_us;

/// An anon token valid for a day (longer than any run).
pub fn anon_token(secret: &str) -> String {
    token(secret, "anon", None)
}

/// A token for `role` (and user `sub`, as Supabase Auth issues them), valid for a day.
pub fn token(secret: &str, role: &str, sub: Option<&str>) -> String {
    let now = now_us() / 1_000_000;
    let mut claims = serde_json::json!({"role": role, "iat": now, "exp": now + 24 * 3600});
    if let Some(sub) = sub {
        claims["sub"] = sub.into();
    }
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let signing_input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    // HMAC accepts keys of any length, so this cannot fail; fall back to an unsigned token
    // (which the server refuses loudly) rather than panic.
    let signature = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .map(|mut mac| {
            mac.update(signing_input.as_bytes());
            b64(&mac.finalize().into_bytes())
        })
        .unwrap_or_default();
    format!("{signing_input}.{signature}")
}
