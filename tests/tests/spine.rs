//! The spine end to end: a real broker on loopback (TLS, a real store in a temp dir), the real SDK,
//! the real CLI code, and openssl as an outside check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser as _;
use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_broker::clock::ManualClock;
use sigil_pki::{EcKey, SpiffeBundle, VerifyOptions, certs_from_pem};
use sigil_proto::v1 as pb;
use sigil_sdk::{ErrorKind, Evidence, JwtRequest, SvidOptions};
use sigil_tests::{TD, TestBroker, changed_files, openssl, raw, snapshot};
use tonic::Code;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const APP: &str = "spiffe://example.org/payments/api";

fn leaf_of<'a>(chain: &'a [CertificateDer<'_>]) -> X509Certificate<'a> {
    X509Certificate::from_der(&chain[0]).expect("leaf parses").1
}

fn sans(c: &X509Certificate<'_>) -> (Vec<String>, Vec<String>) {
    let san = c
        .subject_alternative_name()
        .expect("san")
        .expect("has san")
        .value;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    for g in &san.general_names {
        match g {
            GeneralName::URI(u) => uris.push(u.to_string()),
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    (uris, dns)
}

fn webpki_verify(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) {
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).expect("anchor"))
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).expect("ee");
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .expect("chain verifies with webpki");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_writes_credentials_that_verify_with_webpki_openssl_and_the_bundle() {
    let b = TestBroker::start().await;
    b.identity("payments/api", |_| {}).await;
    let token = b.join_token(APP).await;
    let out = b.dir.path().join("creds");
    let bundle_path = b.data.join("bundle.pem");
    // The real `sigil fetch` code path.
    let cli = sigil_cli::Cli::parse_from([
        "sigil",
        "fetch",
        "--broker",
        &b.url,
        "--trust-bundle",
        bundle_path.to_str().unwrap(),
        "--join-token",
        &token,
        "--out",
        out.to_str().unwrap(),
        "--audience",
        "db",
        "--dns",
        "app.internal",
    ]);
    sigil_cli::run(cli).await.expect("sigil fetch");

    let chain = certs_from_pem(&std::fs::read(out.join("svid.pem")).unwrap()).unwrap();
    assert_eq!(chain.len(), 2, "leaf then intermediate");
    let roots = certs_from_pem(&std::fs::read(out.join("bundle.pem")).unwrap()).unwrap();
    webpki_verify(&chain, &roots);

    // openssl agrees, strictly, for client and server use.
    std::fs::write(out.join("leaf.pem"), sigil_pki::certs_to_pem([&chain[0]])).unwrap();
    std::fs::write(out.join("int.pem"), sigil_pki::certs_to_pem([&chain[1]])).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let (ok, text) = openssl::run(
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                "bundle.pem",
                "-untrusted",
                "int.pem",
                "leaf.pem",
            ],
            &out,
        );
        assert!(
            ok && text.contains("leaf.pem: OK"),
            "openssl verify ({purpose}): {text}"
        );
    }

    // The key on disk is the certificate's key, and only its owner can read it.
    let key_pem = std::fs::read_to_string(out.join("svid.key")).unwrap();
    let key = EcKey::from_pkcs8_pem(&key_pem).expect("svid.key is a PKCS#8 P-256 key");
    let leaf = leaf_of(&chain);
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_point()
    );
    assert_eq!(
        std::fs::metadata(out.join("svid.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(out.join("jwt-db.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let (ok, text) = openssl::run(&["pkey", "-in", "svid.key", "-pubout"], &out);
    let (ok2, text2) = openssl::run(&["x509", "-in", "leaf.pem", "-noout", "-pubkey"], &out);
    assert!(
        ok && ok2 && text == text2,
        "openssl sees the same public key in svid.key and svid.pem"
    );

    let (uris, dns) = sans(&leaf);
    assert_eq!(uris, vec![APP.to_owned()]);
    assert_eq!(dns, vec!["app.internal".to_owned()]);

    // The JWT verifies against the bundle the broker serves.
    let token = std::fs::read_to_string(out.join("jwt-db.txt")).unwrap();
    let served = b.workload().fetch_bundle().await.unwrap();
    let bundle = SpiffeBundle::from_json(TD.parse().unwrap(), &served.json).unwrap();
    let td = TD.parse().unwrap();
    let v = sigil_pki::jwt::verify(
        token.trim(),
        &bundle.jwt_keys(),
        &VerifyOptions {
            now: SystemTime::now(),
            skew: Duration::from_secs(30),
            audience: Some("db"),
            trust_domain: Some(&td),
        },
    )
    .expect("JWT-SVID verifies with the bundle's keys");
    assert_eq!(v.claims.sub.as_str(), APP);
    assert_eq!(v.claims.generation, 1);
    assert!(
        v.claims.exp - v.claims.iat <= 300,
        "default JWT lifetime is short"
    );

    // Every step is in the audit log, with no secret in it.
    let audit = b.audit().await;
    let actions: Vec<&str> = audit
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "identity.create",
        "join_token.create",
        "attest",
        "x509.mint",
        "jwt.mint",
    ] {
        assert!(actions.contains(&a), "audit has {a}: {actions:?}");
    }
    let text = serde_json::to_string(&audit).unwrap();
    assert!(!text.contains(token.trim()) && !text.contains(&b.join_token(APP).await[..20]));
    let mint = audit.iter().find(|e| e["action"] == "x509.mint").unwrap();
    assert_eq!(
        mint["detail"]["serial"].as_str().unwrap(),
        sigil_pki::ids::to_hex(leaf.raw_serial())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_exactly_once_even_under_a_race() {
    // Every refusal its own audit entry (not folded per interval), to count them.
    let b = TestBroker::start_configured(Arc::new(sigil_broker::clock::SystemClock), |c| {
        c.audit.aggregate_interval = Duration::ZERO
    })
    .await;
    b.identity("payments/api", |_| {}).await;
    let token = b.join_token(APP).await;
    let w = b.workload();
    w.attest(
        Evidence::JoinToken(token.clone().into()),
        SvidOptions::default(),
        &[],
    )
    .await
    .expect("first use");
    let e = w
        .attest(
            Evidence::JoinToken(token.clone().into()),
            SvidOptions::default(),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated));
    assert_eq!(e.kind(), ErrorKind::Reattest);
    assert!(
        e.message().contains("attestation failed: join_token"),
        "{e}"
    );

    // 50 workloads race with one token: exactly one gets a certificate.
    // Connections are set up first and the attempts released together, so they really
    // overlap inside the broker rather than queueing behind TLS handshakes.
    let token = b.join_token(APP).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let w = b.workload();
        w.fetch_bundle().await.unwrap();
        let (t, barrier) = (token.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            w.attest(Evidence::JoinToken(t.into()), SvidOptions::default(), &[])
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one of 50 concurrent uses succeeds");
    let fp = serde_json::to_string(
        &b.audit_for("join_token.create").await.last().unwrap()["detail"]["token"],
    )
    .unwrap();
    let uses: Vec<_> = b
        .audit_for("attest")
        .await
        .into_iter()
        .filter(|e| serde_json::to_string(&e["actor"]).unwrap() == fp)
        .collect();
    assert_eq!(uses.iter().filter(|e| e["decision"] == "allow").count(), 1);
    assert_eq!(
        uses.iter().filter(|e| e["decision"] == "deny").count(),
        49,
        "every refused use is audited"
    );
    assert_eq!(
        b.audit_for("x509.mint").await.len(),
        2,
        "two tokens, two certificates"
    );
}

fn greedy_csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["app.internal".to_string()]).unwrap();
    p.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://example.org/admin".try_into().unwrap(),
    ));
    p.subject_alt_names.push(rcgen::SanType::URI(
        "https://evil.example".try_into().unwrap(),
    ));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
    p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![0x05, 0x00],
    )];
    p.serialize_request(&key).unwrap().der().to_vec()
}

