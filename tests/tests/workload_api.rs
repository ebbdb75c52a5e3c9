//! The Unix socket: Unix attestation by uid and binary, and the SPIFFE Workload API driven by
//! the SPIFFE project's own Rust client (the `spiffe` crate), unmodified.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sigil_broker::clock::SystemClock;
use sigil_proto::v1 as pb;
use sigil_sdk::{ClientConfig, Evidence, SvidOptions, WorkloadClient};
use sigil_tests::TestBroker;
use tokio_stream::StreamExt as _;

const PROBE: &str = env!("CARGO_BIN_EXE_unix-probe");
const EXEC_ATTACK: &str = env!("CARGO_BIN_EXE_exec-attack");

fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

fn sha256_of(path: &Path) -> String {
    sigil_broker::attest::unix::file_sha256(path).unwrap()
}

struct World {
    b: TestBroker,
    socket: PathBuf,
    bundle_file: PathBuf,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    world_on(Arc::new(SystemClock)).await
}

async fn world_on(clock: Arc<dyn sigil_broker::clock::Clock>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let s = socket.clone();
    let b = TestBroker::start_configured(clock, move |c| {
        c.workload_socket = Some(s);
        c.workload_socket_mode = 0o660;
    })
    .await;
    let bundle_file = dir.path().join("bundle.pem");
    std::fs::write(&bundle_file, &b.bundle_pem).unwrap();
    World {
        b,
        socket,
        bundle_file,
        _dir: dir,
    }
}

fn unix_client(w: &World) -> WorkloadClient {
    WorkloadClient::new(ClientConfig::new(
        format!("unix://{}", w.socket.display()),
        w.b.bundle_pem.clone(),
    ))
    .unwrap()
}

/// A client on the Unix socket reading `clock`.
fn unix_client_on(w: &World, clock: &sigil_tests::SharedClock) -> WorkloadClient {
    WorkloadClient::new(
        ClientConfig::new(
            format!("unix://{}", w.socket.display()),
            w.b.bundle_pem.clone(),
        )
        .with_clock(clock.0.clone()),
    )
    .unwrap()
}

async fn attest_here(w: &World, spiffe_id: Option<&str>) -> Result<String, sigil_sdk::SdkError> {
    unix_client(w)
        .attest(
            Evidence::Unix,
            SvidOptions {
                spiffe_id: spiffe_id.map(str::to_owned),
                ..Default::default()
            },
            &[],
        )
        .await
        .map(|c| c.svid.spiffe_id.to_string())
}

