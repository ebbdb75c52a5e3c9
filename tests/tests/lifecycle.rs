//! Credential lifecycle end to end: SDK renewal and rustls hot-swap through rotations,
//! revocation pushed to peers within a second, leak response, broker downtime, CRLs, OIDC
//! discovery, and the rotation schedule on an injected clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sigil_broker::clock::Clock as _;
use sigil_broker::config::Config;
use sigil_proto::v1 as pb;
use sigil_sdk::{
    Authorizer, ClientConfig, Evidence, JoinTokenFile, JwtRequest, Source, SourceConfig,
    SourceEvent, SvidOptions, WorkloadClient,
};
use sigil_tests::{SharedClock, TestBroker, next_event, peer};
use tonic::Code;

const A: &str = "spiffe://example.org/svc/a";
const B: &str = "spiffe://example.org/svc/b";

fn fast(cfg: &mut Config) {
    // A next JWT key is in the bundle this long before it signs: the peer's verifier must
    // have it by then (pushed on its watch stream, normally within milliseconds; 2 s leaves
    // room on a loaded CI machine). Rotations are 3 s apart.
    cfg.rotation.prepare = Duration::from_secs(2);
    cfg.rotation.check_interval = Duration::from_millis(200);
}

fn quick_source() -> SourceConfig {
    SourceConfig {
        min_interval: Duration::from_millis(100),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        ..SourceConfig::default()
    }
}

/// Registers A and B (x509 + jwt, audience `svc`, max lifetime `ttl` seconds).
async fn pair(b: &TestBroker, ttl: u32) {
    for path in ["svc/a", "svc/b"] {
        b.identity(path, |r| {
            let e = r.entitlements.as_mut().unwrap();
            e.max_ttl_seconds = ttl;
            e.audiences = vec!["svc".into()];
        })
        .await;
    }
}

/// A running source for `spiffe_id` whose re-attestation evidence comes from a token file.
async fn source(b: &TestBroker, spiffe_id: &str) -> (Source, std::path::PathBuf) {
    let file = b
        .dir
        .path()
        .join(format!("token-{}", spiffe_id.rsplit('/').next().unwrap()));
    std::fs::write(&file, b.join_token(spiffe_id).await).unwrap();
    let s = Source::start(
        b.workload(),
        Arc::new(JoinTokenFile::new(&file)),
        quick_source(),
    )
    .await
    .expect("source starts");
    (s, file)
}

fn exact(id: &str) -> Authorizer {
    Authorizer::Exact(id.parse().unwrap())
}

/// Two workloads call each other over mTLS with JWT-SVIDs through 12 s of 4 s certificates
/// and three rotations of each signing key, on a clock broker and SDKs share: the test moves
/// it 50 ms per request. Every request must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_talk_through_three_x509_and_three_jwt_rotations_without_a_failure() {
    const STEP: Duration = Duration::from_millis(50);
    let clock = SharedClock::starting_now();
    let b = TestBroker::start_on(&clock, fast).await;
    pair(&b, 4).await;
    let (a, _) = source(&b, A).await;
    let (bs, _) = source(&b, B).await;
    let (addr, server) = peer::serve(&a, exact(B)).await;
    let client_cfg = bs.client_config(exact(A)).unwrap();
    let mut admin = b.admin();

    let mut ok = 0;
    let mut failures = Vec::new();
    let mut serials = BTreeSet::new();
    let mut kids = BTreeSet::new();
    let mut intermediates = BTreeSet::new();
    let start = clock.unix_f64();
    let mut rotated = 0;
    for step in 1..=240u32 {
        clock.advance(STEP);
        let elapsed = clock.unix_f64() - start;
        // Every 3 s of the clock, rotate both keys (each takes over `prepare` later).
        if elapsed >= 3.0 * f64::from(rotated + 1) && rotated < 3 {
            rotate_when_idle(&mut admin).await;
            rotated += 1;
        }
        // The clock moves only as fast as the SDKs keep up: a certificate past its renewal
        // point is given (real) time to be replaced before the clock moves on.
        for s in [&a, &bs] {
            renewed_in_time(s, &clock).await;
        }
        let token = bs.jwt_svid(&JwtRequest::audience("svc")).await;
        let result = match token {
            Ok(t) => {
                let (h, _) = sigil_pki::jwt::peek_unverified(t.token.expose_secret()).unwrap();
                kids.insert(h["kid"].as_str().unwrap().to_owned());
                peer::call(addr, client_cfg.clone(), t.token.expose_secret()).await
            }
            Err(e) => Err(format!("jwt: {e}")),
        };
        match result {
            Ok(reply) if reply.starts_with(&format!("ok {B} ")) => {
                ok += 1;
                serials.insert(reply.rsplit(' ').next().unwrap().to_owned());
            }
            other => failures.push(format!("step {step} ({elapsed:.2} s): {other:?}")),
        }
        intermediates.insert(bs.x509_svid().unwrap().cert_chain[1].to_vec());
    }
    server.abort();

    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:#?}",
        failures.len(),
        ok + failures.len()
    );
    assert_eq!(ok, 240);
    assert!(
        serials.len() >= 4,
        "the client's certificate was renewed several times ({} serials)",
        serials.len()
    );
    assert!(
        intermediates.len() >= 3,
        "the client's chain followed the intermediate rotations ({} seen)",
        intermediates.len()
    );
    assert!(
        kids.len() >= 3,
        "tokens followed the JWT key rotations ({} keys seen)",
        kids.len()
    );
    let keys = b
        .admin()
        .list_keys(pb::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    for kind in ["jwt", "intermediate_ca"] {
        let states: Vec<&str> = keys
            .iter()
            .filter(|k| k.kind == kind)
            .map(|k| k.state.as_str())
            .collect();
        assert_eq!(
            states.iter().filter(|s| **s == "current").count(),
            1,
            "{kind}: {states:?}"
        );
        assert_eq!(
            states.iter().filter(|s| **s == "previous").count(),
            3,
            "three rotations of {kind}: {states:?}"
        );
    }
    a.shutdown().await;
    bs.shutdown().await;
    bs.shutdown().await; // idempotent
}