fn assert_plain_svid(chain: &[Vec<u8>]) {
    let (_, c) = X509Certificate::from_der(&chain[0]).unwrap();
    assert!(!c.is_ca(), "cA must be false");
    assert!(!c.basic_constraints().unwrap().unwrap().value.ca);
    let ku = c.key_usage().unwrap().unwrap();
    assert!(
        ku.critical
            && ku.value.digital_signature()
            && !ku.value.key_cert_sign()
            && !ku.value.crl_sign()
    );
    let eku = c.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.code_signing && eku.other.is_empty());
    let (uris, dns) = sans(&c);
    assert_eq!(
        uris,
        vec![APP.to_owned()],
        "exactly one URI SAN, the identity's"
    );
    assert!(
        dns.is_empty(),
        "no DNS name that was not asked for in the request fields"
    );
    assert!(
        c.extensions()
            .iter()
            .all(|e| e.oid.to_id_string() != "1.3.6.1.4.1.99999.1"),
        "requested extensions are ignored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_csr_gets_a_plain_svid_and_unlisted_dns_names_are_refused() {
    let b = TestBroker::start().await;
    b.identity("payments/api", |_| {}).await;

    // At attestation...
    let token = b.join_token(APP).await;
    let r = raw::anon(&b.url, &b.bundle_pem)
        .attest(pb::AttestRequest {
            evidence: Some(pb::Evidence {
                kind: Some(pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                    token,
                })),
            }),
            csr: greedy_csr(),
            ..Default::default()
        })
        .await
        .expect("attest with a greedy CSR")
        .into_inner();
    assert_plain_svid(&r.svid.unwrap().cert_chain);

    // ...and at renewal over mTLS.
    let (w, _) = b.attested(APP, &[]).await;
    let svid = w.x509_svid().unwrap();
    let mut c = raw::mtls(&b.url, &b.bundle_pem, &svid);
    let r = c
        .mint_x509_svid(pb::MintX509SvidRequest {
            csr: greedy_csr(),
            ..Default::default()
        })
        .await
        .expect("renew")
        .into_inner();
    assert_plain_svid(&r.svid.unwrap().cert_chain);

    // A DNS name the identity does not have: a gate-2 denial that names it.
    let e = c
        .mint_x509_svid(pb::MintX509SvidRequest {
            csr: greedy_csr(),
            dns_names: vec!["evil.example".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .starts_with("denied by gate 2 (entitlement scope): DNS name \"evil.example\""),
        "{}",
        e.message()
    );
    assert_eq!(
        e.metadata().get("sigil-gate").unwrap(),
        "gate2.entitlement_scope"
    );
    let deny = b
        .audit_for("x509.mint")
        .await
        .into_iter()
        .find(|e| e["decision"] == "deny")
        .expect("denial audited");
    assert_eq!(deny["gate"], "gate2.entitlement_scope");
    assert!(deny["reason"].as_str().unwrap().contains("evil.example"));

    // A malformed CSR: a clear error naming the field, and the join token is not spent.
    let token = b.join_token(APP).await;
    let mut anon = raw::anon(&b.url, &b.bundle_pem);
    let attest = |csr: Vec<u8>, token: String| pb::AttestRequest {
        evidence: Some(pb::Evidence {
            kind: Some(pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                token,
            })),
        }),
        csr,
        ..Default::default()
    };
    let e = anon
        .attest(attest(b"not a csr".to_vec(), token.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "invalid csr: csr is not a DER-encoded PKCS#10 certification request"
    );
    let mut tampered = greedy_csr();
    let n = tampered.len();
    tampered[n - 2] ^= 1;
    let e = anon
        .attest(attest(tampered, token.clone()))
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        "invalid csr: csr signature does not verify with its public key"
    );
    anon.attest(attest(greedy_csr(), token))
        .await
        .expect("the token still works after bad requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_two_refuses_unlisted_audiences_and_clamps_ttls_out_loud() {
    let b = TestBroker::start().await;
    b.identity("payments/api", |_| {}).await;
    let (w, creds) = b.attested(APP, &["db"]).await;
    assert_eq!(creds.jwts.len(), 1);

    let e = w
        .fetch_jwt_svid(&JwtRequest::audience("prod-db"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    assert_eq!(e.gate(), Some("gate2.entitlement_scope"));
    assert!(
        e.message()
            .contains("audience \"prod-db\" is not in the identity's entitlements (allowed: db)"),
        "{e}"
    );
    let e = w
        .fetch_jwt_svid(&JwtRequest {
            audiences: vec!["db".into()],
            scopes: vec!["write".into()],
            ttl: None,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("scope \"write\""), "{e}");

    let j = w
        .fetch_jwt_svid(&JwtRequest {
            audiences: vec!["db".into()],
            scopes: vec!["read".into()],
            ttl: Some(Duration::from_secs(7200)),
        })
        .await
        .unwrap();
    assert!(j.grant.ttl_clamped);
    assert_eq!(j.grant.ttl_seconds, 3600);
    assert_eq!(
        j.grant.notice,
        "requested ttl 7200s is above the identity's max 3600s; granted 3600s"
    );
    assert!(
        j.expires_at
            - SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
            <= 3600
    );
    assert_eq!(j.scopes, vec!["read".to_owned()]);

    // The certificate too.
    let token = b.join_token(APP).await;
    let c = b
        .workload()
        .attest(
            Evidence::JoinToken(token.into()),
            SvidOptions {
                ttl: Some(Duration::from_secs(86400)),
                dns_names: vec![],
                ..Default::default()
            },
            &[],
        )
        .await
        .unwrap();
    assert!(c.svid.grant.ttl_clamped);
    let leaf = leaf_of(&c.svid.cert_chain);
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        (3600..=3631).contains(&life),
        "lifetime {life}s = 1h + at most 30s back-dating"
    );

    let audit = b.audit_for("jwt.mint").await;
    let deny = audit
        .iter()
        .find(|e| e["decision"] == "deny")
        .expect("gate-2 denial audited");
    assert_eq!(deny["gate"], "gate2.entitlement_scope");
    assert!(
        audit.iter().any(|e| e["detail"]["ttl_clamped"] == true),
        "the clamp is audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_one_refuses_suspended_retired_and_expired_identities() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let b = TestBroker::start_with_clock(clock.clone()).await;
    b.identity("payments/api", |_| {}).await;
    let (w, _) = b.attested(APP, &[]).await;
    let mut admin = b.admin();
    let set = |status: pb::IdentityStatus, reason: &str| pb::SetIdentityStatusRequest {
        id_or_spiffe_id: APP.into(),
        status: status as i32,
        reason: reason.into(),
    };

    admin
        .set_identity_status(set(pb::IdentityStatus::Suspended, "investigating INC-7"))
        .await
        .unwrap();
    let e = w
        .fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    assert_eq!(e.gate(), Some("gate1.identity_proof"));
    assert!(
        e.message()
            .contains("is suspended (investigating INC-7); an operator must resume it"),
        "{e}"
    );
    let e = w.renew_x509_svid().await.unwrap_err();
    assert_eq!(e.gate(), Some("gate1.identity_proof"));
    let token = b.join_token(APP).await;
    let e = b
        .workload()
        .attest(
            Evidence::JoinToken(token.into()),
            SvidOptions::default(),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.gate(),
        Some("gate1.identity_proof"),
        "a fresh attestation does not get around a suspension"
    );

    admin
        .set_identity_status(set(pb::IdentityStatus::Active, "cleared"))
        .await
        .unwrap();
    w.fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .expect("resumed identities mint again");

    // Retiring revokes what the identity holds: its certificate is of an old generation.
    let retired = admin
        .set_identity_status(set(pb::IdentityStatus::Retired, "decommissioned"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.generation, 2);
    let e = w.renew_x509_svid().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated));
    assert!(e.message().contains("has been revoked"), "{e}");
    let e = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            id_or_spiffe_id: APP.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // An identity past its expiry stops minting until recertified.
    let short = "spiffe://example.org/batch/nightly";
    b.identity("batch/nightly", |r| r.expires_in_seconds = 120)
        .await;
    let (w2, _) = b.attested(short, &[]).await;
    clock.advance(Duration::from_secs(180));
    let e = w2
        .fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .unwrap_err();
    assert_eq!(e.gate(), Some("gate1.identity_proof"));
    assert!(
        e.message().contains("expired at")
            && e.message()
                .contains("its owner (team-test) must recertify it"),
        "{e}"
    );
    admin
        .update_identity(pb::UpdateIdentityRequest {
            id_or_spiffe_id: short.into(),
            expires_in_seconds: Some(86400),
            ..Default::default()
        })
        .await
        .unwrap();
    w2.fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .expect("recertified identities mint again");

    let denials: Vec<_> = b
        .audit()
        .await
        .into_iter()
        .filter(|e| e["decision"] == "deny")
        .collect();
    let reasons: Vec<&str> = denials
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    // Retiring revoked the certificate outright, so that refusal is an identity-proof one.
    for word in ["suspended", "was revoked: decommissioned", "expired"] {
        assert!(
            denials.iter().any(|e| e["gate"] == "gate1.identity_proof"
                && e["reason"].as_str().unwrap().contains(word)),
            "{word} denial audited: {reasons:?}"
        );
    }
    assert!(
        !b.audit_for("identity.suspend").await.is_empty()
            && !b.audit_for("identity.retire").await.is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_operator_input_is_refused_by_field_and_changes_nothing() {
    let b = TestBroker::start().await;
    let mut admin = b.admin();
    let base = || pb::CreateIdentityRequest {
        spiffe_id: APP.into(),
        owner: "team".into(),
        purpose: "p".into(),
        entitlements: Some(pb::Entitlements {
            kinds: vec!["x509".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let cases: Vec<(pb::CreateIdentityRequest, &str)> = vec![
        (
            pb::CreateIdentityRequest {
                spiffe_id: "spiffe://example.org/a/../b".into(),
                ..base()
            },
            "invalid spiffe_id: path cannot contain dot segments",
        ),
        (
            pb::CreateIdentityRequest {
                spiffe_id: "spiffe://other.org/a".into(),
                ..base()
            },
            "not in this broker's trust domain",
        ),
        (
            pb::CreateIdentityRequest {
                spiffe_id: "spiffe://example.org/sigil/operator/x".into(),
                ..base()
            },
            "reserved",
        ),
        (
            pb::CreateIdentityRequest {
                owner: " ".into(),
                ..base()
            },
            "invalid owner: is required",
        ),
        (
            pb::CreateIdentityRequest {
                purpose: String::new(),
                ..base()
            },
            "invalid purpose: is required",
        ),
        (
            pb::CreateIdentityRequest {
                selectors: vec!["nocolon".into()],
                ..base()
            },
            "invalid selectors",
        ),
        (
            pb::CreateIdentityRequest {
                entitlements: Some(pb::Entitlements {
                    kinds: vec!["ssh".into()],
                    ..Default::default()
                }),
                ..base()
            },
            "invalid entitlements.kinds",
        ),
        (
            pb::CreateIdentityRequest {
                entitlements: Some(pb::Entitlements {
                    dns_names: vec!["not a name".into()],
                    ..Default::default()
                }),
                ..base()
            },
            "invalid entitlements.dns_names",
        ),
    ];
    for (req, want) in cases {
        let e = admin.create_identity(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains(want),
            "{} should contain {want}",
            e.message()
        );
    }
    assert!(
        admin
            .list_identities(pb::ListIdentitiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .identities
            .is_empty()
    );
    admin.create_identity(base()).await.unwrap();
    let e = admin.create_identity(base()).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            id_or_spiffe_id: "spiffe://example.org/nobody".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            id_or_spiffe_id: APP.into(),
            ttl_seconds: 7 * 86400,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Oversized requests are cut off by the transport with ResourceExhausted (as gRPC-core
    // and grpc-go answer), naming the limit, and the broker carries on.
    let e = raw::anon(&b.url, &b.bundle_pem)
        .attest(pb::AttestRequest {
            csr: vec![0u8; 200 * 1024],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("the limit is 65536 bytes (limits.max_request_bytes)"),
        "{e:?}"
    );
    // Without evidence.
    let e = raw::anon(&b.url, &b.bundle_pem)
        .attest(pb::AttestRequest {
            csr: vec![1],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        "invalid evidence: is required (e.g. a join token)"
    );
    // Workload calls that need mTLS say so.
    let e = raw::anon(&b.url, &b.bundle_pem)
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            request: Some(pb::JwtRequest {
                audiences: vec!["db".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("needs mutual TLS"), "{}", e.message());
    // A workload SVID is not an operator credential.
    b.identity("svc/x", |_| {}).await;
    let (w, _) = b.attested("spiffe://example.org/svc/x", &[]).await;
    let svid = w.x509_svid().unwrap();
    let key = svid.private_key_pem();
    let mut fake_admin = sigil_sdk::connect_admin(
        &b.url,
        &b.bundle_pem,
        svid.cert_chain_pem().as_bytes(),
        key.expose_secret(),
    )
    .unwrap();
    let e = fake_admin
        .list_identities(pb::ListIdentitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Nor is an operator credential a workload.
    let e = raw::anon(&b.url, &b.bundle_pem)
        .fetch_bundle(pb::FetchBundleRequest {})
        .await;
    assert!(e.is_ok(), "the bundle needs no client certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_and_a_wrong_master_key_changes_nothing() {
    let mut b = TestBroker::start().await;
    b.identity("payments/api", |_| {}).await;
    let (w, creds) = b.attested(APP, &["db"]).await;
    let before = b.workload().fetch_bundle().await.unwrap();
    b.restart().await;

    // Identities and keys survived: same bundle, the identity is there.
    let after = b.workload().fetch_bundle().await.unwrap();
    assert_eq!(
        before.bundle, after.bundle,
        "same roots and JWT keys after restart"
    );
    let list = b
        .admin()
        .list_identities(pb::ListIdentitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .identities;
    assert_eq!(list.len(), 1);
    // The ledger survived: the certificate issued before the restart still renews (its
    // generation is looked up in the ledger) and is found by serial.
    let raw_svid = creds.svid.clone();
    let mut c = raw::mtls(&b.url, &b.bundle_pem, &raw_svid);
    c.mint_jwt_svid(pb::MintJwtSvidRequest {
        request: Some(pb::JwtRequest {
            audiences: vec!["db".into()],
            ..Default::default()
        }),
    })
    .await
    .expect("a pre-restart SVID still authenticates");
    let rec = b
        .admin()
        .get_credential(pb::GetCredentialRequest {
            credential_id: creds.svid.serial.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rec.kind.as_str(), rec.spiffe_id.as_str(), rec.generation),
        ("x509", APP, 1)
    );
    let rec = b
        .admin()
        .get_credential(pb::GetCredentialRequest {
            credential_id: creds.jwts[0].jti.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rec.audiences, vec!["db".to_owned()]);
    drop(w);
    let verify = b
        .admin()
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verify.intact, "{}", verify.reason);

    // A wrong master key: a clear refusal, and not one byte on disk changes.
    b.stop().await;
    let files = snapshot(&b.data);
    let err = b
        .boot_with(sigil_broker::seal::MasterKey::generate())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the master key does not match the data in"),
        "{err}"
    );
    assert_eq!(
        changed_files(&files, &snapshot(&b.data)),
        Vec::<String>::new(),
        "refusing to start must leave every file as it was"
    );
    // Even with the sidecar check gone, the key check inside the store refuses.
    let key_check = sigil_broker::store::StoreConfig::in_data_dir(&b.data).files()[1].clone();
    std::fs::remove_file(key_check).unwrap();
    let err = b
        .boot_with(sigil_broker::seal::MasterKey::generate())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("the master key does not match"), "{err}");
    b.boot_with(b.master.clone())
        .await
        .expect("the right key still opens it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_store_cannot_commit_nothing_is_issued() {
    let b = TestBroker::start().await;
    b.identity("payments/api", |_| {}).await;
    let (w, _) = b.attested(APP, &[]).await;
    let token = b.join_token(APP).await;
    let minted_before = b.audit_for("jwt.mint").await.len();
    assert_eq!(b.http_get("/readyz").await.0, 200);

    b.faults.fail_writes(true);
    let e = w
        .fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::Unavailable));
    assert_eq!(e.kind(), ErrorKind::Retryable);
    assert!(
        e.message()
            .contains("could not record this durably, so nothing was issued"),
        "{e}"
    );
    let e = b
        .workload()
        .attest(
            Evidence::JoinToken(token.clone().into()),
            SvidOptions::default(),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
    let e = w.renew_x509_svid().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unavailable));

    // Not ready while it cannot commit (load balancers move away), but alive: restarting
    // would not help, recovering does.
    assert_eq!(b.http_get("/readyz").await.0, 503);
    assert_eq!(b.http_get("/healthz").await.0, 200);

    // The disk is back: the store recovers by itself (backoff of at most 2 s), no restart.
    b.faults.fail_writes(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while b.http_get("/readyz").await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "ready again within 20 s of the disk coming back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .expect("issuing again without a restart");
    let verify = b
        .admin()
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verify.intact, "{}", verify.reason);
    assert_eq!(
        b.audit_for("jwt.mint")
            .await
            .iter()
            .filter(|e| e["decision"] == "allow")
            .count(),
        minted_before + 1,
        "nothing was recorded while failing; the one after recovery was"
    );
    // The join token was not spent by the failed attempt.
    b.workload()
        .attest(
            Evidence::JoinToken(token.into()),
            SvidOptions::default(),
            &[],
        )
        .await
        .expect("token still works");
}

/// `openssl s_client` against the broker's mTLS listener with a workload's certificate;
/// `extra` adds `-sess_out`/`-sess_in`. It sends one line that is not HTTP/2, so the broker
/// closes the connection and s_client reports everything the server sent, alerts included
/// (TLS 1.3 checks the client certificate after the client considers the handshake done).
/// Returns whether the server refused the certificate, and the output.
fn s_client(dir: &std::path::Path, port: u16, version: &str, extra: &[&str]) -> (bool, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            version,
            "-servername",
            "localhost",
            "-alpn",
            "h2",
            "-CAfile",
            "bundle.pem",
            "-cert",
            "svid.pem",
            "-cert_chain",
            "svid.pem",
            "-key",
            "svid.key",
            "-verify_return_error",
            "-ign_eof",
        ])
        .args(extra)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the openssl CLI must be installed (apt-get install openssl)");
    let _ = child.stdin.take().unwrap().write_all(b"not http/2\n");
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        text.contains("certificate revoked") || text.contains("alert number 44"),
        text,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_are_never_resumed_so_a_revoked_certificate_cannot_skip_the_checks() {
    let b = TestBroker::start().await;
    b.identity("payments/api", |_| {}).await;
    let (_, creds) = b.attested(APP, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let chain: String = creds
        .svid
        .cert_chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect();
    std::fs::write(dir.path().join("svid.pem"), chain).unwrap();
    std::fs::write(
        dir.path().join("svid.key"),
        creds.svid.private_key_pem().expose_secret(),
    )
    .unwrap();
    std::fs::write(dir.path().join("bundle.pem"), &b.bundle_pem).unwrap();
    let port = b.running().grpc_addr.port();
    for version in ["-tls1_2", "-tls1_3"] {
        let sess = format!("sess{version}");
        let (refused, text) = s_client(dir.path(), port, version, &["-sess_out", &sess]);
        assert!(
            !refused
                && text.contains("Verify return code: 0 (ok)")
                && !text.contains("alert number"),
            "{version}: a full handshake with a live certificate: {text}"
        );
        assert!(text.contains("New, "), "{version}: {text}");
        if std::fs::metadata(dir.path().join(&sess)).is_ok_and(|m| m.len() > 0) {
            let (_, text) = s_client(dir.path(), port, version, &["-sess_in", &sess]);
            assert!(
                !text.contains("Reused, "),
                "{version}: the broker resumed a session: {text}"
            );
        }
    }
    // Revoked: no resumed session lets it skip the per-call checks; a full handshake is
    // followed by a refusal of every call (which says why).
    b.admin()
        .revoke_credential(pb::RevokeCredentialRequest {
            credential_id: creds.svid.serial.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    for version in ["-tls1_2", "-tls1_3"] {
        let sess = format!("sess{version}");
        let mut extra = Vec::new();
        if std::fs::metadata(dir.path().join(&sess)).is_ok_and(|m| m.len() > 0) {
            extra = vec!["-sess_in", sess.as_str()];
        }
        let (_, text) = s_client(dir.path(), port, version, &extra);
        assert!(!text.contains("Reused, "), "{version}: {text}");
    }
    let e = raw::mtls(&b.url, &b.bundle_pem, &creds.svid)
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            request: Some(pb::JwtRequest {
                audiences: vec!["db".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}
