//! SPIFFE trust bundles: the SPIFFE bundle JSON document (a JWKS with `use` = `x509-svid` /
//! `jwt-svid`, `spiffe_sequence`, `spiffe_refresh_hint`) and the PEM form of the roots.
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE_Trust_Domain_and_Bundle.md>)

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::key::point_xy;
use crate::{JwtKeys, PkiError, TrustDomain, ca::certs_to_pem};

/// A JWT signing key as published in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// Key id (`kid`).
    pub kid: String,
    /// Uncompressed P-256 point.
    pub public_point: Vec<u8>,
}

/// The keys a verifier in one trust domain needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Root CA certificates.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// JWT verification keys.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// Bumped on every change.
    pub sequence: u64,
    /// How often consumers should re-fetch, in seconds.
    pub refresh_hint: Option<u64>,
}

impl SpiffeBundle {
    /// The SPIFFE bundle JSON document.
    pub fn to_json(&self) -> Result<String, PkiError> {
        let mut keys = Vec::new();
        for cert in &self.x509_authorities {
            let (_, c) = X509Certificate::from_der(cert)
                .map_err(|_| PkiError::BadCertificate("bundle authority is not DER X.509"))?;
            let (x, y) = point_xy(&c.public_key().subject_public_key.data)?;
            keys.push(json!({
                "use": "x509-svid", "kty": "EC", "crv": "P-256", "x": x, "y": y,
                "x5c": [B64.encode(cert)],
            }));
        }
        for k in &self.jwt_authorities {
            keys.push(jwt_key(k, "jwt-svid", None)?);
        }
        let mut doc = json!({ "keys": keys, "spiffe_sequence": self.sequence });
        if let Some(h) = self.refresh_hint {
            doc["spiffe_refresh_hint"] = json!(h);
        }
        serde_json::to_string(&doc).map_err(|_| PkiError::Internal("bundle encoding"))
    }

    /// Parses a SPIFFE bundle document for `trust_domain`. Keys of unknown `use` are skipped
    /// (as the spec requires); malformed keys of a known `use` are errors.
    pub fn from_json(trust_domain: TrustDomain, text: &str) -> Result<Self, PkiError> {
        let doc: Value =
            serde_json::from_str(text).map_err(|_| PkiError::BadBundle("not JSON".into()))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| PkiError::BadBundle("no \"keys\" array".into()))?;
        let mut b = SpiffeBundle {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: doc
                .get("spiffe_sequence")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            refresh_hint: doc.get("spiffe_refresh_hint").and_then(Value::as_u64),
        };
        for (i, k) in keys.iter().enumerate() {
            match k.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = k
                        .get("x5c")
                        .and_then(Value::as_array)
                        .filter(|a| a.len() == 1)
                        .and_then(|a| a[0].as_str())
                        .ok_or_else(|| {
                            PkiError::BadBundle(format!(
                                "keys[{i}]: x509-svid key needs exactly one x5c"
                            ))
                        })?;
                    let der = B64.decode(x5c).map_err(|_| {
                        PkiError::BadBundle(format!("keys[{i}]: x5c is not base64"))
                    })?;
                    X509Certificate::from_der(&der).map_err(|_| {
                        PkiError::BadBundle(format!("keys[{i}]: x5c is not a certificate"))
                    })?;
                    b.x509_authorities.push(CertificateDer::from(der));
                }
                Some("jwt-svid") => {
                    let field = |n: &str| {
                        k.get(n).and_then(Value::as_str).ok_or_else(|| {
                            PkiError::BadBundle(format!("keys[{i}]: jwt-svid key has no {n:?}"))
                        })
                    };
                    if field("kty")? != "EC" || field("crv")? != "P-256" {
                        return Err(PkiError::BadBundle(format!(
                            "keys[{i}]: only EC P-256 JWT keys are supported"
                        )));
                    }
                    let kid = field("kid")?.to_owned();
                    let mut point = vec![4u8];
                    for n in ["x", "y"] {
                        let c = B64URL.decode(field(n)?).map_err(|_| {
                            PkiError::BadBundle(format!("keys[{i}]: {n} is not base64url"))
                        })?;
                        if c.len() != 32 {
                            return Err(PkiError::BadBundle(format!(
                                "keys[{i}]: {n} is not 32 bytes"
                            )));
                        }
                        point.extend_from_slice(&c);
                    }
                    b.jwt_authorities.push(JwtAuthority {
                        kid,
                        public_point: point,
                    });
                }
                _ => {}
            }
        }
        Ok(b)
    }

    /// The JWT keys as a plain JWKS (`use` = `sig`, `alg` = `ES256`), as OIDC discovery serves
    /// it, for any JWT library or a cloud provider's web-identity federation.
    pub fn oidc_jwks(&self) -> Result<String, PkiError> {
        let mut keys = Vec::new();
        for k in &self.jwt_authorities {
            keys.push(jwt_key(k, "sig", Some(crate::jwt::ALG))?);
        }
        serde_json::to_string(&json!({ "keys": keys }))
            .map_err(|_| PkiError::Internal("JWKS encoding"))
    }

    /// The JWT authorities alone, as a SPIFFE bundle (`use` = `jwt-svid`): what the Workload
    /// API's `FetchJWTBundles` serves for the trust domain.
    pub fn jwt_svid_jwks(&self) -> Result<String, PkiError> {
        let mut keys = Vec::new();
        for k in &self.jwt_authorities {
            keys.push(jwt_key(k, "jwt-svid", None)?);
        }
        serde_json::to_string(&json!({ "keys": keys, "spiffe_sequence": self.sequence }))
            .map_err(|_| PkiError::Internal("JWKS encoding"))
    }

    /// The roots as PEM.
    pub fn x509_pem(&self) -> String {
        certs_to_pem(self.x509_authorities.iter())
    }

    /// The JWT keys, for [`crate::jwt::verify`].
    pub fn jwt_keys(&self) -> JwtKeys {
        let mut keys = JwtKeys::default();
        for k in &self.jwt_authorities {
            keys.insert(k.kid.clone(), k.public_point.clone());
        }
        keys
    }
}