fn probe(w: &World, spiffe_id: Option<&str>) -> (bool, String) {
    let mut cmd = std::process::Command::new(PROBE);
    cmd.arg(&w.socket).arg(&w.bundle_file);
    if let Some(s) = spiffe_id {
        cmd.arg(s);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_attest_by_uid_and_binary_hash_and_another_binary_does_not() {
    let w = world().await;
    let uid = my_uid();
    let mode = std::fs::metadata(&w.socket).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o660, "the socket has the configured permissions");
    let me = std::env::current_exe().unwrap();
    w.b.identity("local/probe", |r| {
        r.selectors = vec![
            format!("unix:uid:{uid}"),
            format!("unix:sha256:{}", sha256_of(Path::new(PROBE))),
        ];
    })
    .await;
    w.b.identity("local/tests", |r| {
        r.selectors = vec![
            format!("unix:uid:{uid}"),
            format!("unix:path:{}", me.display()),
        ];
    })
    .await;

    // The probe binary gets the identity pinned to its hash...
    let (ok, out) = probe(&w, None);
    assert!(ok, "{out}");
    assert_eq!(out, "spiffe://example.org/local/probe");
    // ...and this test binary, same uid, gets its own, never the probe's.
    assert_eq!(
        attest_here(&w, None).await.unwrap(),
        "spiffe://example.org/local/tests"
    );
    let e = attest_here(&w, Some("spiffe://example.org/local/probe"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated));
    assert!(
        e.message()
            .contains("does not match identity spiffe://example.org/local/probe"),
        "{e}"
    );

    // By uid alone: both binaries match, and must say which identity they want.
    w.b.identity("local/any", |r| {
        r.selectors = vec![format!("unix:uid:{uid}")]
    })
    .await;
    let e = attest_here(&w, None).await.unwrap_err();
    assert!(e.message().contains("matches several identities"), "{e}");
    assert_eq!(
        attest_here(&w, Some("spiffe://example.org/local/any"))
            .await
            .unwrap(),
        "spiffe://example.org/local/any"
    );
    let (ok, out) = probe(&w, Some("spiffe://example.org/local/any"));
    assert!(ok, "{out}");
    assert_eq!(out, "spiffe://example.org/local/any");

    // Unix evidence means nothing over TCP.
    let e =
        w.b.workload()
            .attest(Evidence::Unix, SvidOptions::default(), &[])
            .await
            .unwrap_err();
    assert!(
        e.message().contains("only on the broker's Unix socket"),
        "{e}"
    );

    // The audit log names the process.
    let probe_entry =
        w.b.audit_for("attest")
            .await
            .into_iter()
            .find(|e| {
                e["decision"] == "allow"
                    && e["detail"]["spiffe_id"] == "spiffe://example.org/local/probe"
            })
            .unwrap();
    let actor = probe_entry["actor"].as_str().unwrap();
    assert!(
        actor.starts_with(&format!("unix:uid={uid},pid=")) && actor.ends_with(PROBE),
        "{actor}"
    );
}

/// A gRPC channel over the Unix socket at `socket`.
async fn unix_channel(socket: &Path) -> tonic::transport::Channel {
    let path = socket.to_owned();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// A request carrying the Workload API's security header.
fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// Connect, fork, exec: the process the kernel names as the peer runs a program pinned by
/// hash, while the attacker, a child that inherited the connection, drives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_attested_as_the_program_that_opened_it_not_one_it_execs_later() {
    let w = world().await;
    let uid = my_uid();
    w.b.identity("local/probe", |r| {
        r.selectors = vec![
            format!("unix:uid:{uid}"),
            format!("unix:sha256:{}", sha256_of(Path::new(PROBE))),
        ];
    })
    .await;
    // The pinned program, run normally, gets its identity.
    let (ok, out) = probe(&w, None);
    assert!(ok, "{out}");
    assert_eq!(out, "spiffe://example.org/local/probe");

    let proxy = w._dir.path().join("attacker.sock");
    let mut attacker = std::process::Command::new(EXEC_ATTACK)
        .arg(&w.socket)
        .arg(&proxy)
        .arg(PROBE)
        .args(["--sleep", "60"])
        .spawn()
        .unwrap();
    for _ in 0..1000 {
        if proxy.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(proxy.exists(), "the attacker's relay is listening");
    // The pid the broker knows now runs the pinned program...
    let exe = std::fs::read_link(format!("/proc/{}/exe", attacker.id())).unwrap();
    assert_eq!(exe, Path::new(PROBE));
    // ...but the caller is the attacker: every call is refused, and says why.
    let ch = unix_channel(&proxy).await;
    let mut spiffe =
        sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch.clone());
    let e = spiffe
        .fetch_jwtsvid(with_header(sigil_proto::workload::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("replaced its program"), "{e:?}");
    let e = match spiffe
        .fetch_x509svid(with_header(sigil_proto::workload::X509svidRequest {}))
        .await
    {
        Ok(mut s) => s.get_mut().message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let key = sigil_pki::EcKey::generate().unwrap();
    let e = sigil_proto::v1::broker_client::BrokerClient::new(ch)
        .attest(pb::AttestRequest {
            evidence: Some(pb::Evidence {
                kind: Some(pb::evidence::Kind::Unix(pb::UnixEvidence {})),
            }),
            csr: sigil_pki::csr::request_for(&key).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("replaced its program"), "{e:?}");
    let _ = attacker.kill();
    let _ = attacker.wait();
    // Nothing was minted for the probe's identity but the probe's own certificate.
    let minted: Vec<_> =
        w.b.audit_for("attest")
            .await
            .into_iter()
            .filter(|e| e["decision"] == "allow")
            .collect();
    assert_eq!(minted.len(), 1, "{minted:?}");
}

/// The generated Workload API client over the socket, without the spec's security header.
async fn raw_workload_client(
    socket: &Path,
) -> sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
    tonic::transport::Channel,
> {
    let path = socket.to_owned();
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_fetches_svids_and_bundles_and_sees_rotation_on_its_stream() {
    // Behind real time, so it can be advanced while certificates stay valid for real clocks.
    let clock = Arc::new(sigil_broker::clock::ManualClock::new(
        std::time::SystemTime::now() - Duration::from_secs(4 * 3600),
    ));
    let w = world_on(clock.clone()).await;
    let uid = my_uid();
    let me = std::env::current_exe().unwrap();
    w.b.identity("local/app", |r| {
        r.selectors = vec![
            format!("unix:uid:{uid}"),
            format!("unix:path:{}", me.display()),
        ];
        r.labels.insert("hint".into(), "internal".into());
    })
    .await;
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", w.socket.display()))
        .await
        .unwrap();

    // X.509-SVID: ours, with a private key that belongs to the leaf, and the SAN DNS names.
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/local/app"
    );
    assert_eq!(svid.hint(), Some("internal"));
    let key = sigil_pki::EcKey::from_pkcs8(svid.private_key().as_bytes()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_point()
    );
    // Bundles: the broker's root.
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let ours = bundles.get(&td).unwrap();
    let roots = sigil_pki::certs_from_pem(&w.b.bundle_pem).unwrap();
    assert_eq!(ours.authorities().len(), roots.len());
    assert_eq!(ours.authorities()[0].as_bytes(), roots[0].as_ref());

    // JWT-SVID, validated by the broker through the same API; JWT bundle has its key.
    let jwt = client.fetch_jwt_svid(["db"], None).await.unwrap();
    assert_eq!(
        jwt.spiffe_id().to_string(),
        "spiffe://example.org/local/app"
    );
    assert_eq!(jwt.audience(), ["db".to_string()]);
    let checked = client.validate_jwt_token("db", jwt.token()).await.unwrap();
    assert_eq!(checked.spiffe_id(), jwt.spiffe_id());
    let wrong = client.validate_jwt_token("prod-db", jwt.token()).await;
    assert!(wrong.is_err(), "a token for db is not valid for prod-db");
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(
        jwt_bundles
            .get(&td)
            .unwrap()
            .find_jwt_authority(jwt.key_id())
            .is_some()
    );
    // ...in SPIFFE bundle format (`use` = `jwt-svid`), the same key as the SPIFFE bundle
    // endpoint's and the OIDC JWKS's for that kid.
    let mut raw = raw_workload_client(&w.socket).await;
    let mut s = raw
        .fetch_jwt_bundles(with_header(sigil_proto::workload::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let doc = s.message().await.unwrap().unwrap().bundles["spiffe://example.org"].clone();
    let api: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    let (_, spiffe_doc) = w.b.http_get("/bundle").await;
    let (_, oidc_doc) = w.b.http_get("/keys").await;
    let spiffe_doc: serde_json::Value = serde_json::from_str(&spiffe_doc).unwrap();
    let oidc_doc: serde_json::Value = serde_json::from_str(&oidc_doc).unwrap();
    let by_kid = |d: &serde_json::Value, kid: &str| {
        d["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid)
            .cloned()
            .unwrap_or_else(|| panic!("no key {kid} in {d}"))
    };
    let keys = api["keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        assert_eq!(k["use"], "jwt-svid", "{k}");
        let kid = k["kid"].as_str().unwrap();
        assert_eq!(
            &by_kid(&spiffe_doc, kid),
            k,
            "the SPIFFE bundle endpoint agrees"
        );
        let o = by_kid(&oidc_doc, kid);
        assert_eq!(o["use"], "sig");
        for m in ["kty", "crv", "x", "y"] {
            assert_eq!(o[m], k[m], "{kid} {m}");
        }
    }
    // Not entitled: gate 2 refuses, and the caller hears PermissionDenied.
    let refused = client.fetch_jwt_svid(["prod-db"], None).await;
    assert!(refused.is_err());

    // The stream: the first SVID at once, a new one half-way through its life (SVID
    // rotation), and another at once when the identity's credentials are revoked.
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let serial = |s: &spiffe::X509Svid| {
        let (_, c) = x509_parser::parse_x509_certificate(s.leaf().as_bytes()).unwrap();
        (c.raw_serial().to_vec(), c.issuer().to_string())
    };
    clock.advance(Duration::from_secs(20 * 60));
    let quiet = tokio::time::timeout(Duration::from_millis(1500), stream.next()).await;
    assert!(quiet.is_err(), "nothing new before half-life");
    clock.advance(Duration::from_secs(11 * 60));
    let rotated = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a renewed SVID at half-life")
        .unwrap()
        .unwrap();
    assert_ne!(serial(&rotated).0, serial(&first).0);

    // The signing CA rotates; the next SVID the stream carries (pushed at once on
    // revocation) is signed by the new intermediate.
    let mut admin = w.b.admin();
    admin
        .rotate(pb::RotateRequest {
            kind: "x509".into(),
            now: true,
        })
        .await
        .unwrap();
    admin
        .revoke_identity(pb::RevokeIdentityRequest {
            id_or_spiffe_id: "spiffe://example.org/local/app".into(),
            reason: "rotate everything".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let after_revoke = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let s = stream.next().await.unwrap().unwrap();
            if serial(&s).1 != serial(&rotated).1 {
                return s;
            }
        }
    })
    .await
    .expect("a new SVID from the new intermediate after revocation");
    assert_ne!(serial(&after_revoke).0, serial(&rotated).0);

    // Without the security header: InvalidArgument, per the specification.
    let mut raw = raw_workload_client(&w.socket).await;
    let e = raw
        .fetch_jwtsvid(sigil_proto::workload::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("workload.spiffe.io"), "{e}");
    // The header exactly as the specification says: one value, `true`, case-sensitive — on
    // every one of the five calls, refused before any attestation work.
    for values in [
        vec!["TRUE"],
        vec!["True"],
        vec!["1"],
        vec![" true"],
        vec!["true "],
        vec!["true", "true"],
        vec!["true", "false"],
        vec!["false", "true"],
    ] {
        fn req<T>(msg: T, values: &[&str]) -> tonic::Request<T> {
            let mut r = tonic::Request::new(msg);
            for v in values {
                r.metadata_mut()
                    .append("workload.spiffe.io", v.parse().unwrap());
            }
            r
        }
        let jwt = sigil_proto::workload::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        };
        let mut codes = vec![
            raw.fetch_jwtsvid(req(jwt, &values)).await.map(|_| ()),
            raw.validate_jwtsvid(req(
                sigil_proto::workload::ValidateJwtsvidRequest {
                    audience: "db".into(),
                    svid: "x.y.z".into(),
                },
                &values,
            ))
            .await
            .map(|_| ()),
            raw.fetch_x509svid(req(sigil_proto::workload::X509svidRequest {}, &values))
                .await
                .map(|_| ()),
            raw.fetch_x509_bundles(req(sigil_proto::workload::X509BundlesRequest {}, &values))
                .await
                .map(|_| ()),
            raw.fetch_jwt_bundles(req(sigil_proto::workload::JwtBundlesRequest {}, &values))
                .await
                .map(|_| ()),
        ]
        .into_iter()
        .map(|r| r.unwrap_err());
        assert!(
            codes.all(|e| e.code() == tonic::Code::InvalidArgument
                && e.message().contains("workload.spiffe.io")),
            "{values:?} must be refused on every call"
        );
    }

    // A process that matches no identity: PermissionDenied.
    admin
        .update_identity(pb::UpdateIdentityRequest {
            id_or_spiffe_id: "spiffe://example.org/local/app".into(),
            set_selectors: true,
            selectors: vec!["unix:uid:4294967".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut req = tonic::Request::new(sigil_proto::workload::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let e = raw.fetch_x509svid(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("no identity issued"), "{e}");
}

/// A Python virtualenv with py-spiffe from PyPI, made once per target dir; `None` (the test
/// says why and passes) when there is no Python or PyPI cannot be reached.
fn py_spiffe() -> Option<PathBuf> {
    sigil_tests::python::venv(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "py-spiffe-venv",
        &["spiffe==0.3.2"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_from_pypi_works_unmodified_when_python_is_present() {
    let Some(python) = tokio::task::spawn_blocking(py_spiffe).await.unwrap() else {
        // python::venv has said why (or failed, in CI).
        return;
    };
    let w = world().await;
    w.b.identity("local/python", |r| {
        r.selectors = vec![
            format!("unix:uid:{}", my_uid()),
            format!(
                "unix:path:{}",
                std::fs::canonicalize(&python).unwrap().display()
            ),
        ];
    })
    .await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/py_spiffe_check.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(format!("unix://{}", w.socket.display()))
        .arg("db")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "x509_spiffe_id": "spiffe://example.org/local/python",
            "chain_len": 2,
            "x509_authorities": 1,
            "jwt_spiffe_id": "spiffe://example.org/local/python",
            "jwt_audience": ["db"],
            "validated_spiffe_id": "spiffe://example.org/local/python",
            "jwt_authorities": 1,
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_source_on_the_unix_socket_renews_and_reattests_by_itself() {
    // The broker and the SDK share a clock the test moves.
    let clock = sigil_tests::SharedClock::starting_now();
    let w = world_on(Arc::new(clock.clone())).await;
    let me = std::env::current_exe().unwrap();
    w.b.identity("local/svc", |r| {
        r.selectors = vec![
            format!("unix:uid:{}", my_uid()),
            format!("unix:path:{}", me.display()),
        ];
        let e = r.entitlements.as_mut().unwrap();
        e.max_ttl_seconds = 4;
        e.audiences = vec!["svc".into()];
    })
    .await;
    let source = sigil_sdk::Source::start(
        unix_client_on(&w, &clock),
        Arc::new(sigil_sdk::UnixEvidence),
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
        "spiffe://example.org/local/svc"
    );
    let jwt = source
        .jwt_svid(&sigil_sdk::JwtRequest::audience("svc"))
        .await
        .unwrap();
    source
        .verifier()
        .verify_jwt(jwt.token.expose_secret(), "svc")
        .unwrap();

    // A 4 s certificate is replaced at half its life (±10%), with no one's help. Issuance
    // was at `expires_at - 4` in whole seconds: nothing is due 1.5 s past that (taking the
    // backdated notBefore as the start would renew within ~100 ms), and the renewal comes
    // once the clock passes 2.2 s.
    let mut events = source.events();
    let issued = (first.expires_at - 4) as f64;
    clock.advance_to_unix(issued + 1.5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        source.x509_svid().unwrap().serial,
        first.serial,
        "renewed at about half of its 4 s life, not at once"
    );
    clock.advance_to_unix(issued + 2.3);
    tokio::time::timeout(Duration::from_secs(10), async {
        while source.x509_svid().unwrap().serial == first.serial {
            let _ = events.recv().await;
        }
    })
    .await
    .expect("renewed over the Unix socket");
    let second = source.x509_svid().unwrap();
    assert_eq!(second.generation, first.generation);

    // Revoked: the kernel's word about the process is evidence that never runs out.
    w.b.admin()
        .revoke_identity(pb::RevokeIdentityRequest {
            id_or_spiffe_id: "spiffe://example.org/local/svc".into(),
            reason: "host rebuilt".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    sigil_tests::next_event(&mut events, Duration::from_secs(10), |e| {
        matches!(e, sigil_sdk::SourceEvent::Reattested { .. })
    })
    .await;
    let third = source.x509_svid().unwrap();
    assert!(third.generation > first.generation);
    // The JWT-SVID of the old generation is dead; the Source hands out a new one.
    let verifier = source.verifier();
    assert!(
        verifier
            .verify_jwt(jwt.token.expose_secret(), "svc")
            .is_err()
    );
    let fresh = source
        .jwt_svid(&sigil_sdk::JwtRequest::audience("svc"))
        .await
        .unwrap();
    let (_, claims) = sigil_pki::jwt::peek_unverified(fresh.token.expose_secret()).unwrap();
    assert_eq!(claims["sigil_gen"], third.generation);
    verifier
        .verify_jwt(fresh.token.expose_secret(), "svc")
        .unwrap();
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_unix_socket_a_process_matching_two_identities_acts_as_the_one_it_attested_as() {
    let w = world().await;
    for name in ["local/reader", "local/writer"] {
        w.b.identity(name, |r| {
            r.selectors = vec![format!("unix:uid:{}", my_uid())];
            r.entitlements.as_mut().unwrap().audiences = vec!["svc".into()];
        })
        .await;
    }
    let writer = "spiffe://example.org/local/writer";
    let client = unix_client(&w);
    client
        .attest(
            Evidence::Unix,
            SvidOptions {
                spiffe_id: Some(writer.into()),
                ..Default::default()
            },
            &[],
        )
        .await
        .unwrap();
    // Every later call is attested afresh by the kernel; the client says which identity.
    let jwt = client
        .fetch_jwt_svid(&sigil_sdk::JwtRequest::audience("svc"))
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id.as_str(), writer);
    let renewed = client.renew_x509_svid().await.unwrap();
    assert_eq!(renewed.spiffe_id.as_str(), writer);

    // Without that, the broker cannot choose and says so.
    let mut raw = pb::broker_client::BrokerClient::new(
        tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector({
                let path = w.socket.clone();
                tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                })
            })
            .await
            .unwrap(),
    );
    let e = raw
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            request: Some(pb::JwtRequest {
                audiences: vec!["svc".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("local/reader") && e.message().contains("local/writer"),
        "{e:?}"
    );
}

/// ValidateJWTSVID accepts exactly one encoding of a token: the one the broker signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_jwtsvid_refuses_extra_headers_repeated_members_and_high_s_twins() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let w = world().await;
    let me = std::env::current_exe().unwrap();
    w.b.identity("local/tests", |r| {
        r.selectors = vec![
            format!("unix:uid:{}", my_uid()),
            format!("unix:path:{}", me.display()),
        ];
    })
    .await;
    let mut raw = raw_workload_client(&w.socket).await;
    let token = raw
        .fetch_jwtsvid(with_header(sigil_proto::workload::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    let mut validate = async |svid: String| {
        raw.validate_jwtsvid(with_header(sigil_proto::workload::ValidateJwtsvidRequest {
            audience: "db".into(),
            svid,
        }))
        .await
    };
    assert!(validate(token.clone()).await.is_ok(), "the genuine token");

    // The high-S twin: valid ECDSA over the same bytes, refused.
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let mut sig = B64.decode(sig).unwrap();
    let twin = sigil_pki::key::negate_mod_n(&sig[32..]);
    sig[32..].copy_from_slice(&twin);
    let e = validate(format!("{signed}.{}", B64.encode(&sig)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("canonical (low-S)"), "{e:?}");

    // Tokens signed with the broker's own current key, but not as the broker signs them.
    let ring = w.b.broker().keys().current();
    let key = ring.jwt.key();
    let (_, payload) = sigil_pki::jwt::peek_unverified(&token).unwrap();
    let sign = |header: String, payload: String| {
        let mut t = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let s = key.sign_es256(t.as_bytes()).unwrap();
        t.push('.');
        t.push_str(&B64.encode(s));
        t
    };
    let body = serde_json::Value::Object(payload.clone()).to_string();
    let plain = sign(
        format!(r#"{{"alg":"ES256","kid":"{}","typ":"JWT"}}"#, key.kid()),
        body.clone(),
    );
    assert!(validate(plain).await.is_ok(), "the same claims, re-signed");
    let e = validate(sign(
        format!(
            r#"{{"alg":"ES256","kid":"{}","typ":"JWT","jku":"https://attacker.example/keys"}}"#,
            key.kid()
        ),
        body.clone(),
    ))
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("\"jku\" is not allowed"), "{e:?}");
    let sub = payload["sub"].as_str().unwrap();
    let doubled = body.replacen(
        &format!(r#""sub":"{sub}""#),
        &format!(r#""sub":"{sub}","sub":"spiffe://example.org/admin""#),
        1,
    );
    assert_ne!(doubled, body);
    let e = validate(sign(
        format!(r#"{{"alg":"ES256","kid":"{}","typ":"JWT"}}"#, key.kid()),
        doubled,
    ))
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("\"sub\" more than once"), "{e:?}");
}
