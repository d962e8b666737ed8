//! JWT verification with Supabase Realtime's rules. The texts of [`JwtError`] are in
//! `refusal.rs`, with every other refusal text.

use std::collections::HashSet;
use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// Verified claims of a token. Kept on every channel because private-channel authorization runs
/// RLS checks as `role` with `request.jwt.claims` = `json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    pub role: String,
    pub sub: Option<String>,
    /// Unix seconds.
    pub exp: i64,
    /// The full claim set, as JSON object text.
    pub json: Arc<str>,
}

/// Why a token is not accepted; see `refusal.rs` for its texts at connect, join and refresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwtError {
    Missing,
    Expired {
        seconds_ago: i64,
    },
    MissingClaims,
    /// `role` is `none` (any case): `SET ROLE none` means "back to the session user", which in
    /// the worker is a superuser, so such a token could read and write every private channel.
    RoleNotAllowed,
    Malformed,
    BadSignature,
    Signer,
}

struct KeyEntry {
    kid: Option<String>,
    key: DecodingKey,
    hmac: bool,
}

/// Holds the configured secret and JWKS keys; cheap to share, rebuilt on reload.
pub struct JwtVerifier {
    secret: Option<DecodingKey>,
    keys: Vec<KeyEntry>,
}

impl JwtVerifier {
    /// Unusable JWKS entries are skipped with a warning rather than failing: one bad key must not
    /// lock every client out.
    pub fn new(secret: Option<&str>, jwks: Option<&str>) -> Self {
        let secret = secret
            .filter(|s| !s.is_empty())
            .map(|s| DecodingKey::from_secret(s.as_bytes()));
        let mut keys = Vec::new();
        if let Some(doc) = jwks.filter(|s| !s.trim().is_empty()) {
            match serde_json::from_str::<Value>(doc) {
                Ok(v) => {
                    let list = v.get("keys").and_then(Value::as_array).cloned();
                    match list {
                        Some(list) => {
                            for raw in list {
                                match serde_json::from_value::<Jwk>(raw) {
                                    Ok(jwk) => match DecodingKey::from_jwk(&jwk) {
                                        Ok(key) => keys.push(KeyEntry {
                                            kid: jwk.common.key_id.clone(),
                                            hmac: matches!(
                                                jwk.algorithm,
                                                AlgorithmParameters::OctetKey(_)
                                            ),
                                            key,
                                        }),
                                        Err(e) => log::warn!("ignoring unusable JWKS key: {e}"),
                                    },
                                    Err(e) => log::warn!("ignoring unparsable JWKS key: {e}"),
                                }
                            }
                        }
                        None => log::warn!("realtime.jwt_jwks has no \"keys\" array; ignored"),
                    }
                }
                Err(e) => log::warn!("realtime.jwt_jwks is not valid JSON ({e}); ignored"),
            }
        }
        JwtVerifier { secret, keys }
    }

    fn key_for(&self, alg: Algorithm, kid: Option<&str>) -> Option<&DecodingKey> {
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let by_kid = kid.and_then(|kid| {
            self.keys
                .iter()
                .find(|k| k.hmac == hmac && k.kid.as_deref() == Some(kid))
                .map(|k| &k.key)
        });
        match by_kid {
            Some(key) => Some(key),
            // HS tokens whose kid is unknown fall back to the shared secret, as Supabase does.
            None if hmac => self.secret.as_ref(),
            None => None,
        }
    }

