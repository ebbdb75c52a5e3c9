//! P-256 signing keys for CAs, JWT-SVIDs and broker-generated leaves.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;

use crate::{PkiError, SecretBytes};

/// A P-256 private key. It can sign certificates (ASN.1 ECDSA signatures, through rcgen's
/// [`rcgen::SigningKey`]) and JWS (fixed-size signatures for ES256).
///
/// The key bytes live inside aws-lc, which wipes them when the key is dropped; `Debug` prints
/// only the key id.
pub struct EcKey {
    asn1: EcdsaKeyPair,
    fixed: EcdsaKeyPair,
    kid: String,
}

impl EcKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, PkiError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .map_err(|_| PkiError::Crypto("P-256 key generation failed"))?;
        let der = pair
            .to_pkcs8v1()
            .map_err(|_| PkiError::Crypto("P-256 key serialization failed"))?;
        Self::from_pkcs8(der.as_ref())
    }

    /// Loads a PKCS#8 (v1 or v2) P-256 private key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, PkiError> {
        let asn1 = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der)
            .map_err(|_| PkiError::BadKey("not a PKCS#8 P-256 private key"))?;
        let fixed = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| PkiError::BadKey("not a PKCS#8 P-256 private key"))?;
        let kid = jwk_thumbprint(asn1.public_key().as_ref())?;
        Ok(EcKey { asn1, fixed, kid })
    }

    /// Loads a PEM `PRIVATE KEY` (PKCS#8).
    pub fn from_pkcs8_pem(pem_text: &str) -> Result<Self, PkiError> {
        let p = pem::parse(pem_text).map_err(|_| PkiError::BadKey("not PEM"))?;
        if p.tag() != "PRIVATE KEY" {
            return Err(PkiError::BadKey(
                "expected a PEM \"PRIVATE KEY\" (PKCS#8) block",
            ));
        }
        Self::from_pkcs8(p.contents())
    }

    /// The private key as PKCS#8 DER, for sealing or writing to a 0600 file.
    pub fn to_pkcs8(&self) -> Result<SecretBytes, PkiError> {
        let doc = self
            .asn1
            .to_pkcs8v1()
            .map_err(|_| PkiError::Crypto("P-256 key serialization failed"))?;
        // `doc` zeroizes its own copy on drop.
        Ok(SecretBytes::new(doc.as_ref().to_vec()))
    }

    /// The private key as a PEM `PRIVATE KEY` block.
    pub fn to_pkcs8_pem(&self) -> Result<SecretBytes, PkiError> {
        Ok(pkcs8_to_pem(self.to_pkcs8()?.expose_secret()))
    }

    /// The public key as an uncompressed SEC1 point (65 bytes).
    pub fn public_point(&self) -> &[u8] {
        self.asn1.public_key().as_ref()
    }

    /// The RFC 7638 JWK thumbprint of the public key; used as the JWT `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// An ES256 JWS signature (64 bytes, r || s) over `msg`.
    ///
    /// The signature is in canonical low-S form (`s ≤ n/2`): ECDSA accepts both `(r, s)` and
    /// `(r, n − s)`, and Sigil's verifiers accept only the low one, so each token has exactly
    /// one valid encoding.
    pub fn sign_es256(&self, msg: &[u8]) -> Result<Vec<u8>, PkiError> {
        let sig = self
            .fixed
            .sign(&SystemRandom::new(), msg)
            .map_err(|_| PkiError::Crypto("ES256 signing failed"))?;
        let mut sig = sig.as_ref().to_vec();
        if sig.len() != 64 {
            return Err(PkiError::Crypto("ES256 signature has the wrong length"));
        }
        if !is_low_s(&sig[32..]) {
            let s = negate_mod_n(&sig[32..]);
            sig[32..].copy_from_slice(&s);
        }
        Ok(sig)
    }
}

/// The order n of the P-256 group, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];
/// ⌊n / 2⌋, big-endian: the largest canonical `s`.
const P256_HALF_N: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xde, 0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8,
];

/// Whether the 32-byte big-endian `s` of a P-256 signature is in low-S form (`s ≤ n/2`).
pub fn is_low_s(s: &[u8]) -> bool {
    // Equal-length big-endian integers compare like byte strings.
    s.len() == 32 && s <= P256_HALF_N.as_slice()
}