/// One JWT authority as a JWK; the same key members in every document that publishes it.
fn jwt_key(k: &JwtAuthority, key_use: &str, alg: Option<&str>) -> Result<Value, PkiError> {
    let (x, y) = point_xy(&k.public_point)?;
    let mut v = json!({"use": key_use, "kty": "EC", "crv": "P-256", "kid": k.kid, "x": x, "y": y});
    if let Some(a) = alg {
        v["alg"] = json!(a);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{CaRole, CertificateAuthority, EcKey};

    #[test]
    fn json_round_trip_and_shape() {
        let td: TrustDomain = "example.org".parse().unwrap();
        let root = CertificateAuthority::new_self_signed(
            CaRole::Root,
            &td,
            EcKey::generate().unwrap(),
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let jwt = EcKey::generate().unwrap();
        let b = SpiffeBundle {
            trust_domain: td.clone(),
            x509_authorities: vec![root.cert().clone()],
            jwt_authorities: vec![JwtAuthority {
                kid: jwt.kid().into(),
                public_point: jwt.public_point().to_vec(),
            }],
            sequence: 7,
            refresh_hint: Some(300),
        };
        let text = b.to_json().unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][1]["use"], "jwt-svid");
        assert_eq!(v["keys"][1]["kid"], jwt.kid());
        // The Workload API's JWT bundle: SPIFFE format, the same key.
        let j: Value = serde_json::from_str(&b.jwt_svid_jwks().unwrap()).unwrap();
        assert_eq!(j["keys"].as_array().unwrap().len(), 1);
        assert_eq!(j["keys"][0], v["keys"][1]);
        let o: Value = serde_json::from_str(&b.oidc_jwks().unwrap()).unwrap();
        assert_eq!(o["keys"][0]["use"], "sig");
        for m in ["kty", "crv", "kid", "x", "y"] {
            assert_eq!(o["keys"][0][m], j["keys"][0][m], "{m}");
        }
        assert_eq!(SpiffeBundle::from_json(td.clone(), &text).unwrap(), b);
        assert!(b.x509_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(b.jwt_keys().get(jwt.kid()), Some(jwt.public_point()));
    }

    #[test]
    fn bad_documents_name_the_key() {
        let td: TrustDomain = "example.org".parse().unwrap();
        let e = SpiffeBundle::from_json(
            td.clone(),
            r#"{"keys":[{"use":"jwt-svid","kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad trust bundle: keys[0]: jwt-svid key has no \"kid\""
        );
        assert!(SpiffeBundle::from_json(td.clone(), "[]").is_err());
        // Unknown uses are skipped.
        let b = SpiffeBundle::from_json(td, r#"{"keys":[{"use":"future-svid"}]}"#).unwrap();
        assert!(b.x509_authorities.is_empty() && b.jwt_authorities.is_empty());
    }
}
