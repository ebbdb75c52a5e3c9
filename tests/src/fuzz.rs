//! Fuzz targets: each takes arbitrary bytes and drives one parser or checker an outsider can
//! reach, asserting only that it answers (an error is fine) without panicking, hanging, or
//! accepting what it must not. The cargo-fuzz harness in `tests/fuzz/` runs them under
//! libFuzzer; `tests/tests/fuzz_corpus.rs` replays the committed corpora in the normal suite.
//!
//! Targets: [`spiffe_id`], [`csr`], [`jwt`], [`oidc`], [`config`], [`requests`],
//! [`records`], [`audit_chain`].

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use sigil_broker::config::{OidcIssuer, OidcPreset};

/// A fuzz target: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target, by name.
pub const TARGETS: &[(&str, Target)] = &[
    ("spiffe_id", spiffe_id),
    ("csr", csr),
    ("jwt", jwt),
    ("oidc", oidc),
    ("config", config),
    ("requests", requests),
    ("records", records),
    ("audit_chain", audit_chain),
];

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// SPIFFE IDs and trust domains, and the registry's check of a SPIFFE ID for a trust domain.
pub fn spiffe_id(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok(id) = s.parse::<sigil_pki::SpiffeId>() {
        // A parsed ID prints back as itself and reparses to the same.
        let again: sigil_pki::SpiffeId = id.to_string().parse().expect("round trip");
        assert_eq!(again, id);
    }
    let _ = s.parse::<sigil_pki::TrustDomain>();
    let td: sigil_pki::TrustDomain = "example.org".parse().expect("td");
    let _ = sigil_broker::registry::check_spiffe_id(s, &td);
    let _ = s.parse::<sigil_broker::model::Selector>();
    let _ =
        sigil_broker::registry::check_selectors(&s.lines().map(str::to_owned).collect::<Vec<_>>());
}

/// A PKCS#10 request as `Attest` and `MintX509Svid` receive it.
pub fn csr(data: &[u8]) {
    let _ = sigil_pki::VerifiedCsr::from_der(data);
}

fn jwt_keys() -> &'static (sigil_pki::JwtSigner, sigil_pki::JwtKeys) {
    static KEYS: OnceLock<(sigil_pki::JwtSigner, sigil_pki::JwtKeys)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let signer = sigil_pki::JwtSigner::new(sigil_pki::EcKey::generate().expect("key"));
        let mut keys = sigil_pki::JwtKeys::default();
        keys.insert(signer.kid(), signer.key().public_point().to_vec());
        (signer, keys)
    })
}

/// JWT-SVID verification (`ValidateJWTSVID`, introspection, exchange, the SDK's verifier),
/// also with a valid signature over fuzzed header and payload bytes.
pub fn jwt(data: &[u8]) {
    let (signer, keys) = jwt_keys();
    let opts = sigil_pki::VerifyOptions {
        now: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        skew: Duration::from_secs(30),
        audience: Some("db"),
        trust_domain: None,
    };
    if let Some(t) = text(data) {
        let _ = sigil_pki::jwt::peek_unverified(t);
        let _ = sigil_pki::jwt::verify(t, keys, &opts);
    }
    // Signed by the trusted key: only the checks after the signature stand between these
    // bytes and acceptance, so they must hold.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (h, p) = data.split_at(split);
    // `KID` in the header stands for the trusted key's id (which differs per run).
    let h = String::from_utf8_lossy(h).replace("KID", signer.kid());
    let mut t = format!(
        "{}.{}",
        b64.encode(h),
        b64.encode(p.get(1..).unwrap_or(&[]))
    );
    let sig = signer.key().sign_es256(t.as_bytes()).expect("sign");
    t.push('.');
    t.push_str(&b64.encode(sig));
    if let Ok(v) = sigil_pki::jwt::verify(&t, keys, &opts) {
        assert!(
            v.claims.aud.iter().any(|a| a == "db"),
            "accepted another audience"
        );
        assert!(
            v.claims.exp + 30 > 1_800_000_000,
            "accepted an expired token"
        );
    }
}

fn oidc_verifier() -> &'static (
    tokio::runtime::Runtime,
    sigil_broker::attest::oidc::OidcVerifier,
) {
    static V: OnceLock<(
        tokio::runtime::Runtime,
        sigil_broker::attest::oidc::OidcVerifier,
    )> = OnceLock::new();
    V.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sigil-fuzz-oidc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let jwks = dir.join("jwks.json");
        // One EC key the fuzzer does not have: signatures never verify, so everything before
        // the signature check is what is exercised.
        let k = sigil_pki::EcKey::generate().expect("key");
        let (x, y) = {
            let p = k.public_point();
            use base64::Engine as _;
            let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            (b.encode(&p[1..33]), b.encode(&p[33..65]))
        };
        std::fs::write(
            &jwks,
            format!(
                r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","x":"{x}","y":"{y}"}}]}}"#
            ),
        )
        .expect("jwks");
        let issuer = OidcIssuer {
            name: "idp".into(),
            preset: OidcPreset::Kubernetes,
            issuer: "https://idp.example".into(),
            audiences: vec!["sigil".into()],
            jwks_file: Some(jwks),
            jwks_url: None,
            ca_file: None,
            algorithms: vec!["ES256".into(), "RS256".into()],
            clock_skew: Duration::from_secs(60),
            jwks_cache: Duration::from_secs(3600),
            jwks_min_refresh: Duration::from_secs(3600),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let v = sigil_broker::attest::oidc::OidcVerifier::new(&[issuer]).expect("verifier");
        (rt, v)
    })
}