/// `n − s` for a 32-byte big-endian `0 < s < n`: the other valid `s` of the same signature
/// (public so tests can build the malleated twin of a genuine signature).
pub fn negate_mod_n(s: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    out
}

impl fmt::Debug for EcKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EcKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl rcgen::PublicKeyData for EcKey {
    fn der_bytes(&self) -> &[u8] {
        self.public_point()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for EcKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.asn1
            .sign(&SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

/// A PKCS#8 DER private key (any algorithm) as a PEM `PRIVATE KEY` block.
pub fn pkcs8_to_pem(der: &[u8]) -> SecretBytes {
    let block = pem::Pem::new("PRIVATE KEY", der.to_vec());
    let text = pem::encode(&block);
    // `Pem` does not wipe its buffer; do it by hand.
    zeroize::Zeroize::zeroize(&mut block.into_contents());
    SecretBytes::new(text.into_bytes())
}

/// Splits an uncompressed P-256 point into its base64url `x` and `y` coordinates.
pub(crate) fn point_xy(point: &[u8]) -> Result<(String, String), PkiError> {
    if point.len() != 65 || point[0] != 4 {
        return Err(PkiError::BadKey("not an uncompressed P-256 point"));
    }
    Ok((B64URL.encode(&point[1..33]), B64URL.encode(&point[33..65])))
}

/// RFC 7638 thumbprint of a P-256 public key.
pub(crate) fn jwk_thumbprint(point: &[u8]) -> Result<String, PkiError> {
    let (x, y) = point_xy(point)?;
    // Members in lexicographic order, no whitespace (RFC 7638 section 3).
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    Ok(B64URL.encode(crate::ids::sha256(canonical.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_low_s_and_the_high_s_twin_also_verifies_with_plain_ecdsa() {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
        let k = EcKey::generate().unwrap();
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, k.public_point().to_vec());
        let mut seen_high_twin = 0;
        for i in 0..32u8 {
            let msg = [i; 16];
            let sig = k.sign_es256(&msg).unwrap();
            assert!(is_low_s(&sig[32..]), "every signature is low-S");
            public.verify(&msg, &sig).unwrap();
            // The twin (r, n - s) is a valid ECDSA signature too, in high-S form: exactly the
            // malleability the verifiers refuse.
            let mut twin = sig.clone();
            twin[32..].copy_from_slice(&negate_mod_n(&sig[32..]));
            assert!(!is_low_s(&twin[32..]));
            public.verify(&msg, &twin).unwrap();
            seen_high_twin += 1;
        }
        assert_eq!(seen_high_twin, 32);
        assert!(is_low_s(&P256_HALF_N));
        let mut above = P256_HALF_N;
        above[31] += 1;
        assert!(!is_low_s(&above));
        assert_eq!(negate_mod_n(&negate_mod_n(&above)), above);
    }

    #[test]
    fn pkcs8_round_trip_keeps_the_key() {
        let k = EcKey::generate().unwrap();
        let der = k.to_pkcs8().unwrap();
        let k2 = EcKey::from_pkcs8(der.expose_secret()).unwrap();
        assert_eq!(k.public_point(), k2.public_point());
        assert_eq!(k.kid(), k2.kid());
        let pem = k.to_pkcs8_pem().unwrap();
        let k3 = EcKey::from_pkcs8_pem(std::str::from_utf8(pem.expose_secret()).unwrap()).unwrap();
        assert_eq!(k.kid(), k3.kid());
    }

    #[test]
    fn debug_shows_kid_not_key() {
        let k = EcKey::generate().unwrap();
        let d = format!("{k:?}");
        assert!(d.contains(k.kid()));
        let der = k.to_pkcs8().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.expose_secret());
        assert!(!d.contains(&b64[..20]));
    }

    #[test]
    fn garbage_is_not_a_key() {
        assert!(EcKey::from_pkcs8(b"not a key").is_err());
        assert!(
            EcKey::from_pkcs8_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }

    #[test]
    fn thumbprint_matches_rfc7638_shape() {
        let k = EcKey::generate().unwrap();
        // 32-byte SHA-256, base64url without padding.
        assert_eq!(k.kid().len(), 43);
    }
}
