//! The byte work of a token's check (JWS compact serialization, RFC 7515 section 7.1):
//! its three base64url parts decoded, and HMAC signatures (HS256/384/512) verified by
//! ring, in constant time, against each secret of a rotation.
//!
//! Nothing here reads JSON or knows a claim: the header's `alg` and every claim are
//! checked by the Python `TokenVerifier`, the same way whatever checks the signature
//! (this module for HMAC, pyjwt's algorithms for public keys), so both give one answer
//! to one token. (A JWT crate's typed header and claims once made the two paths differ:
//! `"typ": 1` or a `sub` given as an array were refused by one and not the other.)

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;

/// A token's parts, decoded: header JSON, payload JSON, signature. `None` unless it is
/// exactly three parts of canonical unpadded base64url (the signature may be empty),
/// so the parts encode back to the very token.
pub fn parts(token: &str) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let mut split = token.split('.');
    let (header, payload, signature) = (split.next()?, split.next()?, split.next()?);
    if split.next().is_some() {
        return None;
    }
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).ok();
    Some((decode(header)?, decode(payload)?, decode(signature)?))
}

/// The HMAC algorithm named `name` (`HS256`, `HS384`, `HS512`), else None.
pub fn hmac_algorithm(name: &str) -> Option<hmac::Algorithm> {
    match name {
        "HS256" => Some(hmac::HMAC_SHA256),
        "HS384" => Some(hmac::HMAC_SHA384),
        "HS512" => Some(hmac::HMAC_SHA512),
        _ => None,
    }
}

/// One HMAC algorithm's secrets, the current one first.
pub struct HmacVerifier {
    keys: Vec<hmac::Key>,
}

impl HmacVerifier {
    /// The caller checks the secrets' lengths (RFC 7518 section 3.2).
    pub fn new(algorithm: hmac::Algorithm, secrets: &[&[u8]]) -> Self {
        Self {
            keys: secrets
                .iter()
                .map(|s| hmac::Key::new(algorithm, s))
                .collect(),
        }
    }

    /// Whether one of the secrets gives `signature` over `signing_input` (the token's
    /// first two parts as sent, with the dot between them).
    pub fn verify(&self, signing_input: &[u8], signature: &[u8]) -> bool {
        self.keys
            .iter()
            .any(|key| hmac::verify(key, signing_input, signature).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OLD: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn b64(data: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(data)
    }

    fn signed(key: &[u8], alg: hmac::Algorithm, header: &str, payload: &str) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let tag = hmac::sign(&hmac::Key::new(alg, key), input.as_bytes());
        format!("{input}.{}", b64(tag.as_ref()))
    }

    #[test]
    fn parts_are_decoded_only_from_the_canonical_form() {
        let token = signed(
            SECRET,
            hmac::HMAC_SHA256,
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a"}"#,
        );
        let (header, payload, signature) = parts(&token).unwrap();
        assert_eq!(header, br#"{"alg":"HS256"}"#);
        assert_eq!(payload, br#"{"sub":"a"}"#);
        assert_eq!(signature.len(), 32);
        let (head, rest) = token.split_once('.').unwrap();
        let unsigned = format!("{head}.{}.", b64(b"{}"));
        assert_eq!(parts(&unsigned).unwrap().2, b"");
        for bad in [
            String::new(),
            "a.b".into(),
            format!("{token}.x"),      // four parts
            format!("{head}=.{rest}"), // padding
            format!("{head} .{rest}"), // whitespace
            format!("{head}+.{rest}"), // the other base64 alphabet
            format!("{head}A.{rest}"), // a length base64 cannot have (4n + 1)
            format!("YR.{rest}"),      // bits left over ("a" is YQ): not canonical
        ] {
            assert!(parts(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_signature_verifies_with_any_of_the_secrets_and_its_algorithm_only() {
        let verifier = HmacVerifier::new(hmac::HMAC_SHA256, &[SECRET, OLD]);
        for key in [SECRET, OLD] {
            let token = signed(key, hmac::HMAC_SHA256, "{}", "{}");
            let input = &token[..token.rfind('.').unwrap()];
            assert!(verifier.verify(input.as_bytes(), &parts(&token).unwrap().2));
        }
        let other = signed(
            b"another secret, long enough.....",
            hmac::HMAC_SHA256,
            "{}",
            "{}",
        );
        let hs512 = signed(SECRET, hmac::HMAC_SHA512, "{}", "{}");
        for token in [other, hs512] {
            let input = &token[..token.rfind('.').unwrap()];
            assert!(!verifier.verify(input.as_bytes(), &parts(&token).unwrap().2));
        }
        assert!(!verifier.verify(b"anything", b""));
    }
}
