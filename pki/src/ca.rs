//! Sigil's certificate authorities (a P-256 root and intermediate signing CAs) and the leaves
//! they sign: X.509-SVIDs from CSRs, the broker's own server certificate and operator
//! credentials.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{EcKey, PkiError, SpiffeId, TrustDomain, ids};

/// The most a certificate is back-dated to absorb clock skew between machines.
pub const MAX_BACKDATE: Duration = Duration::from_secs(30);

/// What a CA is for; decides its name and path length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaRole {
    /// The trust anchor workloads are given.
    Root,
    /// Signs workload certificates; rotated.
    Intermediate,
    /// A separate anchor for operator (admin API) credentials.
    Operator,
}

/// A CA certificate with its private key.
pub struct CertificateAuthority {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, EcKey>,
    not_before: SystemTime,
    not_after: SystemTime,
    subject: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What a leaf certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeafUsage {
    /// X.509-SVIDs: TLS server and client authentication.
    ServerAndClient,
    /// Operator credentials: TLS client authentication only.
    ClientOnly,
}

/// What goes into a leaf certificate. Nothing else does.
#[derive(Debug, Clone)]
pub struct LeafSpec<'a> {
    /// The single URI SAN.
    pub spiffe_id: &'a SpiffeId,
    /// DNS SANs, already checked against what the identity allows.
    pub dns_names: &'a [String],
    /// IP SANs (the broker's own certificate only).
    pub ip_addresses: &'a [IpAddr],
    /// Key usage profile.
    pub usage: LeafUsage,
    /// The issue time.
    pub now: SystemTime,
    /// Wanted lifetime; cut to the issuer's own expiry.
    pub ttl: Duration,
    /// Back-dating of notBefore, at most [`MAX_BACKDATE`].
    pub backdate: Duration,
    /// Serial number (see [`ids::new_serial`]).
    pub serial: &'a [u8],
}

/// A freshly signed leaf.
#[derive(Debug, Clone)]
pub struct MintedLeaf {
    /// The certificate.
    pub der: CertificateDer<'static>,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
    /// True when notAfter was cut to the issuing CA's expiry.
    pub cut_to_issuer: bool,
}

fn to_odt(t: SystemTime) -> OffsetDateTime {
    // Whole seconds: X.509 times have second precision.
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn from_odt(t: OffsetDateTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64)
}

fn uri_san(id: &SpiffeId) -> Result<SanType, PkiError> {
    Ok(SanType::URI(id.as_str().try_into().map_err(|_| {
        PkiError::Internal("SPIFFE ID is not an IA5 string")
    })?))
}

impl CertificateAuthority {
    /// A new self-signed CA (the root, or the operator CA).
    pub fn new_self_signed(
        role: CaRole,
        td: &TrustDomain,
        key: EcKey,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, PkiError> {
        let mut p = CertificateParams::default();
        let name = match role {
            CaRole::Operator => format!("Sigil operator CA for {td}"),
            _ => format!("Sigil root CA for {td}"),
        };
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, "Sigil");
        p.distinguished_name.push(DnType::CommonName, name);
        p.subject_alt_names = vec![uri_san(&td.id())?];
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = to_odt(now - MAX_BACKDATE);
        p.not_after = to_odt(now + validity);
        p.serial_number = Some(SerialNumber::from_slice(&ids::new_serial(now)));
        let cert = p.self_signed(&key)?;
        Self::from_parts(cert.der().clone(), key)
    }