    /// Verifies `token` at unix time `now`.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, JwtError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(JwtError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        let key = self
            .key_for(header.alg, header.kid.as_deref())
            .ok_or(JwtError::Signer)?;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => JwtError::BadSignature,
                ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidKeyFormat => JwtError::Signer,
                _ => JwtError::Malformed,
            })?;
        let claims = data.claims;
        let exp = match claims.get("exp") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_f64().ok_or(JwtError::Malformed)?.round() as i64),
        };
        if let Some(iat) = claims.get("iat")
            && !iat.is_number()
        {
            return Err(JwtError::Malformed);
        }
        if let Some(exp) = exp
            && exp <= now
        {
            return Err(JwtError::Expired {
                seconds_ago: now - exp,
            });
        }
        let role = claims.get("role").and_then(|r| match r {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            _ => None,
        });
        if role
            .as_deref()
            .is_some_and(|r| r.trim().eq_ignore_ascii_case("none"))
        {
            return Err(JwtError::RoleNotAllowed);
        }
        let (Some(role), Some(exp)) = (role, exp) else {
            return Err(JwtError::MissingClaims);
        };
        let sub = claims.get("sub").and_then(|s| match s {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        });
        let json: Arc<str> = Value::Object(claims).to_string().into();
        Ok(Claims {
            role,
            sub,
            exp,
            json,
        })
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    pub(crate) const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

    pub(crate) fn hs256(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    // A fixed Ed25519 test key pair (RFC 8032 section 7.1, test 1), committed on purpose.
    const ED_PKCS8_HEX: &str = "302e020100300506032b657004220420\
        9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";

    fn ed_pkcs8() -> Vec<u8> {
        let hex: String = ED_PKCS8_HEX.split_whitespace().collect();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }
    const ED_PUBLIC_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    fn ed_token(kid: &str, claims: Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_string());
        encode(&header, &claims, &EncodingKey::from_ed_der(&ed_pkcs8())).unwrap()
    }

    fn jwks() -> String {
        json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": ED_PUBLIC_X, "kid": "ed1", "alg": "EdDSA"},
            {"kty": "oct", "k": "b2N0LXNlY3JldA", "kid": "oct1"},
            {"kty": "unknown-type", "kid": "junk"}
        ]})
        .to_string()
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn hs256_ok_keeps_claims() {
        let v = JwtVerifier::new(Some(SECRET), None);
        let t = hs256(json!({"role": "authenticated", "sub": "u1", "exp": NOW + 60, "x": 1}));
        let c = v.verify(&format!("  {t}\n"), NOW).unwrap();
        assert_eq!(c.role, "authenticated");
        assert_eq!(c.sub.as_deref(), Some("u1"));
        assert_eq!(c.exp, NOW + 60);
        let parsed: Value = serde_json::from_str(&c.json).unwrap();
        assert_eq!(parsed["x"], 1);
    }

    #[test]
    fn expired_reports_seconds() {
        let v = JwtVerifier::new(Some(SECRET), None);
        let t = hs256(json!({"role": "anon", "exp": NOW - 42}));
        let e = v.verify(&t, NOW).unwrap_err();
        assert_eq!(e, JwtError::Expired { seconds_ago: 42 });
        assert_eq!(
            e.join_reason(),
            "InvalidJWTToken: Token has expired 42 seconds ago"
        );
        assert_eq!(e.connect_message(), "Token has expired");
    }

    #[test]
    fn role_and_exp_required() {
        let v = JwtVerifier::new(Some(SECRET), None);
        for claims in [json!({"role": "anon"}), json!({"exp": NOW + 10})] {
            let e = v.verify(&hs256(claims), NOW).unwrap_err();
            assert_eq!(e, JwtError::MissingClaims);
            assert_eq!(
                e.join_reason(),
                "InvalidJWTToken: Fields `role` and `exp` are required in JWT"
            );
        }
    }

    #[test]
    fn role_none_or_blank_is_refused() {
        let v = JwtVerifier::new(Some(SECRET), None);
        for role in ["none", "NONE", " None "] {
            let e = v
                .verify(&hs256(json!({"role": role, "exp": NOW + 10})), NOW)
                .unwrap_err();
            assert_eq!(e, JwtError::RoleNotAllowed, "{role:?}");
            assert_eq!(
                e.join_reason(),
                "InvalidJWTToken: The `role` claim of the JWT is not allowed"
            );
        }
        let e = v
            .verify(&hs256(json!({"role": "  ", "exp": NOW + 10})), NOW)
            .unwrap_err();
        assert_eq!(e, JwtError::MissingClaims);
        assert!(
            v.verify(&hs256(json!({"role": "nonexistent", "exp": NOW + 10})), NOW)
                .is_ok()
        );
    }

    #[test]
    fn malformed_and_bad_signature() {
        let v = JwtVerifier::new(Some(SECRET), None);
        assert_eq!(v.verify("not a jwt", NOW), Err(JwtError::Malformed));
        assert_eq!(v.verify("", NOW), Err(JwtError::Missing));
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({"role": "anon", "exp": NOW + 10}),
            &EncodingKey::from_secret(b"another secret"),
        )
        .unwrap();
        let e = v.verify(&other, NOW).unwrap_err();
        assert_eq!(e, JwtError::BadSignature);
        assert_eq!(
            e.join_reason(),
            "JwtSignatureError: Failed to validate JWT signature"
        );
        assert_eq!(
            JwtError::Malformed.join_reason(),
            "MalformedJWT: The token provided is not a valid JWT"
        );
    }

    #[test]
    fn hs384_and_hs512() {
        let v = JwtVerifier::new(Some(SECRET), None);
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let t = encode(
                &Header::new(alg),
                &json!({"role": "anon", "exp": NOW + 10}),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap();
            assert!(v.verify(&t, NOW).is_ok(), "{alg:?}");
        }
    }

    #[test]
    fn no_secret_is_a_signer_error() {
        let v = JwtVerifier::new(None, None);
        assert_eq!(
            v.verify(&hs256(json!({"role": "anon", "exp": NOW + 10})), NOW),
            Err(JwtError::Signer)
        );
    }

    #[test]
    fn eddsa_by_kid_from_jwks() {
        let v = JwtVerifier::new(None, Some(&jwks()));
        let good = ed_token("ed1", json!({"role": "authenticated", "exp": NOW + 10}));
        assert_eq!(v.verify(&good, NOW).unwrap().role, "authenticated");
        let unknown_kid = ed_token("nope", json!({"role": "authenticated", "exp": NOW + 10}));
        assert_eq!(v.verify(&unknown_kid, NOW), Err(JwtError::Signer));
        // Tamper with the payload: the signature no longer matches.
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        parts[1] = hs256(json!({"role": "service_role", "exp": NOW + 10}))
            .split('.')
            .nth(1)
            .unwrap()
            .to_string();
        assert_eq!(v.verify(&parts.join("."), NOW), Err(JwtError::BadSignature));
    }

    #[test]
    fn oct_key_by_kid_and_fallback_to_secret() {
        let v = JwtVerifier::new(Some(SECRET), Some(&jwks()));
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("oct1".into());
        let claims = json!({"role": "anon", "exp": NOW + 10});
        let t = encode(&header, &claims, &EncodingKey::from_secret(b"oct-secret")).unwrap();
        assert!(v.verify(&t, NOW).is_ok());
        header.kid = Some("unknown".into());
        let t = encode(
            &header,
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&t, NOW).is_ok());
    }

    #[test]
    fn hs_token_cannot_use_asymmetric_kid() {
        let v = JwtVerifier::new(None, Some(&jwks()));
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("ed1".into());
        let t = encode(
            &header,
            &json!({"role": "anon", "exp": NOW + 10}),
            &EncodingKey::from_secret(ED_PUBLIC_X.as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&t, NOW).is_err());
    }
}
