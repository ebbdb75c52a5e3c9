//! Staying up under abuse, as an attacker on loopback would try it: requests whose work grows
//! with an attacker-chosen size, refusals that would grow the audit log with attacker-chosen
//! bytes, bursts from one source, and audit retention that must still prove the chain intact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sigil_broker::clock::{Clock as _, ManualClock, SystemClock};
use sigil_broker::config::{OidcIssuer, OidcPreset};
use sigil_proto::v1 as pb;
use sigil_sdk::JwtRequest;
use sigil_tests::{TestBroker, raw};
use tonic::Code;

const APP: &str = "spiffe://example.org/svc/app";

/// A FetchBundle and a JWT-SVID mint from a well-behaved client, each timed.
async fn served_within(b: &TestBroker, w: &sigil_sdk::WorkloadClient, limit: Duration) {
    let t = Instant::now();
    b.workload().fetch_bundle().await.expect("bundle");
    let bundle = t.elapsed();
    let t = Instant::now();
    w.fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .expect("mint");
    let mint = t.elapsed();
    assert!(
        bundle < limit && mint < limit,
        "a normal client waited {bundle:?} for a bundle and {mint:?} for a JWT-SVID"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_with_thousands_of_repeated_audiences_is_refused_before_any_work() {
    let b = TestBroker::start().await;
    b.identity("svc/app", |_| {}).await;
    let (w, creds) = b.attested(APP, &["db"]).await;
    let subject = creds.jwts[0].token.expose_secret().to_owned();
    let attack = |n: usize| {
        let (url, bundle, svid, subject) = (
            b.url.clone(),
            b.bundle_pem.clone(),
            creds.svid.clone(),
            subject.clone(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let e = raw::mtls(&url, &bundle, &svid)
                .exchange_jwt_svid(pb::ExchangeJwtSvidRequest {
                    subject_token: subject,
                    audiences: vec!["db".into(); n],
                    ..Default::default()
                })
                .await
                .unwrap_err();
            (e, started.elapsed())
        })
    };
    let attackers = [attack(9000), attack(9000)];
    served_within(&b, &w, Duration::from_secs(1)).await;
    for a in attackers {
        let (e, took) = a.await.unwrap();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("audiences") && e.message().contains("at most 16 entries"),
            "{e:?}"
        );
        assert!(took < Duration::from_secs(2), "refused in {took:?}");
    }
    // Duplicates under the limit are folded, not minted into the token.
    let e = raw::mtls(&b.url, &b.bundle_pem, &creds.svid)
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            request: Some(pb::JwtRequest {
                audiences: vec!["db".into(); 5],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.svid.unwrap().audiences, vec!["db".to_owned()]);
}

/// An OIDC issuer with no keys: every token is refused, which is all an attacker needs.
fn with_an_oidc_issuer(dir: &std::path::Path) -> impl FnOnce(&mut sigil_broker::config::Config) {
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
    move |c| {
        c.oidc = vec![OidcIssuer {
            name: "idp".into(),
            preset: OidcPreset::Generic,
            issuer: "https://idp.example".into(),
            audiences: vec!["sigil".into()],
            jwks_file: Some(jwks),
            jwks_url: None,
            ca_file: None,
            algorithms: vec!["RS256".into()],
            clock_skew: Duration::from_secs(60),
            jwks_cache: Duration::from_secs(300),
            jwks_min_refresh: Duration::from_secs(30),
        }]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_attestations_with_huge_claims_do_not_grow_the_audit_log() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let tmp = tempfile::tempdir().unwrap();
    let b =
        TestBroker::start_configured(Arc::new(SystemClock), with_an_oidc_issuer(tmp.path())).await;
    b.identity("svc/app", |_| {}).await;
    let (w, _) = b.attested(APP, &["db"]).await;
    let huge = "i".repeat(12 * 1024);
    let token = format!(
        "{}.{}.{}",
        B64.encode(r#"{"alg":"RS256","kid":"k"}"#),
        B64.encode(format!(
            r#"{{"iss":"https://{huge}","sub":"x","aud":"sigil","exp":4000000000}}"#
        )),
        B64.encode([0u8; 256])
    );
    let before = b.audit().await;
    let bytes_before: usize = before.iter().map(|e| e.to_string().len()).sum();
    let store_size = || {
        sigil_broker::store::StoreConfig::in_data_dir(&b.data)
            .files()
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum::<u64>()
    };
    let file_before = store_size();
    let mut refused = 0;
    let mut limited = 0;
    let flood = async {
        for _ in 0..300 {
            let e = raw::anon(&b.url, &b.bundle_pem)
                .attest(pb::AttestRequest {
                    evidence: Some(pb::Evidence {
                        kind: Some(pb::evidence::Kind::Oidc(pb::OidcEvidence {
                            token: token.clone(),
                        })),
                    }),
                    csr: vec![1],
                    ..Default::default()
                })
                .await
                .unwrap_err();
            match e.code() {
                Code::Unauthenticated | Code::InvalidArgument => refused += 1,
                Code::ResourceExhausted => limited += 1,
                other => panic!("{other:?}: {e:?}"),
            }
        }
    };
    let (_, ()) = tokio::join!(flood, async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        served_within(&b, &w, Duration::from_secs(1)).await;
    });
    assert_eq!(refused + limited, 300);
    let after = b.audit().await;
    let new = &after[before.len()..];
    let grown: usize = after.iter().map(|e| e.to_string().len()).sum::<usize>() - bytes_before;
    // The normal client's mint (one entry), and the refusals folded into one entry per interval.
    assert!(new.len() <= 4, "{} new entries: {new:#?}", new.len());
    assert!(grown < 8 * 1024, "the audit log grew by {grown} bytes");
    // On disk too: before the fix, 300 such requests added 8 MB to the store file.
    let file_grown = store_size().saturating_sub(file_before);
    assert!(
        file_grown <= 512 * 1024,
        "the store file grew by {file_grown} bytes"
    );
    assert!(!after.iter().any(|e| e.to_string().contains(&huge[..1024])));
}

/// A Broker-API client whose connections come from `source` (another loopback address).
async fn anon_from(
    b: &TestBroker,
    source: std::net::IpAddr,
) -> pb::broker_client::BrokerClient<tonic::transport::Channel> {
    let addr = b.running().grpc_addr;
    let mut roots = rustls::RootCertStore::empty();
    for c in sigil_pki::certs_from_pem(&b.bundle_pem).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let cfg = Arc::new(cfg);
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let cfg = cfg.clone();
            async move {
                let s = tokio::net::TcpSocket::new_v4()?;
                s.bind((source, 0).into())?;
                let tcp = s.connect(addr).await?;
                let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    pb::broker_client::BrokerClient::new(ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_source_is_rate_limited_and_others_are_not() {
    let b = TestBroker::start_configured(Arc::new(SystemClock), |c| {
        c.limits.unauthenticated_per_second = 5;
        c.limits.unauthenticated_burst = 10;
        c.limits.authenticated_per_second = 5;
        c.limits.authenticated_burst = 10;
        c.limits.http_per_second = 5;
        c.limits.http_burst = 10;
    })
    .await;
    b.identity("svc/app", |_| {}).await;
    b.identity("svc/other", |_| {}).await;
    let (a, _) = b.attested(APP, &["db"]).await;
    let (other, _) = b.attested("spiffe://example.org/svc/other", &["db"]).await;
    // Let the address's bucket refill after those attestations.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut noisy = raw::anon(&b.url, &b.bundle_pem);
    let mut limited = None;
    for _ in 0..40 {
        if let Err(e) = noisy.fetch_bundle(pb::FetchBundleRequest {}).await {
            limited = Some(e);
            break;
        }
    }
    let e = limited.expect("a burst of 40 from one address is limited");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("limits.unauthenticated_per_second"),
        "{e:?}"
    );
    let retry: u64 = e
        .metadata()
        .get("sigil-retry-after-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&retry), "{retry}");
    // Another source address is served normally.
    anon_from(&b, "127.0.0.2".parse().unwrap())
        .await
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .expect("another address has its own bucket");

    // Per identity: one identity's burst does not touch another's.
    let mut hit = None;
    for _ in 0..40 {
        if let Err(e) = a.fetch_jwt_svid(&JwtRequest::audience("db")).await {
            hit = Some(e);
            break;
        }
    }
    let e = hit.expect("a burst of 40 from one identity is limited");
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.retry_after().is_some(), "the SDK sees the retry hint");
    other
        .fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .expect("another identity is served");

    // HTTP: 429 with Retry-After; health checks are never limited.
    let mut saw_429 = false;
    for _ in 0..40 {
        if b.http_get("/bundle").await.0 == 429 {
            saw_429 = true;
            break;
        }
    }
    assert!(
        saw_429,
        "a burst of HTTP requests from one address is limited"
    );
    for _ in 0..20 {
        assert_eq!(b.http_get("/healthz").await.0, 200);
    }
    // Counted in /metrics.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, metrics) = b.http_get("/metrics").await;
    for class in ["unauthenticated", "authenticated", "http"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("sigil_rate_limited_total") && l.contains(class)),
            "{class}: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_retention_leaves_a_checkpoint_and_tampering_after_it_is_still_named() {
    use clap::Parser as _;
    // Behind real time, so certificates minted on it still verify when it is moved on.
    let clock = Arc::new(ManualClock::new(
        SystemTime::now() - Duration::from_secs(600),
    ));
    let export = tempfile::tempdir().unwrap();
    let dir = export.path().to_owned();
    let mut b = TestBroker::start_configured(clock.clone(), move |c| {
        c.audit.retention = Duration::from_secs(60);
        c.audit.export_dir = Some(dir);
    })
    .await;
    b.identity("svc/app", |_| {}).await;
    b.join_token(APP).await;
    let old = b.audit().await.len();
    // Two minutes later, more happens; then the old entries are past retention.
    clock.advance(Duration::from_secs(120));
    b.identity("svc/new", |_| {}).await;
    let removed = b.broker().prune_audit(10_000).await.unwrap();
    assert_eq!(
        removed as usize, old,
        "exactly the entries older than the retention"
    );
    let kept = b.audit().await;
    assert_eq!(kept[0]["seq"], old as u64 + 1);
    assert_eq!(kept.last().unwrap()["action"], "audit.prune");
    // They were exported first, as JSON lines, byte for byte.
    let files: Vec<_> = std::fs::read_dir(export.path())
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(files.len(), 1);
    let lines = std::fs::read_to_string(files[0].path()).unwrap();
    assert_eq!(lines.lines().count(), old);
    // The kept chain verifies, online and offline, from the checkpoint.
    let v = b
        .admin()
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.intact, "{}", v.reason);
    b.stop().await;
    let copy = b.dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in sigil_broker::store::StoreConfig::in_data_dir(&b.data).files() {
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    for f in ["sigil.toml", "bundle.pem"] {
        std::fs::copy(b.data.join(f), copy.join(f)).unwrap();
    }
    b.master.write_new_file(&copy.join("master.key")).unwrap();
    let verify = |dir: std::path::PathBuf| async move {
        sigil_cli::run(sigil_cli::Cli::parse_from([
            "sigil",
            "audit",
            "verify",
            "--offline",
            "--data-dir",
            dir.to_str().unwrap(),
        ]))
        .await
        .map_err(|e| format!("{e:#}"))
    };
    verify(copy.clone())
        .await
        .expect("the kept chain verifies offline");
    // Editing the first entry after the checkpoint is named.
    let first = old as u64 + 1;
    sigil_broker::store::testing::edit_audit(
        &sigil_broker::store::StoreConfig::in_data_dir(&copy),
        |t| {
            let e = String::from_utf8(t[&first].clone())
                .unwrap()
                .replace("svc/new", "svc/evil");
            t.insert(first, e.into_bytes());
        },
    )
    .unwrap();
    let e = verify(copy).await.unwrap_err();
    assert!(
        e.contains(&format!("broken at entry {first}")) && e.contains("edited"),
        "{e}"
    );
    let _ = clock.unix();
}

/// Every list a caller sends is capped before any per-element work, and the refusal names the
/// field and the limit: audiences, scopes, DNS names, JWT-SVIDs per call, selectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_list_in_a_request_is_capped_and_the_refusal_names_the_field_and_limit() {
    let b = TestBroker::start().await;
    b.identity("svc/app", |_| {}).await;
    let (_w, creds) = b.attested(APP, &["db"]).await;
    let mut c = raw::mtls(&b.url, &b.bundle_pem, &creds.svid);
    let refused = |e: tonic::Status, field: &str, limit: &str| {
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().contains(field) && e.message().contains(limit),
            "{field}: the message names the field and the limit: {}",
            e.message()
        );
    };
    let e = c
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            request: Some(pb::JwtRequest {
                audiences: vec!["db".into()],
                scopes: (0..17).map(|i| format!("s{i}")).collect(),
                ttl_seconds: 0,
            }),
        })
        .await
        .unwrap_err();
    refused(e, "scopes", "16");
    let e = c
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            request: Some(pb::JwtRequest {
                audiences: (0..17).map(|i| format!("a{i}")).collect(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    refused(e, "audiences", "16");
    let csr = sigil_pki::csr::request_for(&sigil_pki::EcKey::generate().unwrap()).unwrap();
    let e = c
        .mint_x509_svid(pb::MintX509SvidRequest {
            csr: csr.clone(),
            dns_names: (0..33).map(|i| format!("h{i}.example.org")).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(e, "dns_names", "32");
    let token = b.join_token(APP).await;
    let e = raw::anon(&b.url, &b.bundle_pem)
        .attest(pb::AttestRequest {
            evidence: Some(pb::Evidence {
                kind: Some(pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                    token: token.clone(),
                })),
            }),
            csr,
            jwts: (0..9)
                .map(|_| pb::JwtRequest {
                    audiences: vec!["db".into()],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(e, "jwts", "8");
    // The refused attestation did not spend the token: bad input changes nothing.
    b.workload()
        .attest(
            sigil_sdk::Evidence::JoinToken(token.into()),
            sigil_sdk::SvidOptions::default(),
            &[],
        )
        .await
        .expect("the join token still works");
    let e = b
        .admin()
        .create_identity(pb::CreateIdentityRequest {
            spiffe_id: "spiffe://example.org/svc/many".into(),
            owner: "team".into(),
            purpose: "x".into(),
            selectors: (0..33).map(|i| format!("unix:uid:{i}")).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(e, "selectors", "32");
}

/// A TLS handshake over loopback with the broker's bundle; `Err` when the broker closed the
/// connection instead (over its budget).
async fn tls_connect(
    addr: std::net::SocketAddr,
    bundle: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in sigil_pki::certs_from_pem(bundle).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// Per-client connection caps on the TLS listener and the Unix socket, and the HTTP
/// listener's header timeout, end to end: the connection over a cap is closed at once, one
/// freed makes room again, and a silent HTTP client is dropped after the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_connection_caps_and_the_http_header_timeout_hold_end_to_end() {
    use tokio::io::AsyncReadExt as _;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("workload.sock");
    let s = sock.clone();
    let b = TestBroker::start_configured(Arc::new(SystemClock), move |c| {
        c.limits.max_connections_per_address = 3;
        c.limits.max_unix_connections_per_uid = 2;
        c.limits.http_header_timeout = Duration::from_secs(1);
        c.workload_socket = Some(s);
    })
    .await;
    let grpc = b.running().grpc_addr;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            tls_connect(grpc, &b.bundle_pem)
                .await
                .expect("within the cap"),
        );
    }
    assert!(
        tls_connect(grpc, &b.bundle_pem).await.is_err(),
        "a fourth connection from one address is closed at once"
    );
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tls_connect(grpc, &b.bundle_pem)
        .await
        .expect("a freed slot makes room again");

    // The Unix socket: two connections per uid.
    let mut u = Vec::new();
    for _ in 0..2 {
        u.push(tokio::net::UnixStream::connect(&sock).await.unwrap());
    }
    let mut third = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("closed at once, not left open")
        .unwrap_or(0);
    assert_eq!(n, 0, "a third connection from one uid is closed");

    // A silent HTTP client is dropped after the header timeout.
    let http = b.running().http_addr.expect("http");
    let mut silent = tls_connect(http, &b.bundle_pem).await.expect("http tls");
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("dropped within the timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the timeout: {:?}",
        started.elapsed()
    );
}

/// One client's (one certificate's) calls in flight are capped across all its connections:
/// streams it holds open on three connections use its budget, a fourth call on a fresh
/// connection is refused with the limit named, other clients are untouched, and a stream that
/// ends frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_are_capped_per_client_across_its_connections() {
    let b = TestBroker::start_configured(Arc::new(SystemClock), |c| {
        c.limits.max_streams_per_client = 3;
    })
    .await;
    b.identity("svc/app", |_| {}).await;
    b.identity("svc/other", |_| {}).await;
    let (_, creds) = b.attested(APP, &[]).await;
    let (_, other) = b.attested("spiffe://example.org/svc/other", &[]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = raw::mtls(&b.url, &b.bundle_pem, &creds.svid);
        let mut s = c
            .watch(pb::WatchRequest { since_sequence: 0 })
            .await
            .expect("within the budget")
            .into_inner();
        s.message().await.unwrap().expect("the first event");
        held.push((c, s));
    }
    let mut fresh = raw::mtls(&b.url, &b.bundle_pem, &creds.svid);
    let e = fresh
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .expect_err("a fourth call in flight is refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("limits.max_streams_per_client") && e.message().contains('3'),
        "{e:?}"
    );
    raw::mtls(&b.url, &b.bundle_pem, &other.svid)
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .expect("another identity has its own budget");
    // Another instance of the same identity (its own certificate), as replicas of one service
    // are, has its own budget too.
    let (_, twin) = b.attested(APP, &[]).await;
    raw::mtls(&b.url, &b.bundle_pem, &twin.svid)
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .expect("another instance of the identity has its own budget");
    raw::anon(&b.url, &b.bundle_pem)
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .expect("a caller without a credential from the same address is another client");

    // A stream that ends frees its slot.
    drop(held.pop());
    let mut served = false;
    for _ in 0..50 {
        if fresh.fetch_bundle(pb::FetchBundleRequest {}).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a closed stream gave its slot back");
    // Unary calls give theirs back as soon as they are answered.
    for _ in 0..10 {
        fresh
            .fetch_bundle(pb::FetchBundleRequest {})
            .await
            .expect("answered calls hold no slot");
    }
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sigil_rate_limited_total") && l.contains("streams")),
        "{metrics}"
    );
}

/// The store writer's queue is bounded: a flood of mints beyond it is shed at once, each
/// refused call reaching the client as `Unavailable` that says nothing was done, counted in
/// `sigil_store_shed_total`; nothing is issued for a shed call, and the broker serves again
/// as soon as the flood passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_writer_queue_sheds_calls_as_unavailable_and_issues_nothing_for_them() {
    let b = TestBroker::start_configured(Arc::new(SystemClock), |c| {
        c.limits.store_queue = 1;
    })
    .await;
    b.identity("svc/app", |_| {}).await;
    let (a, _) = b.attested(APP, &["db"]).await;
    let minted_before = allowed_mints(&b).await;
    let (mut ok, mut shed) = (0usize, 0usize);
    for _round in 0..5 {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let a = a.clone();
            calls.spawn(async move { a.fetch_jwt_svid(&JwtRequest::audience("db")).await });
        }
        while let Some(r) = calls.join_next().await {
            match r.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
                    assert!(
                        e.to_string().contains("overloaded")
                            && e.to_string().contains("before doing anything"),
                        "{e}"
                    );
                    shed += 1;
                }
            }
        }
        if shed > 0 {
            break;
        }
    }
    assert!(
        shed > 0,
        "200 concurrent mints against a queue of one shed some"
    );
    assert!(ok > 0, "the writer kept committing while shedding");
    assert_eq!(
        allowed_mints(&b).await - minted_before,
        ok,
        "one issuance recorded per mint served, none for a shed one"
    );
    a.fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .expect("served again once the flood passed, without a restart");
    let (_, metrics) = b.http_get("/metrics").await;
    let counted = metric(&metrics, "sigil_store_shed_total", "");
    assert!(counted >= shed as f64, "{counted} < {shed}");
}

/// The value of the first sample of `name` whose line contains `label` (0 when none).
fn metric(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn allowed_mints(b: &TestBroker) -> usize {
    b.audit_for("jwt.mint")
        .await
        .iter()
        .filter(|e| e["decision"] == "allow")
        .count()
}

/// A rate-limited SDK waits out the broker's retry hint instead of its own (much shorter)
/// backoff: one refusal, then the next renewal no sooner than the hint said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_sdk_source_waits_out_the_retry_hint() {
    use sigil_sdk::{Source, SourceConfig, SourceEvent};
    let b = TestBroker::start_configured(Arc::new(SystemClock), |c| {
        // Room for the test's own admin calls (the operator has a bucket of its own).
        c.limits.authenticated_per_second = 1;
        c.limits.authenticated_burst = 3;
    })
    .await;
    b.identity("svc/app", |_| {}).await;
    let w = b.workload();
    let token = b.join_token(APP).await;
    let source = Source::start(
        w,
        Arc::new(sigil_sdk::OneTimeEvidence::new(
            sigil_sdk::Evidence::JoinToken(token.into()),
        )),
        SourceConfig {
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(20),
            watch: false,
            ..SourceConfig::default()
        },
    )
    .await
    .unwrap();
    let mut events = source.events();
    // Renew until the identity's bucket is empty: its burst of 3, then a refusal.
    let mut failed = None;
    for _ in 0..5 {
        source.renew_now();
        let e = sigil_tests::next_event(&mut events, Duration::from_secs(5), |e| {
            matches!(
                e,
                SourceEvent::Renewed { .. } | SourceEvent::RenewalFailed { .. }
            )
        })
        .await;
        if matches!(e, SourceEvent::RenewalFailed { .. }) {
            failed = Some(e);
            break;
        }
    }
    let failed = failed.expect("the identity's burst ran out");
    let refused_at = Instant::now();
    let SourceEvent::RenewalFailed { error, retry_in } = failed else {
        unreachable!()
    };
    let hint = error
        .retry_after()
        .expect("the refusal carries a retry hint");
    assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");
    assert!(hint >= Duration::from_millis(500), "{hint:?}");
    assert!(
        retry_in >= hint,
        "the SDK waits {retry_in:?}, not less than the hint {hint:?} (its own backoff is 10 ms)"
    );
    sigil_tests::next_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, SourceEvent::Renewed { .. })
    })
    .await;
    let waited = refused_at.elapsed();
    assert!(
        waited + Duration::from_millis(50) >= hint,
        "renewed {waited:?} after the refusal, before the hint {hint:?}"
    );
    // One refusal in all: the SDK did not hammer the broker while it waited.
    let (_, metrics) = b.http_get("/metrics").await;
    let refusals = metric(&metrics, "sigil_rate_limited_total", "\"authenticated\"");
    assert_eq!(refusals, 1.0, "{metrics}");
    source.shutdown().await;
}
