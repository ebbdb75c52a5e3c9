//! PKCS#10 certificate signing requests, checked before anything is signed.
//!
//! Only the public key of a CSR is ever used. Its subject and every requested extension
//! (SANs, basic constraints, key usages, anything else) are ignored: the broker decides what
//! goes into a certificate from the identity record alone.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Largest CSR accepted, in bytes of DER.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Why a CSR was refused. Each message names the problem in plain words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// No bytes.
    #[error("csr is empty")]
    Empty,
    /// More than [`MAX_CSR_LEN`] bytes.
    #[error("csr is {0} bytes; the limit is 16384")]
    TooLarge(usize),
    /// Not DER PKCS#10.
    #[error("csr is not a DER-encoded PKCS#10 certification request")]
    Malformed,
    /// Bytes after the request.
    #[error("csr has trailing bytes after the request")]
    TrailingData,
    /// The self-signature does not verify with the CSR's own key.
    #[error("csr signature does not verify with its public key")]
    BadSignature,
    /// A key type Sigil does not certify.
    #[error(
        "csr key algorithm {0} is not supported (use EC P-256, EC P-384, Ed25519 or RSA 2048-8192)"
    )]
    UnsupportedKey(String),
    /// RSA key outside the allowed sizes.
    #[error("csr RSA key is {0} bits; allowed sizes are 2048 to 8192")]
    WeakRsaKey(usize),
}

/// The public key from a CSR whose signature verified.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    raw_key: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
    spki_der: Vec<u8>,
}

impl VerifiedCsr {
    /// Parses a DER CSR, checks its self-signature and keeps only its public key.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.is_empty() {
            return Err(CsrError::Empty);
        }
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge(der.len()));
        }
        let (rest, csr) =
            X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
        if !rest.is_empty() {
            return Err(CsrError::TrailingData);
        }
        let spki = &csr.certification_request_info.subject_pki;
        let alg_oid = &spki.algorithm.algorithm;
        let alg: &'static rcgen::SignatureAlgorithm = if *alg_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| CsrError::UnsupportedKey("EC without a named curve".into()))?;
            if curve == OID_EC_P256 {
                &rcgen::PKCS_ECDSA_P256_SHA256
            } else if curve == OID_NIST_EC_P384 {
                &rcgen::PKCS_ECDSA_P384_SHA384
            } else {
                return Err(CsrError::UnsupportedKey(format!("EC curve {curve}")));
            }
        } else if *alg_oid == OID_SIG_ED25519 {
            &rcgen::PKCS_ED25519
        } else if *alg_oid == OID_PKCS1_RSAENCRYPTION {
            match spki.parsed() {
                Ok(PublicKey::RSA(k)) => {
                    let bits = k.key_size();
                    if !(2048..=8192).contains(&bits) {
                        return Err(CsrError::WeakRsaKey(bits));
                    }
                }
                _ => return Err(CsrError::Malformed),
            }
            &rcgen::PKCS_RSA_SHA256
        } else {
            return Err(CsrError::UnsupportedKey(alg_oid.to_id_string()));
        };
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        Ok(VerifiedCsr {
            raw_key: spki.subject_public_key.data.to_vec(),
            alg,
            spki_der: spki.raw.to_vec(),
        })
    }

    /// The DER SubjectPublicKeyInfo of the requested key.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }
}

/// A DER CSR for `key` with an empty subject and no extensions: all Sigil looks at is the key.
pub fn request_for(key: &crate::EcKey) -> Result<Vec<u8>, crate::PkiError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    Ok(params.serialize_request(key)?.der().to_vec())
}

impl std::fmt::Debug for VerifiedCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedCsr")
            .field("key_bytes", &self.raw_key.len())
            .finish()
    }
}

impl rcgen::PublicKeyData for VerifiedCsr {
    fn der_bytes(&self) -> &[u8] {
        &self.raw_key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PublicKeyData};

    fn csr_for(key: &KeyPair) -> Vec<u8> {
        let params = CertificateParams::new(vec!["ignored.example".into()]).unwrap();
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn keeps_only_the_public_key() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let v = VerifiedCsr::from_der(&csr_for(&key)).unwrap();
        assert_eq!(v.der_bytes(), key.public_key_raw());
        assert_eq!(v.spki_der(), key.subject_public_key_info());
    }

    #[test]
    fn accepts_p384_and_ed25519() {
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            VerifiedCsr::from_der(&csr_for(&key)).unwrap();
        }
    }

    #[test]
    fn refuses_a_tampered_signature() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr_for(&key);
        let n = der.len();
        der[n - 3] ^= 0x01;
        assert_eq!(VerifiedCsr::from_der(&der), Err(CsrError::BadSignature));
    }

    #[test]
    fn refuses_a_request_signed_by_another_key() {
        // Splice key B's SPKI into a request signed by key A: the signature no longer matches.
        let a = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let b = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = csr_for(&a);
        let a_point = a.public_key_raw().to_vec();
        let pos = der
            .windows(a_point.len())
            .position(|w| w == a_point)
            .unwrap();
        let mut forged = der.clone();
        forged[pos..pos + a_point.len()].copy_from_slice(b.public_key_raw());
        assert_eq!(VerifiedCsr::from_der(&forged), Err(CsrError::BadSignature));
    }

    #[test]
    fn malformed_input_gets_a_named_error() {
        assert_eq!(VerifiedCsr::from_der(&[]), Err(CsrError::Empty));
        assert_eq!(VerifiedCsr::from_der(b"hello"), Err(CsrError::Malformed));
        assert_eq!(
            VerifiedCsr::from_der(&vec![0x30; MAX_CSR_LEN + 1]),
            Err(CsrError::TooLarge(MAX_CSR_LEN + 1))
        );
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr_for(&key);
        der.push(0);
        assert_eq!(VerifiedCsr::from_der(&der), Err(CsrError::TrailingData));
    }
}