/// Starts a rotation of both keys once the last one has taken over (the broker's schedule
/// runs on a real 200 ms tick, reading the shared clock).
async fn rotate_when_idle(admin: &mut pb::admin_client::AdminClient<sigil_sdk::Failover>) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = admin
            .list_keys(pb::ListKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys;
        if !keys.iter().any(|k| k.state == "next") {
            break;
        }
        assert!(
            Instant::now() < until,
            "the last rotation never took over: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for kind in ["jwt", "x509"] {
        admin
            .rotate(pb::RotateRequest {
                kind: kind.into(),
                now: false,
            })
            .await
            .unwrap_or_else(|e| panic!("rotate {kind}: {e}"));
    }
}

/// Waits (in real time) while `s`'s certificate is past its renewal point and less than
/// 1.5 s from expiry on the shared clock, for the renewal to land.
async fn renewed_in_time(s: &Source, clock: &SharedClock) {
    let until = Instant::now() + Duration::from_secs(10);
    while (s.x509_svid().map_or(0, |c| c.expires_at) as f64) - clock.unix_f64() < 1.5 {
        assert!(
            Instant::now() < until,
            "the SDK did not renew its certificate"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_is_refused_within_a_second_even_when_resuming() {
    let b = TestBroker::start().await;
    pair(&b, 3600).await;
    let (a, _) = source(&b, A).await;
    let (bs, token_file) = source(&b, B).await;
    let (addr, _server) = peer::serve(&a, exact(B)).await;
    // A client that would resume sessions if the server let it.
    let mut resuming = (*bs.client_config(exact(A)).unwrap()).clone();
    resuming.resumption = rustls::client::Resumption::in_memory_sessions(64);
    let resuming = Arc::new(resuming);
    let token = bs.jwt_svid(&JwtRequest::audience("svc")).await.unwrap();
    let tok = token.token.expose_secret().to_owned();
    assert!(
        peer::call(addr, resuming.clone(), &tok)
            .await
            .unwrap()
            .starts_with("ok ")
    );
    assert!(
        peer::call(addr, resuming.clone(), &tok)
            .await
            .unwrap()
            .starts_with("ok ")
    );

    let mut events = bs.events();
    let serial = bs.x509_svid().unwrap().serial.clone();
    let t0 = Instant::now();
    b.admin()
        .revoke_credential(pb::RevokeCredentialRequest {
            credential_id: serial.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let refused_after = loop {
        match peer::call(addr, resuming.clone(), &tok).await {
            Err(_) => break t0.elapsed(),
            Ok(r) if r.starts_with("denied") => break t0.elapsed(),
            Ok(_) => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "still accepted 3s after revocation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        refused_after < Duration::from_secs(1),
        "refused after {refused_after:?}"
    );

    // The client's SDK hears about it at once and reports why it cannot get a replacement.
    next_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, SourceEvent::Revoked { .. })
    })
    .await;
    let failed = next_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, SourceEvent::RenewalFailed { .. })
    })
    .await;
    let SourceEvent::RenewalFailed { error, .. } = failed else {
        unreachable!()
    };
    assert!(
        error
            .message()
            .contains("still holds the join token already used"),
        "{error}"
    );

    // With fresh evidence in place it obtains a replacement and is accepted again.
    std::fs::write(&token_file, b.join_token(B).await).unwrap();
    bs.renew_now();
    next_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, SourceEvent::Reattested { .. })
    })
    .await;
    let fresh = bs.jwt_svid(&JwtRequest::audience("svc")).await.unwrap();
    let reply = peer::call(addr, resuming.clone(), fresh.token.expose_secret())
        .await
        .unwrap();
    assert!(
        reply.starts_with(&format!("ok {B} ")) && !reply.ends_with(&serial),
        "{reply}"
    );
    assert!(!b.audit_for("credential.revoke").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_jwt_is_rejected_within_a_second_and_only_fresh_attestation_restores_the_identity()
{
    let b = TestBroker::start().await;
    pair(&b, 3600).await;
    let (a, _) = source(&b, A).await;
    let bw = b.workload();
    let creds = bw
        .attest(
            Evidence::JoinToken(b.join_token(B).await.into()),
            SvidOptions::default(),
            &[JwtRequest::audience("svc")],
        )
        .await
        .unwrap();
    let leaked = creds.jwts[0].token.expose_secret().to_owned();
    let verifier = a.verifier();
    verifier
        .verify_jwt(&leaked, "svc")
        .expect("valid before the leak report");
    let file = b.dir.path().join("leaked.txt");
    std::fs::write(&file, &leaked).unwrap();
    let leak = |dry: bool| {
        let mut args = vec![
            "sigil",
            "leak",
            file.to_str().unwrap(),
            "--data-dir",
            b.data.to_str().unwrap(),
            "--broker",
            &b.url,
            "--reason",
            "found in a public repository",
        ];
        if dry {
            args.push("--dry-run");
        }
        sigil_cli::run(<sigil_cli::Cli as clap::Parser>::parse_from(args))
    };

    // Dry run: the blast radius is shown, nothing changes.
    let audit_before = b.audit().await.len();
    leak(true).await.expect("dry run");
    let id = b
        .admin()
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: B.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (id.status, id.generation),
        (pb::IdentityStatus::Active as i32, 1)
    );
    assert_eq!(
        b.audit().await.len(),
        audit_before,
        "a dry run writes nothing"
    );
    verifier
        .verify_jwt(&leaked, "svc")
        .expect("still valid after a dry run");

    let t0 = Instant::now();
    leak(false).await.expect("leak report");
    let rejected_after = loop {
        if verifier.verify_jwt(&leaked, "svc").is_err() {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        rejected_after < Duration::from_secs(1),
        "rejected after {rejected_after:?}"
    );

    let id = b
        .admin()
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: B.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(id.status, pb::IdentityStatus::Compromised as i32);
    assert_eq!(id.generation, 2);
    let e = bw.renew_x509_svid().await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(Code::Unauthenticated),
        "renewal over mTLS is refused: {e}"
    );
    let incident = b
        .audit_for("incident.leak")
        .await
        .pop()
        .expect("incident recorded");
    assert_eq!(
        incident["detail"]["leaked"]["id"],
        creds.jwts[0].jti.as_str()
    );
    let radius = serde_json::to_string(&incident["detail"]["blast_radius"]).unwrap();
    assert!(
        radius.contains(&creds.svid.serial),
        "the live certificate is in the blast radius: {radius}"
    );
    assert!(
        !serde_json::to_string(&b.audit().await)
            .unwrap()
            .contains(&leaked),
        "the audit log never holds the token"
    );

    // A join token from before the compromise does not restore it; a fresh one does.
    let fresh =
        WorkloadClient::new(ClientConfig::new(b.url.clone(), b.bundle_pem.clone())).unwrap();
    let c = fresh
        .attest(
            Evidence::JoinToken(b.join_token(B).await.into()),
            SvidOptions::default(),
            &[JwtRequest::audience("svc")],
        )
        .await
        .expect("fresh attestation");
    let id = b
        .admin()
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: B.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        id.status,
        pb::IdentityStatus::Active as i32,
        "fresh attestation restored it"
    );
    verifier
        .verify_jwt(c.jwts[0].token.expose_secret(), "svc")
        .expect("new tokens verify");
    assert!(
        verifier.verify_jwt(&leaked, "svc").is_err(),
        "the leaked one stays revoked"
    );

    // A forged token: a clear refusal, and nothing changes.
    let audit_before = b.audit().await.len();
    let forger = sigil_pki::JwtSigner::new(sigil_pki::EcKey::generate().unwrap());
    let forged = forger
        .sign(&sigil_pki::JwtSvidClaims {
            iss: None,
            sub: B.parse().unwrap(),
            aud: vec!["svc".into()],
            exp: 4_000_000_000,
            iat: 1_800_000_000,
            jti: "forged".into(),
            scopes: vec![],
            generation: 2,
            actors: vec![],
            parents: vec![],
        })
        .unwrap();
    let e = b
        .admin()
        .report_leak(pb::ReportLeakRequest {
            material: forged,
            reason: String::new(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("not issued by this broker"),
        "{}",
        e.message()
    );
    assert_eq!(b.audit().await.len(), audit_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_broker_is_down_the_sdk_keeps_its_certificate_until_it_expires_then_recovers() {
    // Broker and SDK share a clock the test moves: each step below happens because the clock
    // reached it, not because the machine was fast enough.
    let clock = SharedClock::starting_now();
    let mut b = TestBroker::start_on(&clock, |_| {}).await;
    b.identity("svc/b", |r| {
        r.entitlements.as_mut().unwrap().max_ttl_seconds = 6
    })
    .await;
    let (bs, token_file) = source(&b, B).await;
    let mut events = bs.events();
    let first = bs.x509_svid().unwrap();
    let issued = (first.expires_at - 6) as f64;

    // Down before the renewal point: the certificate keeps being served; renewal fails when
    // it falls due (half of 6 s, ±10%), not before.
    b.stop().await;
    clock.advance_to_unix(issued + 2.5);
    assert_no_event(&mut events, |e| {
        matches!(e, SourceEvent::RenewalFailed { .. })
    })
    .await;
    clock.advance_to_unix(issued + 3.5);
    let failed = next_event(&mut events, Duration::from_secs(10), |e| {
        matches!(e, SourceEvent::RenewalFailed { .. })
    })
    .await;
    let SourceEvent::RenewalFailed { retry_in, .. } = failed else {
        unreachable!()
    };
    assert_eq!(
        bs.x509_svid().unwrap().serial,
        first.serial,
        "the valid certificate is kept"
    );
    // Back before it expires: renewed over mTLS when the retry falls due, no restart of the
    // workload.
    b.start_again_on_same_port().await;
    clock.advance(retry_in);
    next_event_moving(&clock, &mut events, |e| {
        matches!(e, SourceEvent::Renewed { .. })
    })
    .await;
    let second = bs.x509_svid().unwrap();
    assert_ne!(second.serial, first.serial);

    // Down until it expires: then a clear error.
    b.stop().await;
    clock.advance_to_unix(second.expires_at as f64 + 0.5);
    let expired = next_event(&mut events, Duration::from_secs(10), |e| {
        matches!(e, SourceEvent::Expired { .. })
    })
    .await;
    assert!(matches!(expired, SourceEvent::Expired { at } if at == second.expires_at));
    let e = bs.x509_svid().unwrap_err();
    assert!(
        e.message().contains("expired at")
            && e.message().contains("the last renewal attempt failed"),
        "{e}"
    );
    // The broker returns and fresh evidence is waiting: the workload recovers by itself at
    // its next retry.
    b.start_again_on_same_port().await;
    std::fs::write(&token_file, b.join_token(B).await).unwrap();
    clock.advance(Duration::from_secs(2));
    next_event_moving(&clock, &mut events, |e| {
        matches!(e, SourceEvent::Reattested { .. })
    })
    .await;
    assert!(bs.x509_svid().is_ok());
    drop(bs); // dropping the source stops its tasks
}

/// The next event `want` accepts; a failed renewal on the way moves the clock to its retry
/// (a reconnect can take an attempt), so the wait never depends on the machine's speed.
async fn next_event_moving(
    clock: &SharedClock,
    rx: &mut tokio::sync::broadcast::Receiver<SourceEvent>,
    want: impl Fn(&SourceEvent) -> bool,
) -> SourceEvent {
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let e = tokio::time::timeout_at(until, rx.recv())
            .await
            .expect("the event came")
            .expect("the source is running");
        if want(&e) {
            return e;
        }
        if let SourceEvent::RenewalFailed { retry_in, .. } = &e {
            clock.advance(*retry_in);
        }
    }
}

/// Nothing `unwanted` arrives while the clock stands still (a short real wait: time does not
/// move, so nothing may come due).
async fn assert_no_event(
    rx: &mut tokio::sync::broadcast::Receiver<SourceEvent>,
    unwanted: impl Fn(&SourceEvent) -> bool,
) {
    let until = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Ok(e)) = tokio::time::timeout_at(until, rx.recv()).await {
        assert!(!unwanted(&e), "too early: {e:?}");
    }
}

fn der_to_pem(dir: &std::path::Path, name: &str, der: &[u8], kind: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem::encode(&pem::Pem::new(kind, der.to_vec()))).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_with_the_published_crls_rejects_a_revoked_certificate_and_accepts_a_live_one() {
    let b = TestBroker::start().await;
    pair(&b, 3600).await;
    let (_, revoked) = b.attested(A, &[]).await;
    let (_, live) = b.attested(B, &[]).await;
    b.admin()
        .revoke_credential(pb::RevokeCredentialRequest {
            credential_id: revoked.svid.serial.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let int_id = b.broker().keys().current().intermediate_id.clone();
    let (s1, int_crl) = b.http_get_bytes(&format!("/crl/{int_id}")).await;
    let (s2, root_crl) = b.http_get_bytes("/crl/root").await;
    assert_eq!((s1, s2), (200, 200));
    let dir = b.dir.path();
    let a = der_to_pem(dir, "int.crl.pem", &int_crl, "X509 CRL");
    let r = der_to_pem(dir, "root.crl.pem", &root_crl, "X509 CRL");
    std::fs::write(
        dir.join("crls.pem"),
        [std::fs::read(a).unwrap(), std::fs::read(r).unwrap()].concat(),
    )
    .unwrap();
    std::fs::write(dir.join("bundle.pem"), &b.bundle_pem).unwrap();
    for (name, creds, want_ok) in [("revoked", &revoked, false), ("live", &live, true)] {
        der_to_pem(
            dir,
            &format!("{name}.pem"),
            &creds.svid.cert_chain[0],
            "CERTIFICATE",
        );
        der_to_pem(
            dir,
            &format!("{name}-int.pem"),
            &creds.svid.cert_chain[1],
            "CERTIFICATE",
        );
        let leaf = format!("{name}.pem");
        let int = format!("{name}-int.pem");
        let (ok, text) = sigil_tests::openssl::run(
            &[
                "verify",
                "-crl_check_all",
                "-CRLfile",
                "crls.pem",
                "-CAfile",
                "bundle.pem",
                "-untrusted",
                &int,
                &leaf,
            ],
            dir,
        );
        assert_eq!(ok, want_ok, "{name}: {text}");
        if !want_ok {
            assert!(text.contains("certificate revoked"), "{text}");
        }
    }
}

/// The issuer comes from configuration alone: every JWT-SVID carries it, discovery names it
/// whatever `Host` a request (or a poisoned cache) says, it is https, and the HTTP listener
/// serves discovery over TLS so a relying party (PyJWT here) verifies tokens end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuer_is_https_from_configuration_and_pyjwt_verifies_against_discovery() {
    let b = TestBroker::start().await;
    pair(&b, 3600).await;
    let (_, creds) = b.attested(B, &["svc"]).await;
    let token = creds.jwts[0].token.expose_secret().to_owned();
    let http = b.running().http_addr.unwrap();
    let issuer = format!("https://localhost:{}", http.port());
    let (_, claims) = sigil_pki::jwt::peek_unverified(&token).unwrap();
    assert_eq!(
        claims["iss"],
        issuer.as_str(),
        "every JWT-SVID names the issuer"
    );

    for host in [
        format!("localhost:{}", http.port()),
        "attacker.example".into(),
    ] {
        let (status, body) = sigil_tests::http_get_with_host(
            http,
            "/.well-known/openid-configuration",
            &host,
            Some(&b.bundle_pem),
        )
        .await;
        assert_eq!(status, 200);
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["issuer"], issuer.as_str(), "Host {host}");
        assert_eq!(doc["jwks_uri"], format!("{issuer}/keys"), "Host {host}");
    }

    // A plain-http issuer is refused unless asked for, for development.
    let mut cfg = b.broker().config().clone();
    cfg.jwt_issuer = Some("http://sigil.example.org".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("is not https") && e.contains("jwt_issuer_allow_http"),
        "{e}"
    );
    cfg.jwt_issuer_allow_http = true;
    cfg.validate().unwrap();
    cfg.jwt_issuer = Some("https://sigil.example.org/?x=1".into());
    assert!(cfg.validate().is_err());

    // A relying party's JWT library, from PyPI: discovery over https, then the JWKS, then
    // the token with issuer= and audience=.
    let Some(python) = tokio::task::spawn_blocking(|| {
        sigil_tests::python::venv(
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
            "pyjwt-venv",
            &["pyjwt[crypto]==2.10.1"],
        )
    })
    .await
    .unwrap() else {
        // python::venv has said why (or failed, in CI).
        return;
    };
    let ca = b.dir.path().join("bundle.pem");
    std::fs::write(&ca, &b.bundle_pem).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pyjwt_check.py");
    let run = |aud: &str| {
        std::process::Command::new(&python)
            .arg(&script)
            .arg(format!("{issuer}/.well-known/openid-configuration"))
            .arg(&ca)
            .arg(&token)
            .arg(aud)
            .output()
            .unwrap()
    };
    let out = run("svc");
    assert!(
        out.status.success(),
        "PyJWT: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), B);
    let out = run("other");
    assert!(!out.status.success(), "PyJWT refuses another audience");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InvalidAudience"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_discovery_jwks_verifies_jwt_svids_with_an_independent_jwt_library() {
    let b = TestBroker::start_configured(Arc::new(sigil_broker::clock::SystemClock), |c| {
        c.jwt_issuer = Some("https://sigil.example.org".into())
    })
    .await;
    pair(&b, 3600).await;
    let (_, creds) = b.attested(B, &["svc"]).await;
    let token = creds.jwts[0].token.expose_secret().to_owned();
    let (status, doc) = b.http_get("/.well-known/openid-configuration").await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["issuer"], "https://sigil.example.org");
    assert_eq!(doc["id_token_signing_alg_values_supported"][0], "ES256");
    let (_, jwks) = b.http_get("/keys").await;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks).unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let jwk = set
        .find(header.kid.as_deref().unwrap())
        .expect("the token's key is in the JWKS");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["svc"]);
    v.set_issuer(&["https://sigil.example.org"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &v,
    )
    .expect("jsonwebtoken accepts the JWT-SVID");
    assert_eq!(data.claims["sub"], B);
    // And refuses it for another audience.
    v.set_audience(&["other"]);
    assert!(
        jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
            &v
        )
        .is_err()
    );
}