    /// A new intermediate signing CA, signed by `self` (the root). Its lifetime is cut to the
    /// root's.
    pub fn new_intermediate(
        &self,
        td: &TrustDomain,
        key: EcKey,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, PkiError> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, "Sigil");
        let serial = ids::new_serial(now);
        p.distinguished_name.push(
            DnType::CommonName,
            format!("Sigil signing CA for {td} {}", &ids::to_hex(&serial)[..12]),
        );
        p.subject_alt_names = vec![uri_san(&td.id())?];
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = to_odt((now - MAX_BACKDATE).max(self.not_before));
        p.not_after = to_odt((now + validity).min(self.not_after));
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = p.signed_by(&key, &self.issuer)?;
        Self::from_parts(cert.der().clone(), key)
    }

    /// Re-creates a CA from its stored certificate and key. Refuses a key that does not match
    /// the certificate.
    pub fn from_parts(cert: CertificateDer<'static>, key: EcKey) -> Result<Self, PkiError> {
        let (_, parsed) = X509Certificate::from_der(&cert)
            .map_err(|_| PkiError::BadCertificate("not DER X.509"))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_point() {
            return Err(PkiError::BadKey(
                "the private key does not match the CA certificate",
            ));
        }
        if !parsed.is_ca() {
            return Err(PkiError::BadCertificate("not a CA certificate"));
        }
        let not_before = from_odt(parsed.validity().not_before.to_datetime());
        let not_after = from_odt(parsed.validity().not_after.to_datetime());
        let subject = parsed.subject().to_string();
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(CertificateAuthority {
            cert,
            issuer,
            not_before,
            not_after,
            subject,
        })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA's key.
    pub fn key(&self) -> &EcKey {
        self.issuer.key()
    }

    /// notBefore of the CA certificate.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// notAfter of the CA certificate; nothing it signs outlives this.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The subject DN, as text.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Signs a leaf for `public_key` with exactly what `spec` says: one URI SAN, the given DNS
    /// and IP SANs, `cA=false`, critical keyUsage digitalSignature, the EKUs of `spec.usage`,
    /// the given serial, notBefore back-dated by at most 30 s, notAfter no later than the CA's.
    pub fn mint_leaf(
        &self,
        public_key: &impl PublicKeyData,
        spec: &LeafSpec<'_>,
    ) -> Result<MintedLeaf, PkiError> {
        if spec.now >= self.not_after {
            return Err(PkiError::CaExpired);
        }
        let backdate = spec.backdate.min(MAX_BACKDATE);
        let not_before = (spec.now - backdate).max(self.not_before);
        let wanted = spec.now + spec.ttl;
        let cut_to_issuer = wanted > self.not_after;
        let not_after = wanted.min(self.not_after);

        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, "Sigil");
        let mut sans = Vec::with_capacity(1 + spec.dns_names.len() + spec.ip_addresses.len());
        sans.push(uri_san(spec.spiffe_id)?);
        for d in spec.dns_names {
            let name = d
                .as_str()
                .try_into()
                .map_err(|_| PkiError::BadDnsName(d.clone()))?;
            rustls_pki_types::DnsName::try_from(d.as_str())
                .map_err(|_| PkiError::BadDnsName(d.clone()))?;
            sans.push(SanType::DnsName(name));
        }
        sans.extend(spec.ip_addresses.iter().map(|ip| SanType::IpAddress(*ip)));
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = match spec.usage {
            LeafUsage::ServerAndClient => {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            }
            LeafUsage::ClientOnly => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        p.use_authority_key_identifier_extension = true;
        p.not_before = to_odt(not_before);
        p.not_after = to_odt(not_after);
        p.serial_number = Some(SerialNumber::from_slice(spec.serial));
        let cert = p.signed_by(public_key, &self.issuer)?;
        Ok(MintedLeaf {
            der: cert.der().clone(),
            not_before: from_odt(p.not_before),
            not_after: from_odt(p.not_after),
            cut_to_issuer,
        })
    }
}

/// One entry of a CRL.
#[derive(Debug, Clone)]
pub struct RevokedSerial {
    /// Serial number bytes.
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub revoked_at: SystemTime,
}

impl CertificateAuthority {
    /// A DER CRL signed by this CA listing `revoked`, valid from `now` until `next_update`,
    /// numbered `number` (must grow with every CRL this CA issues).
    pub fn crl(
        &self,
        revoked: &[RevokedSerial],
        now: SystemTime,
        next_update: SystemTime,
        number: u64,
    ) -> Result<Vec<u8>, PkiError> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: to_odt(now),
            next_update: to_odt(next_update),
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: to_odt(r.revoked_at),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.der().to_vec())
    }
}

/// PEM text for a sequence of DER certificates.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())))
        .collect()
}

