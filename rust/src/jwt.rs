//! HMAC-signed tokens (HS256/384/512): the JWS checks, by the `jsonwebtoken` crate.
//!
//! A token's shape (three base64url parts), its header's `alg` (pinned: only the
//! verifier's algorithm is accepted) and its signature (constant-time, by ring) are
//! checked here, trying each key in order (a secret rotation has two). What comes back is
//! the payload's JSON text exactly as signed: its claims are the caller's to check (the
//! Python `TokenVerifier` checks every token's claims in one place, whatever verified its
//! signature), so nothing here reads the clock or interprets a claim.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Why a token was refused; the caller words it (the wording is part of its contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not three base64url parts, a header that is not a JSON object with an `alg`
    /// this library knows (`none` included), a payload that is not base64url JSON.
    Malformed,
    /// The header names another algorithm than the verifier's.
    Algorithm,
    /// No key gives the signature.
    Signature,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Algorithm => "algorithm",
            Refusal::Signature => "signature",
        }
    }
}

/// A verifier of one HMAC algorithm with one or more secrets (the current one first).
pub struct HmacVerifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
}

/// The HMAC algorithm named `name` (`HS256`, `HS384`, `HS512`), else None.
pub fn hmac_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "HS256" => Some(Algorithm::HS256),
        "HS384" => Some(Algorithm::HS384),
        "HS512" => Some(Algorithm::HS512),
        _ => None,
    }
}

impl HmacVerifier {
    /// `secrets` must not be empty (the caller checks their lengths: RFC 7518 3.2).
    pub fn new(algorithm: Algorithm, secrets: &[&[u8]]) -> Self {
        assert!(!secrets.is_empty(), "an HmacVerifier needs a secret");
        // Signature and algorithm only: no claim is required or checked here.
        let mut validation = Validation::new(algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        Self {
            keys: secrets
                .iter()
                .map(|s| DecodingKey::from_secret(s))
                .collect(),
            validation,
        }
    }

    /// The payload's JSON text of a token signed with one of the keys. A panic inside
    /// the libraries (a defect: the fuzz target `jwt_payload` looks for one) refuses the
    /// token rather than unwinding into the server, which would end it.
    pub fn payload(&self, token: &str) -> Result<Vec<u8>, Refusal> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.checked(token)))
            .unwrap_or(Err(Refusal::Malformed))
    }

    fn checked(&self, token: &str) -> Result<Vec<u8>, Refusal> {
        for key in &self.keys {
            match jsonwebtoken::decode::<serde::de::IgnoredAny>(token, key, &self.validation) {
                Ok(_) => {
                    // Verified: the middle part is base64url (decode just read it) and
                    // JSON, though serde_json skips the claims it ignores without checking
                    // their strings' UTF-8 (the fuzz target's first find): checked here.
                    let middle = token.split('.').nth(1).ok_or(Refusal::Malformed)?;
                    let json = URL_SAFE_NO_PAD
                        .decode(middle)
                        .map_err(|_| Refusal::Malformed)?;
                    return match std::str::from_utf8(&json) {
                        Ok(_) => Ok(json),
                        Err(_) => Err(Refusal::Malformed),
                    };
                }
                Err(err) => match err.kind() {
                    ErrorKind::InvalidSignature => continue, // rotation: the next secret
                    ErrorKind::InvalidAlgorithm => return Err(Refusal::Algorithm),
                    _ => return Err(Refusal::Malformed),
                },
            }
        }
        Err(Refusal::Signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OLD: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn token(alg: Algorithm, key: &[u8], claims: &serde_json::Value) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).unwrap()
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn gives_the_payload_as_signed_with_any_of_its_keys() {
        let claims = serde_json::json!({"sub": "alice", "exp": 5, "x": [1, 2.5, null]});
        let verifier = HmacVerifier::new(Algorithm::HS256, &[SECRET, OLD]);
        for key in [SECRET, OLD] {
            let got = verifier
                .payload(&token(Algorithm::HS256, key, &claims))
                .unwrap();
            let parsed: serde_json::Value = serde_json::from_slice(&got).unwrap();
            assert_eq!(parsed, claims);
        }
        let other = token(
            Algorithm::HS256,
            b"another secret, long enough....",
            &claims,
        );
        assert_eq!(verifier.payload(&other), Err(Refusal::Signature));
    }

    #[test]
    fn the_algorithm_is_pinned() {
        let claims = serde_json::json!({"sub": "alice"});
        let hs256 = HmacVerifier::new(Algorithm::HS256, &[SECRET]);
        let hs512 = token(Algorithm::HS512, SECRET, &claims);
        assert_eq!(hs256.payload(&hs512), Err(Refusal::Algorithm));
        // alg none (any case) is no algorithm at all: refused before any key is tried.
        for alg in ["none", "None", "NONE"] {
            let header = b64(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            let unsigned = format!("{header}.{}.", b64(r#"{"sub":"alice"}"#));
            assert_eq!(hs256.payload(&unsigned), Err(Refusal::Malformed));
        }
        let hs512_verifier = HmacVerifier::new(Algorithm::HS512, &[SECRET]);
        assert!(hs512_verifier.payload(&hs512).is_ok());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let verifier = HmacVerifier::new(Algorithm::HS256, &[SECRET]);
        let good = token(Algorithm::HS256, SECRET, &serde_json::json!({"sub": "a"}));
        let (head, rest) = good.split_once('.').unwrap();
        let mut cases = vec![
            String::new(),
            "a.b".into(),
            "..".into(),
            format!("{good}.x"),                           // four parts
            format!("{head}=.{rest}"),                     // padding
            format!("{}.{rest}", b64("[]")),               // a header that is no object
            format!("{}.{rest}", b64(r#"{"typ":"JWT"}"#)), // no alg
        ];
        // A signed payload with a string that is not UTF-8 in a claim no check reads.
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
        let input = format!("{head}.{}", URL_SAFE_NO_PAD.encode(b"{\"x\":\"\x8f\"}"));
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
        assert_eq!(
            verifier.payload(&format!("{input}.{sig}")),
            Err(Refusal::Malformed)
        );
        // A payload that is not base64url: refused, whatever the signature.
        cases.push(format!("{head}.!!!.{}", rest.split_once('.').unwrap().1));
        for bad in cases {
            let got = verifier.payload(&bad);
            assert!(
                matches!(got, Err(Refusal::Malformed | Refusal::Signature)),
                "{bad:?}: {got:?}"
            );
        }
    }
}