/// An OIDC attestation token (Kubernetes, GitHub, GitLab, any issuer).
pub fn oidc(data: &[u8]) {
    let Some(t) = text(data) else { return };
    let (rt, v) = oidc_verifier();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let r = rt.block_on(v.verify(t, now));
    assert!(r.is_err(), "a token nobody could sign was accepted");
}

/// `sigil.toml`.
pub fn config(data: &[u8]) {
    let Some(t) = text(data) else { return };
    if let Ok(c) = sigil_broker::config::Config::parse(t, "fuzz.toml") {
        let _ = c.validate();
        // What it writes back parses again.
        let _ = sigil_broker::config::Config::parse(&c.to_toml(), "again").expect("round trip");
    }
}

/// The request messages of the Broker, Admin and SPIFFE Workload APIs, decoded as the gRPC
/// layer decodes them (the first byte picks the message), then the checks handlers run on
/// their lists and names.
pub fn requests(data: &[u8]) {
    use sigil_proto::v1 as pb;
    use sigil_proto::workload as w;
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    match kind % 12 {
        0 => {
            if let Ok(r) = pb::AttestRequest::decode(body) {
                let _ = sigil_pki::VerifiedCsr::from_der(&r.csr);
            }
        }
        1 => {
            let _ = pb::MintX509SvidRequest::decode(body);
        }
        2 => {
            let _ = pb::MintJwtSvidRequest::decode(body);
        }
        3 => {
            let _ = pb::ExchangeJwtSvidRequest::decode(body);
        }
        4 => {
            let _ = pb::IntrospectRequest::decode(body);
        }
        5 => {
            let _ = pb::WatchRequest::decode(body);
        }
        6 => {
            if let Ok(r) = pb::CreateIdentityRequest::decode(body) {
                let _ = sigil_broker::registry::check_selectors(&r.selectors);
                let _ = sigil_broker::registry::check_owner(&r.owner);
                let _ = sigil_broker::registry::check_purpose(&r.purpose);
                let _ = sigil_broker::registry::check_labels(&r.labels.into_iter().collect());
            }
        }
        7 => {
            let _ = pb::UpdateIdentityRequest::decode(body);
        }
        8 => {
            let _ = pb::ReportLeakRequest::decode(body);
        }
        9 => {
            let _ = w::JwtsvidRequest::decode(body);
        }
        10 => {
            let _ = w::ValidateJwtsvidRequest::decode(body);
        }
        _ => {
            let _ = pb::ListAuditRequest::decode(body);
        }
    }
}

/// The stored records, as a backend reads them back (the first byte picks the record).
pub fn records(data: &[u8]) {
    use sigil_broker::model as m;
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    match kind % 9 {
        0 => {
            let _ = serde_json::from_slice::<m::IdentityRecord>(body);
        }
        1 => {
            let _ = serde_json::from_slice::<m::JoinTokenRecord>(body);
        }
        2 => {
            let _ = serde_json::from_slice::<m::KeyRecord>(body);
        }
        3 => {
            if let Ok(r) = serde_json::from_slice::<m::LedgerRecord>(body) {
                let _ = m::credential_key(r.kind, &r.credential_id);
            }
        }
        4 => {
            let _ = serde_json::from_slice::<m::RevocationRecord>(body);
        }
        5 => {
            if let Ok(mut u) = serde_json::from_slice::<m::UsageRecord>(body) {
                // Learning from a record must stay bounded whatever the stored usage says.
                let r = m::LedgerRecord {
                    credential_id: "x".into(),
                    kind: m::CredentialKind::Jwt,
                    identity_id: "id".into(),
                    spiffe_id: "spiffe://example.org/a".into(),
                    generation: 1,
                    audiences: vec!["db".into()],
                    scopes: vec![],
                    dns_names: vec![],
                    issued_at: 1_800_000_000,
                    expires_at: 1_800_000_300,
                    signing_key_id: "k".into(),
                    attestation: "x509".into(),
                    source: "10.0.0.1".into(),
                };
                u.apply(&r);
            }
        }
        6 => {
            let _ = serde_json::from_slice::<m::ApprovalRecord>(body);
        }
        7 => {
            let _ = serde_json::from_slice::<sigil_broker::audit::AuditEntry>(body);
        }
        _ => {
            let _ = serde_json::from_slice::<sigil_broker::audit::Checkpoint>(body);
        }
    }
}

/// The audit verifier over arbitrary stored entries (one per line): it must name a break,
/// never accept a chain it did not MAC.
pub fn audit_chain(data: &[u8]) {
    static SEALER: OnceLock<Arc<sigil_broker::seal::Sealer>> = OnceLock::new();
    let sealer = SEALER.get_or_init(|| {
        Arc::new(sigil_broker::seal::Sealer::new(
            &sigil_broker::seal::MasterKey::generate(),
        ))
    });
    let entries: Vec<(u64, Vec<u8>)> = data
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.to_vec()))
        .collect();
    let n = entries.len();
    if let sigil_broker::audit::ChainReport::Intact { entries } =
        sigil_broker::audit::verify_chain(sealer, entries)
    {
        assert!(
            n == 0 || entries == 0,
            "a forged chain of {entries} verified"
        );
    }
}
