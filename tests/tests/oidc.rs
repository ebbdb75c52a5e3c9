//! OIDC attestation against a local test issuer: the test makes its own keys, signs tokens
//! shaped like a Kubernetes projected service-account token and a GitHub Actions ID token, and
//! serves the JWKS from a file (Kubernetes, GitLab), over HTTPS on loopback (GitHub) and by
//! OpenID Connect discovery.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sigil_broker::clock::{Clock as _, ManualClock, SystemClock};
use sigil_broker::config::{OidcIssuer, OidcPreset};
use sigil_sdk::{Evidence, SvidOptions};
use sigil_tests::{TestBroker, openssl};

const K8S_ISS: &str = "https://kubernetes.default.svc.cluster.local";
const GH_ISS: &str = "https://token.actions.githubusercontent.com";

/// An RSA signing key made with the openssl CLI (PKCS#1 for jsonwebtoken), and its JWK.
struct RsaIssuerKey {
    der: Vec<u8>,
    jwk: Value,
}

fn rsa_key(dir: &Path, kid: &str) -> RsaIssuerKey {
    let pem = dir.join(format!("{kid}.pem"));
    let der = dir.join(format!("{kid}.der"));
    let (ok, out) = openssl::run(
        &[
            "genrsa",
            "-traditional",
            "-out",
            pem.to_str().unwrap(),
            "2048",
        ],
        dir,
    );
    assert!(ok, "{out}");
    let (ok, out) = openssl::run(
        &[
            "rsa",
            "-in",
            pem.to_str().unwrap(),
            "-traditional",
            "-outform",
            "DER",
            "-out",
            der.to_str().unwrap(),
        ],
        dir,
    );
    assert!(ok, "{out}");
    let (ok, modulus) = openssl::run(
        &["rsa", "-in", pem.to_str().unwrap(), "-noout", "-modulus"],
        dir,
    );
    assert!(ok, "{modulus}");
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    RsaIssuerKey {
        der: std::fs::read(&der).unwrap(),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                    "n": B64.encode(n), "e": "AQAB"}),
    }
}

/// A P-256 key and its JWK (which names no `alg`, so only its type and curve constrain it).
fn ec_key(kid: &str) -> (EncodingKey, Value) {
    let k = sigil_pki::EcKey::generate().unwrap();
    let p = k.public_point();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                     "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65])});
    (
        EncodingKey::from_ec_der(k.to_pkcs8().unwrap().expose_secret()),
        jwk,
    )
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn k8s_claims(now: i64, ns: &str, sa: &str) -> Value {
    json!({
        "iss": K8S_ISS, "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": ["sigil"], "iat": now, "nbf": now, "exp": now + 3600,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "5c1e"},
                          "pod": {"name": format!("{sa}-7d9f8"), "uid": "9a1b"}, "node": {"name": "n1"}}
    })
}

fn gh_claims(now: i64, repo: &str, git_ref: &str) -> Value {
    json!({
        "iss": GH_ISS, "sub": format!("repo:{repo}:ref:{git_ref}"), "aud": "sigil",
        "iat": now, "nbf": now, "exp": now + 300, "jti": "j1",
        "repository": repo, "repository_owner": repo.split('/').next().unwrap(),
        "ref": git_ref, "ref_type": "branch", "workflow": "deploy", "environment": "prod",
        "event_name": "push", "actor": "octocat"
    })
}

/// An issuer for tests: audience `sigil`, ES256, 30 s skew, 5 min cache, no key source yet.
fn oidc_issuer(name: &str, preset: OidcPreset, issuer: &str) -> OidcIssuer {
    OidcIssuer {
        name: name.into(),
        preset,
        issuer: issuer.into(),
        audiences: vec!["sigil".into()],
        jwks_file: None,
        jwks_url: None,
        ca_file: None,
        algorithms: vec!["ES256".into()],
        clock_skew: Duration::from_secs(30),
        jwks_cache: Duration::from_secs(300),
        jwks_min_refresh: Duration::from_secs(30),
    }
}

/// A JWKS over HTTPS on loopback, with a request counter; returns the CA (PEM) to trust.
async fn serve_jwks(
    dir: &Path,
    jwks: Arc<std::sync::Mutex<Value>>,
    hits: Arc<AtomicU64>,
) -> (String, std::path::PathBuf) {
    let (base, ca) = serve_https(dir, |_| {
        axum::Router::new().route(
            "/.well-known/jwks",
            axum::routing::get(move || {
                let jwks = jwks.clone();
                let hits = hits.clone();
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    axum::Json(jwks.lock().unwrap().clone())
                }
            }),
        )
    })
    .await;
    (format!("{base}/.well-known/jwks"), ca)
}