fn verify_at(
    token: &str,
    bundle: &sigil_sdk::TrustBundle,
    at: SystemTime,
) -> Result<sigil_pki::VerifiedJwt, sigil_pki::JwtError> {
    sigil_pki::jwt::verify(
        token,
        bundle.jwt_keys(),
        &sigil_pki::VerifyOptions {
            now: at,
            skew: Duration::from_secs(30),
            audience: Some("svc"),
            trust_domain: None,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_publishes_keys_before_they_sign_and_retires_them_after_on_an_injected_clock()
{
    let clock = Arc::new(sigil_broker::clock::ManualClock::new(SystemTime::now()));
    let b = TestBroker::start_configured(clock.clone(), |c| {
        c.rotation.jwt_key_lifetime = Duration::from_secs(3600);
        c.rotation.prepare = Duration::from_secs(300);
        c.issuance.max_ttl_ceiling = Duration::from_secs(86400);
    })
    .await;
    pair(&b, 86400).await;
    let w = b.workload();
    w.attest(
        Evidence::JoinToken(b.join_token(B).await.into()),
        SvidOptions {
            ttl: Some(Duration::from_secs(86400)),
            ..Default::default()
        },
        &[],
    )
    .await
    .unwrap();
    let broker = b.broker();
    let kid = |t: &str| {
        sigil_pki::jwt::peek_unverified(t).unwrap().0["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mint = || async {
        w.fetch_jwt_svid(&JwtRequest::audience("svc"))
            .await
            .unwrap()
            .token
            .expose_secret()
            .to_owned()
    };
    let t1 = mint().await;
    let t1_at = clock.now();
    let k1 = kid(&t1);

    assert!(
        broker.rotation_tick().await.unwrap().is_empty(),
        "nothing is due yet"
    );
    clock.advance(Duration::from_secs(3300));
    assert_eq!(
        broker.rotation_tick().await.unwrap(),
        vec![sigil_broker::rotate::Step::Prepare(
            sigil_broker::rotate::RotateKind::Jwt
        )]
    );
    let bundle = w.fetch_bundle().await.unwrap();
    assert_eq!(
        bundle.bundle.jwt_authorities.len(),
        2,
        "the next key is published..."
    );
    assert_eq!(kid(&mint().await), k1, "...but does not sign yet");

    clock.advance(Duration::from_secs(300));
    let steps = broker.rotation_tick().await.unwrap();
    assert!(
        matches!(
            steps.as_slice(),
            [sigil_broker::rotate::Step::Activate(
                sigil_broker::rotate::RotateKind::Jwt,
                _
            )]
        ),
        "{steps:?}"
    );
    let t2 = mint().await;
    let k2 = kid(&t2);
    assert_ne!(k1, k2, "the next key signs now");
    assert!(
        bundle.bundle.jwt_authorities.iter().any(|a| a.kid == k2),
        "verifiers had it before its first token"
    );
    let bundle = w.fetch_bundle().await.unwrap();
    verify_at(&t1, &bundle, t1_at + Duration::from_secs(10))
        .expect("tokens of the previous key still verify");

    // After everything the previous key signed has expired, it leaves the bundle.
    clock.advance(Duration::from_secs(86400 + 61));
    let steps = broker.rotation_tick().await.unwrap();
    assert!(
        steps.contains(&sigil_broker::rotate::Step::Retire(k1.clone())),
        "{steps:?}"
    );
    let bundle = w.fetch_bundle().await.unwrap();
    assert!(!bundle.bundle.jwt_authorities.iter().any(|a| a.kid == k1));

    // Root rotation: both roots are in the bundle during the overlap.
    let old_root = bundle.bundle.x509_authorities[0].clone();
    b.admin()
        .rotate(pb::RotateRequest {
            kind: "root".into(),
            now: false,
        })
        .await
        .unwrap();
    let bundle = w.fetch_bundle().await.unwrap();
    assert_eq!(
        bundle.bundle.x509_authorities.len(),
        2,
        "next root published before it signs anything"
    );
    clock.advance(Duration::from_secs(300));
    broker.rotation_tick().await.unwrap();
    let ring = broker.keys().current();
    assert_ne!(ring.root.cert(), &old_root, "the new root is current");
    let (_, int) = x509_parser::parse_x509_certificate(ring.intermediate.cert()).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(ring.root.cert()).unwrap();
    assert_eq!(
        int.issuer().to_string(),
        root.subject().to_string(),
        "a new intermediate under the new root signs now"
    );
    let bundle = w.fetch_bundle().await.unwrap();
    assert_eq!(
        bundle.bundle.x509_authorities.len(),
        2,
        "the old root stays until what chains to it has expired"
    );
    assert!(bundle.bundle.x509_authorities.contains(&old_root));
    assert!(
        !b.audit_for("key.activate").await.is_empty()
            && !b.audit_for("key.retire").await.is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_signing_key_invalidates_everything_it_signed_at_once() {
    let b = TestBroker::start().await;
    pair(&b, 3600).await;
    let (a, _) = source(&b, A).await;
    let verifier = a.verifier();
    let (w, creds) = b.attested(B, &["svc"]).await;
    let t1 = creds.jwts[0].token.expose_secret().to_owned();
    verifier.verify_jwt(&t1, "svc").unwrap();
    verifier
        .verify_x509(&creds.svid.cert_chain, &Authorizer::Any)
        .unwrap();
    let ring = b.broker().keys().current();
    let (jwt_kid, int_id) = (ring.jwt.kid().to_owned(), ring.intermediate_id.clone());

    let t0 = Instant::now();
    b.admin()
        .revoke_key(pb::RevokeKeyRequest {
            key_id: jwt_kid.clone(),
            reason: "key exposed".into(),
        })
        .await
        .unwrap();
    while verifier.verify_jwt(&t1, "svc").is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "still accepted after 1s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t2 = w
        .fetch_jwt_svid(&JwtRequest::audience("svc"))
        .await
        .unwrap();
    assert_ne!(
        sigil_pki::jwt::peek_unverified(t2.token.expose_secret())
            .unwrap()
            .0["kid"],
        jwt_kid.as_str(),
        "a new key took over"
    );
    tokio::time::timeout(Duration::from_secs(1), async {
        while verifier
            .verify_jwt(t2.token.expose_secret(), "svc")
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("tokens of the new key verify");

    let t0 = Instant::now();
    b.admin()
        .revoke_key(pb::RevokeKeyRequest {
            key_id: int_id,
            reason: "CA key exposed".into(),
        })
        .await
        .unwrap();
    while verifier
        .verify_x509(&creds.svid.cert_chain, &Authorizer::Any)
        .is_ok()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "still accepted after 1s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = w.renew_x509_svid().await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(Code::Unauthenticated),
        "the broker refuses certificates of a revoked CA: {e}"
    );
    let (_, fresh) = b.attested(B, &[]).await;
    verifier
        .verify_x509(&fresh.svid.cert_chain, &Authorizer::Any)
        .expect("certificates of the new intermediate verify");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_resume_from_a_sequence_and_introspection_follows_revocation() {
    let b = TestBroker::start().await;
    pair(&b, 3600).await;
    let (w, creds) = b.attested(B, &["svc"]).await;
    let mut s = w.watch(0).await.unwrap();
    let first = s.message().await.unwrap().unwrap();
    assert!(
        matches!(first.kind, Some(pb::watch_event::Kind::Bundle(_))),
        "a fresh watcher starts with the bundle"
    );
    let second = s.message().await.unwrap().unwrap();
    let Some(pb::watch_event::Kind::Revocations(r)) = second.kind else {
        panic!("then the revocation snapshot")
    };
    assert!(r.snapshot);
    drop(s);

    let token = creds.jwts[0].token.expose_secret().to_owned();
    let active = w.introspect_token(&token).await.unwrap();
    assert!(
        active.active
            && active.sub == B
            && active.aud == vec!["svc".to_owned()]
            && active.jti == creds.jwts[0].jti
    );
    b.admin()
        .revoke_credential(pb::RevokeCredentialRequest {
            credential_id: creds.jwts[0].jti.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();

    // Resuming after the last event seen: only what happened since, no snapshot.
    let mut s = w.watch(second.sequence).await.unwrap();
    let next = s.message().await.unwrap().unwrap();
    let Some(pb::watch_event::Kind::Revocations(r)) = next.kind else {
        panic!("expected the revocation, got {next:?}")
    };
    assert!(!r.snapshot);
    assert_eq!(r.credentials[0].credential_id, creds.jwts[0].jti);
    // Watchers learn what to refuse, not whose it was or the operator's words.
    assert_eq!(r.credentials[0].kind, "jwt");
    assert!(
        r.credentials[0].reason.is_empty() && r.credentials[0].spiffe_id.is_empty(),
        "{:?}",
        r.credentials[0]
    );
    drop(s);

    // A stranger gets no feed at all.
    let e = sigil_tests::raw::anon(&b.url, &b.bundle_pem)
        .watch(pb::WatchRequest { since_sequence: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("Watch needs a credential"), "{e:?}");
    // One client holds a bounded number of streams; the next is refused, others are not.
    let max = b.broker().config().limits.max_watch_streams_per_client;
    let mut held = Vec::new();
    for _ in 0..max {
        held.push(w.watch(0).await.unwrap());
    }
    let e = w.watch(0).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.message().contains("max_watch_streams_per_client"), "{e}");
    let (other, _) = b.attested(A, &[]).await;
    other.watch(0).await.expect("another client still watches");
    held.pop();
    // The slot comes back once the broker sees the stream close.
    let reopened = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(s) = w.watch(0).await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(reopened.is_ok(), "a closed stream frees its slot");
    drop(held);

    let inactive = w.introspect_token(&token).await.unwrap();
    assert!(
        !inactive.active && inactive.reason.is_empty() && inactive.sub.is_empty(),
        "RFC 7662: nothing about an inactive token for a workload"
    );
    // An operator learns why.
    let cert = std::fs::read(b.data.join("admin/admin.crt")).unwrap();
    let key = std::fs::read(b.data.join("admin/admin.key")).unwrap();
    let op = sigil_pki::EcKey::from_pkcs8_pem(std::str::from_utf8(&key).unwrap()).unwrap();
    let op_svid_chain = sigil_pki::certs_from_pem(&cert).unwrap();
    let slot = Arc::new(sigil_sdk::transport::ClientCertSlot::default());
    slot.set(op_svid_chain, op.to_pkcs8().unwrap().expose_secret())
        .unwrap();
    let tls = sigil_sdk::transport::client_config(
        sigil_sdk::transport::roots_from_pem(&b.bundle_pem).unwrap(),
        Some(slot),
    )
    .unwrap();
    let mut as_operator = pb::broker_client::BrokerClient::new(
        sigil_sdk::transport::channel(
            &sigil_sdk::transport::BrokerTarget::parse(&b.url).unwrap(),
            tls,
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    let r = as_operator
        .introspect(pb::IntrospectRequest {
            subject: Some(pb::introspect_request::Subject::Token(token)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.active, r.reason.as_str()), (false, "revoked"));
    let r = as_operator
        .introspect(pb::IntrospectRequest {
            subject: Some(pb::introspect_request::Subject::Certificate(
                creds.svid.cert_chain[0].to_vec(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.active && r.token_type == "x509" && r.sub == B);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_are_dropped_once_the_credential_would_have_expired_anyway() {
    let clock = Arc::new(sigil_broker::clock::ManualClock::new(SystemTime::now()));
    let b = TestBroker::start_with_clock(clock.clone()).await;
    pair(&b, 120).await;
    let (w, creds) = b.attested(B, &["svc"]).await;
    b.admin()
        .revoke_credential(pb::RevokeCredentialRequest {
            credential_id: creds.jwts[0].jti.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let broker = b.broker();
    assert_eq!(broker.revocations().len(), 1);
    let mut s = w.watch(0).await.unwrap();
    let _ = s.message().await.unwrap();
    let snapshot = s.message().await.unwrap().unwrap();
    assert!(
        matches!(snapshot.kind, Some(pb::watch_event::Kind::Revocations(ref r)) if r.credentials.len() == 1)
    );
    assert_eq!(
        broker.prune_revocations().await.unwrap(),
        0,
        "still live: kept"
    );
    clock.advance(Duration::from_secs(300 + 61));
    assert_eq!(broker.prune_revocations().await.unwrap(), 1);
    assert!(
        broker.revocations().is_empty(),
        "the set stays proportional to live credentials"
    );
    let ev = s.message().await.unwrap().unwrap();
    let Some(pb::watch_event::Kind::Revocations(r)) = ev.kind else {
        panic!("{ev:?}")
    };
    assert_eq!(
        r.expired,
        vec![creds.jwts[0].jti.clone()],
        "watchers drop it too"
    );
    // After a restart, pruned revocations stay gone.
    drop(s);
    let mut b = b;
    b.restart().await;
    assert!(b.broker().revocations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_rows_past_their_retention_are_collected_and_issuance_goes_on() {
    // A short retention (it may not be shorter than the TTL ceiling), and a clock behind real
    // time so that advancing it past the retention keeps the broker's TLS certificate valid.
    let clock = Arc::new(sigil_broker::clock::ManualClock::new(
        std::time::SystemTime::now() - Duration::from_secs(4 * 3600),
    ));
    let b = TestBroker::start_configured(clock.clone(), |c| {
        c.issuance.max_ttl_ceiling = Duration::from_secs(3600);
        c.rotation.ledger_retention = Duration::from_secs(2 * 3600);
    })
    .await;
    pair(&b, 600).await;
    let attest = || async {
        let token = b.join_token(A).await;
        sigil_tests::raw::anon(&b.url, &b.bundle_pem)
            .attest(pb::AttestRequest {
                evidence: Some(pb::Evidence {
                    kind: Some(pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                        token,
                    })),
                }),
                csr: sigil_pki::csr::request_for(&sigil_pki::EcKey::generate().unwrap()).unwrap(),
                jwts: vec![pb::JwtRequest {
                    audiences: vec!["svc".into()],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .svid
            .unwrap()
            .serial
    };
    let row = |serial: String| {
        let store = b.broker().store().clone();
        async move {
            let key = sigil_broker::model::credential_key(
                sigil_broker::model::CredentialKind::X509,
                &serial,
            )
            .unwrap();
            store.ledger_record(&key).await.unwrap()
        }
    };
    let old = attest().await;
    assert!(row(old.clone()).await.is_some());
    assert_eq!(
        b.broker().prune_ledger().await.unwrap(),
        0,
        "nothing old enough yet"
    );

    clock.advance(Duration::from_secs(3 * 3600));
    let gone = b.broker().prune_ledger().await.unwrap();
    assert!(
        gone >= 2,
        "the certificate and token of 3h ago went ({gone})"
    );
    assert!(
        row(old).await.is_none(),
        "the expired certificate's row is gone"
    );
    let pruned = b.audit_for("ledger.prune").await;
    assert_eq!(
        pruned
            .iter()
            .map(|e| e["detail"]["rows"].as_u64().unwrap())
            .sum::<u64>(),
        gone as u64
    );
    // Issuance goes on, and its rows stay.
    let fresh = attest().await;
    assert!(row(fresh).await.is_some());
    assert_eq!(b.broker().prune_ledger().await.unwrap(), 0);
}

/// A leak report and join tokens created within one second: commit order, not the clock's
/// seconds, decides which evidence is newer than the compromise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_made_before_a_leak_in_the_same_second_does_not_restore_the_identity() {
    // The clock stands still: everything below happens "in the same second".
    let clock = Arc::new(sigil_broker::clock::ManualClock::new(SystemTime::now()));
    let b = TestBroker::start_with_clock(clock.clone()).await;
    b.identity("svc/b", |_| {}).await;
    let (_, creds) = b.attested(B, &["db"]).await;
    let before_leak = b.join_token(B).await;
    let report = b
        .admin()
        .report_leak(pb::ReportLeakRequest {
            material: creds.jwts[0].token.expose_secret().to_owned(),
            reason: "pasted in a chat".into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        report.identity.unwrap().status,
        pb::IdentityStatus::Compromised as i32
    );
    let after_leak = b.join_token(B).await;

    let attest = |token: String| {
        let w = b.workload();
        async move {
            w.attest(
                Evidence::JoinToken(token.into()),
                SvidOptions::default(),
                &[],
            )
            .await
        }
    };
    let e = attest(before_leak).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(e.message().contains("marked compromised"), "{e}");
    // The token created after the report restores the identity.
    let creds = attest(after_leak).await.unwrap();
    assert_eq!(creds.svid.spiffe_id.as_str(), B);
    let id = b
        .admin()
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: B.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(id.status, pb::IdentityStatus::Active as i32);
}