/// Every `CERTIFICATE` block in PEM text.
pub fn certs_from_pem(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PkiError::BadCertificate("malformed PEM"))?;
    if certs.is_empty() {
        return Err(PkiError::BadCertificate("no CERTIFICATE block in PEM"));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VerifiedCsr;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    pub(crate) fn hierarchy(now: SystemTime) -> (CertificateAuthority, CertificateAuthority) {
        let td: TrustDomain = "example.org".parse().unwrap();
        let root = CertificateAuthority::new_self_signed(
            CaRole::Root,
            &td,
            EcKey::generate().unwrap(),
            now,
            Duration::from_secs(86400 * 365),
        )
        .unwrap();
        let int = root
            .new_intermediate(
                &td,
                EcKey::generate().unwrap(),
                now,
                Duration::from_secs(86400 * 30),
            )
            .unwrap();
        (root, int)
    }

    fn csr_with_everything() -> Vec<u8> {
        // A greedy CSR: CA, extra URI SANs, a DNS name, code signing.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(vec!["evil.example".into()]).unwrap();
        p.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/admin".try_into().unwrap(),
        ));
        p.subject_alt_names
            .push(SanType::URI("https://evil.example".try_into().unwrap()));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_greedy_csr_gets_only_what_the_spec_says() {
        let now = SystemTime::now();
        let (_root, int) = hierarchy(now);
        let csr = VerifiedCsr::from_der(&csr_with_everything()).unwrap();
        let id: SpiffeId = "spiffe://example.org/app".parse().unwrap();
        let serial = ids::new_serial(now);
        let leaf = int
            .mint_leaf(
                &csr,
                &LeafSpec {
                    spiffe_id: &id,
                    dns_names: &["app.internal".into()],
                    ip_addresses: &[],
                    usage: LeafUsage::ServerAndClient,
                    now,
                    ttl: Duration::from_secs(3600),
                    backdate: Duration::from_secs(600),
                    serial: &serial,
                },
            )
            .unwrap();
        let (_, c) = X509Certificate::from_der(&leaf.der).unwrap();
        assert!(!c.is_ca());
        let bc = c.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let ku = c.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.code_signing);
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        let uris: Vec<_> = san
            .general_names
            .iter()
            .filter_map(|g| {
                if let GeneralName::URI(u) = g {
                    Some(*u)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(uris, vec!["spiffe://example.org/app"]);
        let dns: Vec<_> = san
            .general_names
            .iter()
            .filter_map(|g| {
                if let GeneralName::DNSName(d) = g {
                    Some(*d)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(dns, vec!["app.internal"]);
        assert_eq!(c.raw_serial(), &serial);
        // Back-dating is capped at 30 s even when more was asked.
        let nb = c.validity().not_before.timestamp();
        let now_s = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(now_s - nb <= 31, "backdated {}s", now_s - nb);
        assert!(!c.extensions().iter().any(|e| matches!(
            e.parsed_extension(),
            ParsedExtension::UnsupportedExtension { .. }
        )));
        assert_eq!(c.public_key().raw, csr.spki_der());
    }

    #[test]
    fn leaf_never_outlives_its_issuer() {
        let now = SystemTime::now();
        let (_root, int) = hierarchy(now);
        let key = EcKey::generate().unwrap();
        let id: SpiffeId = "spiffe://example.org/app".parse().unwrap();
        let leaf = int
            .mint_leaf(
                &key,
                &LeafSpec {
                    spiffe_id: &id,
                    dns_names: &[],
                    ip_addresses: &[],
                    usage: LeafUsage::ServerAndClient,
                    now,
                    ttl: Duration::from_secs(86400 * 365),
                    backdate: MAX_BACKDATE,
                    serial: &ids::new_serial(now),
                },
            )
            .unwrap();
        assert!(leaf.cut_to_issuer);
        assert!(leaf.not_after <= int.not_after());
        let late = int.not_after() + Duration::from_secs(1);
        let err = int
            .mint_leaf(
                &key,
                &LeafSpec {
                    spiffe_id: &id,
                    dns_names: &[],
                    ip_addresses: &[],
                    usage: LeafUsage::ServerAndClient,
                    now: late,
                    ttl: Duration::from_secs(60),
                    backdate: MAX_BACKDATE,
                    serial: &ids::new_serial(late),
                },
            )
            .unwrap_err();
        assert!(matches!(err, PkiError::CaExpired));
    }

    #[test]
    fn chain_verifies_with_webpki() {
        let now = SystemTime::now();
        let (root, int) = hierarchy(now);
        let key = EcKey::generate().unwrap();
        let id: SpiffeId = "spiffe://example.org/app".parse().unwrap();
        let leaf = int
            .mint_leaf(
                &key,
                &LeafSpec {
                    spiffe_id: &id,
                    dns_names: &["app.internal".into()],
                    ip_addresses: &[],
                    usage: LeafUsage::ServerAndClient,
                    now,
                    ttl: Duration::from_secs(600),
                    backdate: MAX_BACKDATE,
                    serial: &ids::new_serial(now),
                },
            )
            .unwrap();
        let anchor = webpki::anchor_from_trusted_cert(root.cert()).unwrap();
        let ee = webpki::EndEntityCert::try_from(&leaf.der).unwrap();
        let t = rustls_pki_types::UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
        );
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[int.cert().clone()],
            t,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
    }

    #[test]
    fn from_parts_refuses_a_mismatched_key() {
        let now = SystemTime::now();
        let (root, _) = hierarchy(now);
        let err = CertificateAuthority::from_parts(root.cert().clone(), EcKey::generate().unwrap())
            .unwrap_err();
        assert!(matches!(err, PkiError::BadKey(_)));
    }

    #[test]
    fn bad_dns_name_is_refused_by_name() {
        let now = SystemTime::now();
        let (_root, int) = hierarchy(now);
        let key = EcKey::generate().unwrap();
        let id: SpiffeId = "spiffe://example.org/app".parse().unwrap();
        let err = int
            .mint_leaf(
                &key,
                &LeafSpec {
                    spiffe_id: &id,
                    dns_names: &["not a name".into()],
                    ip_addresses: &[],
                    usage: LeafUsage::ServerAndClient,
                    now,
                    ttl: Duration::from_secs(600),
                    backdate: MAX_BACKDATE,
                    serial: &ids::new_serial(now),
                },
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "dns name \"not a name\" is not a valid DNS name"
        );
    }
}