/// Serves `app(base_url)` over HTTPS on loopback; returns the base URL and the CA to trust.
async fn serve_https(
    dir: &Path,
    app: impl FnOnce(&str) -> axum::Router,
) -> (String, std::path::PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let ca = dir.join("jwks-ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    let app = app(&base);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    (base, ca)
}

struct World {
    b: TestBroker,
    clock: Arc<ManualClock>,
    k8s: RsaIssuerKey,
    gh: RsaIssuerKey,
    gh_jwks: Arc<std::sync::Mutex<Value>>,
    hits: Arc<AtomicU64>,
    ec: (EncodingKey, Value),
    _keys: tempfile::TempDir,
}

async fn world() -> World {
    let keys = tempfile::tempdir().unwrap();
    let k8s = rsa_key(keys.path(), "k8s-1");
    let gh = rsa_key(keys.path(), "gh-1");
    let ec = ec_key("ec-1");
    let k8s_jwks = keys.path().join("k8s-jwks.json");
    // The cluster's JWKS also carries a P-256 key, for the key/alg mismatch cases.
    std::fs::write(
        &k8s_jwks,
        json!({"keys": [k8s.jwk.clone(), ec.1.clone()]}).to_string(),
    )
    .unwrap();
    let gh_jwks = Arc::new(std::sync::Mutex::new(json!({"keys": [gh.jwk.clone()]})));
    let hits = Arc::new(AtomicU64::new(0));
    let (url, ca) = serve_jwks(keys.path(), gh_jwks.clone(), hits.clone()).await;
    // Behind real time, so the clock can be advanced and certificates still verify against
    // the SDK's real clock.
    let clock = Arc::new(ManualClock::new(
        SystemTime::now() - Duration::from_secs(120),
    ));
    let b = TestBroker::start_configured(clock.clone(), |c| {
        // Each refusal is its own audit entry here (these tests read them one by one).
        c.audit.aggregate_interval = Duration::ZERO;
        c.oidc = vec![
            OidcIssuer {
                jwks_file: Some(k8s_jwks.clone()),
                algorithms: vec!["RS256".into(), "ES256".into()],
                ..oidc_issuer("prod-cluster", OidcPreset::Kubernetes, K8S_ISS)
            },
            OidcIssuer {
                jwks_url: Some(url.clone()),
                ca_file: Some(ca.clone()),
                algorithms: vec!["RS256".into()],
                jwks_cache: Duration::from_secs(3600),
                // The preset supplies GitHub's issuer.
                ..oidc_issuer("github", OidcPreset::Github, "")
            },
        ];
    })
    .await;
    b.identity("k8s/payments/api", |r| {
        r.selectors = vec![
            format!("oidc:iss:{K8S_ISS}"),
            "k8s:ns:payments".into(),
            "k8s:sa:api".into(),
        ];
    })
    .await;
    b.identity("ci/deploy", |r| {
        r.selectors = vec![
            format!("oidc:iss:{GH_ISS}"),
            "github:repository:acme/payments".into(),
            "github:ref:refs/heads/main".into(),
        ];
    })
    .await;
    World {
        b,
        clock,
        k8s,
        gh,
        gh_jwks,
        hits,
        ec,
        _keys: keys,
    }
}

async fn attest(b: &TestBroker, token: String) -> Result<String, sigil_sdk::SdkError> {
    b.workload()
        .attest(Evidence::Oidc(token.into()), SvidOptions::default(), &[])
        .await
        .map(|c| c.svid.spiffe_id.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_and_github_tokens_attest_to_the_right_identities() {
    let w = world().await;
    let now = w.clock.unix();
    let k8s = |ns: &str, sa: &str| {
        sign(
            Algorithm::RS256,
            "k8s-1",
            &EncodingKey::from_rsa_der(&w.k8s.der),
            &k8s_claims(now, ns, sa),
        )
    };
    assert_eq!(
        attest(&w.b, k8s("payments", "api")).await.unwrap(),
        "spiffe://example.org/k8s/payments/api"
    );
    // Another service account in the namespace matches nothing.
    let e = attest(&w.b, k8s("payments", "batch")).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated));
    assert!(e.message().contains("matches no identity"), "{e}");
    assert!(e.message().contains("k8s:sa:batch"), "{e}");

    let gh = |repo: &str, r: &str| {
        sign(
            Algorithm::RS256,
            "gh-1",
            &EncodingKey::from_rsa_der(&w.gh.der),
            &gh_claims(now, repo, r),
        )
    };
    assert_eq!(
        attest(&w.b, gh("acme/payments", "refs/heads/main"))
            .await
            .unwrap(),
        "spiffe://example.org/ci/deploy"
    );
    let e = attest(&w.b, gh("acme/payments", "refs/heads/feature"))
        .await
        .unwrap_err();
    assert!(e.message().contains("matches no identity"), "{e}");

    // The audit log says how each attested, and never holds the token.
    let entries = w.b.audit_for("attest").await;
    let allowed: Vec<_> = entries
        .iter()
        .filter(|e| e["decision"] == "allow")
        .map(|e| (e["detail"]["method"].clone(), e["actor"].clone()))
        .collect();
    assert_eq!(
        allowed,
        vec![
            (
                json!("oidc"),
                json!("oidc:prod-cluster:system:serviceaccount:payments:api")
            ),
            (
                json!("oidc"),
                json!("oidc:github:repo:acme/payments:ref:refs/heads/main")
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_token_is_refused_with_a_clear_reason() {
    let w = world().await;
    let now = w.clock.unix();
    let rsa = EncodingKey::from_rsa_der(&w.k8s.der);
    let good = k8s_claims(now, "payments", "api");
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        edit(&mut c);
        c
    };
    let unsigned = |header: Value, claims: &Value| {
        format!(
            "{}.{}.",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        )
    };
    let hmac = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k8s-1".into());
        jsonwebtoken::encode(&h, &good, &EncodingKey::from_secret(b"shared secret")).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            sign(
                Algorithm::RS256,
                "k8s-1",
                &rsa,
                &with(&|c| {
                    c["exp"] = json!(now - 120);
                }),
            ),
            "the token expired at",
        ),
        (
            "not yet valid",
            sign(
                Algorithm::RS256,
                "k8s-1",
                &rsa,
                &with(&|c| {
                    c["nbf"] = json!(now + 600);
                }),
            ),
            "is not valid before",
        ),
        (
            "wrong audience",
            sign(
                Algorithm::RS256,
                "k8s-1",
                &rsa,
                &with(&|c| {
                    c["aud"] = json!(["vault"]);
                }),
            ),
            "is not one this broker accepts",
        ),
        (
            "unknown issuer",
            sign(
                Algorithm::RS256,
                "k8s-1",
                &rsa,
                &with(&|c| {
                    c["iss"] = json!("https://evil.example");
                }),
            ),
            "issuer \"https://evil.example\" is not trusted",
        ),
        (
            "alg none",
            unsigned(json!({"alg": "none", "kid": "k8s-1"}), &good),
            "alg \"none\" is refused",
        ),
        ("alg HS256", hmac, "HMAC tokens cannot prove a workload"),
        (
            "exp as a string",
            sign(
                Algorithm::RS256,
                "k8s-1",
                &rsa,
                &with(&|c| {
                    c["exp"] = json!((now + 3600).to_string());
                }),
            ),
            "exp must be a JSON number",
        ),
        (
            "nbf as a string",
            sign(
                Algorithm::RS256,
                "k8s-1",
                &rsa,
                &with(&|c| {
                    c["nbf"] = json!(now.to_string());
                }),
            ),
            "nbf must be a JSON number",
        ),
        (
            // The header says RS256 but names the cluster's EC key.
            "header alg does not fit the key",
            sign(Algorithm::RS256, "ec-1", &rsa, &good),
            "the key's type or curve does not fit it",
        ),
        (
            // An ES256-signed token is allowed for this issuer, but the key is RS256-only.
            "key for another algorithm",
            sign(Algorithm::ES256, "k8s-1", &w.ec.0, &good),
            "the key is for RS256",
        ),
        (
            "bad signature",
            {
                let t = sign(Algorithm::RS256, "k8s-1", &rsa, &good);
                let forged = sign(
                    Algorithm::RS256,
                    "k8s-1",
                    &rsa,
                    &with(&|c| c["kubernetes.io"]["namespace"] = json!("kube-system")),
                );
                // The forged payload with the genuine signature.
                let (h, rest) = forged.split_once('.').unwrap();
                let p = rest.split_once('.').unwrap().0;
                format!("{h}.{p}.{}", t.rsplit_once('.').unwrap().1)
            },
            "the signature does not verify",
        ),
        (
            "algorithm not allowed for the issuer",
            format!(
                "{}AAAA",
                unsigned(
                    json!({"alg": "PS256", "kid": "gh-1"}),
                    &gh_claims(now, "acme/payments", "refs/heads/main")
                )
            ),
            "alg \"PS256\" is not allowed for issuer github",
        ),
    ];
    let audit_before = w.b.audit().await.len();
    for (name, token, want) in &cases {
        let e = attest(&w.b, token.clone()).await.unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{name}: {e}");
        assert!(e.message().contains(want), "{name}: {e}");
        assert!(
            !e.message().contains(token.as_str()),
            "{name}: echoed the token"
        );
    }
    // Each refusal was audited (without the token), and nothing was issued.
    let after = w.b.audit().await;
    let new = &after[audit_before..];
    assert_eq!(new.len(), cases.len());
    assert!(new.iter().all(|e| e["decision"] == "deny"));
    let text = serde_json::to_string(new).unwrap();
    for (_, token, _) in &cases {
        assert!(!text.contains(token.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_refetches_the_jwks_at_most_once_per_interval() {
    let w = world().await;
    let now = w.clock.unix();
    let token = |kid: &str, key: &RsaIssuerKey| {
        sign(
            Algorithm::RS256,
            kid,
            &EncodingKey::from_rsa_der(&key.der),
            &gh_claims(w.clock.unix(), "acme/payments", "refs/heads/main"),
        )
    };
    attest(&w.b, token("gh-1", &w.gh)).await.unwrap();
    assert_eq!(
        w.hits.load(Ordering::SeqCst),
        1,
        "fetched once, then cached"
    );
    attest(&w.b, token("gh-1", &w.gh)).await.unwrap();
    assert_eq!(w.hits.load(Ordering::SeqCst), 1);

    // The issuer rotates to a new key. Within the refetch interval a token naming it fails
    // (junk kids cannot make the broker hammer the issuer) ...
    let dir = tempfile::tempdir().unwrap();
    let next = rsa_key(dir.path(), "gh-2");
    *w.gh_jwks.lock().unwrap() = json!({"keys": [w.gh.jwk.clone(), next.jwk.clone()]});
    for _ in 0..5 {
        let e = attest(&w.b, token("gh-2", &next)).await.unwrap_err();
        assert!(e.message().contains("has no key \"gh-2\""), "{e}");
    }
    assert_eq!(w.hits.load(Ordering::SeqCst), 1, "rate-limited");
    // ... and once the interval has passed, the unknown kid triggers one refetch.
    w.clock.advance(Duration::from_secs(31));
    attest(&w.b, token("gh-2", &next)).await.unwrap();
    assert_eq!(w.hits.load(Ordering::SeqCst), 2);
    assert!(w.clock.unix() > now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_with_a_projected_token_file_reattests_on_its_own_after_revocation() {
    let w = world().await;
    let token_file = w.b.dir.path().join("sigil-token");
    let write_token = |now: i64| {
        let t = sign(
            Algorithm::RS256,
            "k8s-1",
            &EncodingKey::from_rsa_der(&w.k8s.der),
            &k8s_claims(now, "payments", "api"),
        );
        std::fs::write(&token_file, t).unwrap();
    };
    write_token(w.clock.unix());
    let source = sigil_sdk::Source::start(
        w.b.workload(),
        Arc::new(sigil_sdk::OidcTokenFile::new(&token_file)),
        sigil_sdk::SourceConfig {
            min_interval: Duration::from_millis(100),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..sigil_sdk::SourceConfig::default()
        },
    )
    .await
    .unwrap();
    let first = source.x509_svid().unwrap();
    assert_eq!(
        first.spiffe_id.to_string(),
        "spiffe://example.org/k8s/payments/api"
    );
    let mut events = source.events();
    w.b.admin()
        .revoke_identity(sigil_proto::v1::RevokeIdentityRequest {
            id_or_spiffe_id: "spiffe://example.org/k8s/payments/api".into(),
            reason: "node compromised".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The kubelet keeps the token fresh; the SDK presents it again without anyone's help.
    sigil_tests::next_event(&mut events, Duration::from_secs(10), |e| {
        matches!(e, sigil_sdk::SourceEvent::Reattested { .. })
    })
    .await;
    let second = source.x509_svid().unwrap();
    assert_ne!(second.serial, first.serial);
    assert!(second.generation > first.generation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_found_by_openid_discovery_and_a_document_for_another_issuer_is_refused() {
    let keys = tempfile::tempdir().unwrap();
    let (key, jwk) = ec_key("idp-1");
    let jwks = json!({ "keys": [jwk] });
    let (base, ca) = serve_https(keys.path(), |base| {
        let doc = |issuer: String, jwks_uri: String| {
            axum::routing::get(move || {
                let d = json!({"issuer": issuer, "jwks_uri": jwks_uri,
                               "id_token_signing_alg_values_supported": ["ES256"]});
                async move { axum::Json(d) }
            })
        };
        axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                doc(base.to_owned(), format!("{base}/keys")),
            )
            // A document at the right place that names another issuer.
            .route(
                "/liar/.well-known/openid-configuration",
                doc(format!("{base}/other"), format!("{base}/keys")),
            )
            .route(
                "/keys",
                axum::routing::get(move || {
                    let j = jwks.clone();
                    async move { axum::Json(j) }
                }),
            )
    })
    .await;
    let liar = format!("{base}/liar");
    // Neither jwks_file nor jwks_url: the keys are to be discovered.
    let issuer = |name: &str, iss: &str| OidcIssuer {
        ca_file: Some(ca.clone()),
        ..oidc_issuer(name, OidcPreset::Generic, iss)
    };
    let issuers = vec![issuer("idp", &base), issuer("liar", &liar)];
    let b = TestBroker::start_configured(Arc::new(SystemClock), move |c| c.oidc = issuers).await;
    for iss in [&base, &liar] {
        b.identity(&format!("idp/{}", iss.len()), |r| {
            r.selectors = vec![format!("oidc:iss:{iss}"), "oidc:sub:batch-7".into()];
        })
        .await;
    }
    let token = |iss: &str| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        sign(
            Algorithm::ES256,
            "idp-1",
            &key,
            &json!({"iss": iss, "sub": "batch-7", "aud": "sigil", "iat": now, "exp": now + 300}),
        )
    };
    assert_eq!(
        attest(&b, token(&base)).await.unwrap(),
        format!("spiffe://example.org/idp/{}", base.len())
    );
    let e = attest(&b, token(&liar)).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{e}");
    assert!(
        e.message().contains(&format!(
            "the discovery document is for issuer \"{base}/other\", not \"{liar}\""
        )),
        "{e}"
    );

    // An issuer that is not https:// cannot be discovered: refused at start.
    let cfg = sigil_broker::config::Config {
        oidc: vec![issuer("plain", "http://idp.example")],
        ..Default::default()
    };
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("keys can only be discovered from an https:// issuer"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_ci_token_attests_only_from_a_protected_ref_of_its_project() {
    const GL_ISS: &str = "https://gitlab.example.com";
    let keys = tempfile::tempdir().unwrap();
    let (key, jwk) = ec_key("gl-1");
    let jwks = keys.path().join("gitlab-jwks.json");
    std::fs::write(&jwks, json!({ "keys": [jwk] }).to_string()).unwrap();
    let b = TestBroker::start_configured(Arc::new(SystemClock), move |c| {
        c.oidc = vec![OidcIssuer {
            audiences: vec!["https://sigil.example.org".into()],
            jwks_file: Some(jwks),
            // A self-managed instance: the preset's default is gitlab.com.
            ..oidc_issuer("gitlab", OidcPreset::Gitlab, GL_ISS)
        }];
    })
    .await;
    b.identity("ci/gitlab-deploy", |r| {
        r.selectors = vec![
            format!("oidc:iss:{GL_ISS}"),
            "gitlab:project_path:acme/payments".into(),
            "gitlab:ref_protected:true".into(),
            "gitlab:environment:production".into(),
        ];
    })
    .await;
    // The claims of a GitLab CI/CD ID token (`id_tokens:` in .gitlab-ci.yml); GitLab sends
    // booleans such as ref_protected as strings.
    let token = |git_ref: &str, protected: &str| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        sign(
            Algorithm::ES256,
            "gl-1",
            &key,
            &json!({
                "iss": GL_ISS, "aud": "https://sigil.example.org", "iat": now, "nbf": now,
                "exp": now + 300,
                "sub": format!("project_path:acme/payments:ref_type:branch:ref:{git_ref}"),
                "namespace_id": "7", "namespace_path": "acme", "project_id": "42",
                "project_path": "acme/payments", "user_id": "3", "user_login": "alice",
                "pipeline_id": "1001", "pipeline_source": "push", "job_id": "2002",
                "ref": git_ref, "ref_type": "branch", "ref_protected": protected,
                "environment": "production", "environment_protected": "true",
            }),
        )
    };
    assert_eq!(
        attest(&b, token("main", "true")).await.unwrap(),
        "spiffe://example.org/ci/gitlab-deploy"
    );
    let e = attest(&b, token("feature-x", "false")).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{e}");
    assert!(e.message().contains("matches no identity"), "{e}");
    assert!(e.message().contains("gitlab:ref_protected:false"), "{e}");
}
