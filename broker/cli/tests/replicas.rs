//! Several real `sigil serve` processes on one private PostgreSQL server (started here):
//! one registry, one revocation feed and one use per join token across replicas; kill -9 of a
//! replica under load; PostgreSQL restarted under load; a replica cut from the database and
//! healed; and `sigil migrate` of an embedded store with 100,000 ledger rows.
//!
//! They skip loudly where PostgreSQL is not installed, and fail instead under
//! SIGIL_TEST_REQUIRE_ALL (as in CI, which installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sigil_proto::v1 as pb;
use sigil_sdk::{
    ClientConfig, Evidence, JwtRequest, Source, SourceConfig, SourceEvent, SvidOptions,
    WorkloadClient,
};
use sigil_store::local::LocalPostgres;

mod common;
use common::*;

/// A private PostgreSQL with a store made by `sigil init --store`, and the data dir `init`
/// wrote (config, master key, operator credential, bundle), which replicas copy.
struct Cluster {
    pg: LocalPostgres,
    db_url: String,
    tmp: tempfile::TempDir,
    seed: PathBuf,
}

fn cluster(test: &str) -> Option<Cluster> {
    cluster_with(test, &[])
}

/// [`cluster`], with more flags for `sigil init`.
fn cluster_with(test: &str, more: &[&str]) -> Option<Cluster> {
    let pg = match LocalPostgres::start() {
        Ok(pg) => pg,
        Err(e) => {
            assert!(
                std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
                "{test} needs PostgreSQL, and SIGIL_TEST_REQUIRE_ALL is set: {e}"
            );
            eprintln!("\n!!! SKIPPED {test}: {e} !!!\n");
            return None;
        }
    };
    pg.create_database("sigil").unwrap();
    let db_url = pg.url("sigil");
    let tmp = tempfile::tempdir().unwrap();
    let seed = tmp.path().join("seed");
    init_with(
        tmp.path(),
        &seed,
        true,
        &[&["--store", &db_url], more].concat(),
    );
    set_config(&seed, "limits", "authenticated_per_second", "0");
    // A second init on the same database refuses, and changes nothing.
    let again = sigil(
        &[
            "init",
            "--data-dir",
            tmp.path().join("again").to_str().unwrap(),
            "--trust-domain",
            "example.org",
            "--store",
            &db_url,
        ],
        tmp.path(),
    );
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds a Sigil store"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    Some(Cluster {
        pg,
        db_url,
        tmp,
        seed,
    })
}

impl Cluster {
    /// A replica's data dir: the config, master key, operator credential and bundle, as a
    /// deployment hands them to every replica.
    fn replica_dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for f in ["sigil.toml", "master.key", "bundle.pem"] {
            std::fs::copy(self.seed.join(f), d.join(f)).unwrap();
        }
        let ok = std::process::Command::new("cp")
            .args(["-a"])
            .arg(self.seed.join("admin"))
            .arg(&d)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        d
    }

    /// `sigil serve` on `dir` (its store: the config's, or `store` when given).
    fn serve(&self, dir: &Path, store: Option<&str>) -> (Proc, String, SocketAddr) {
        match store {
            Some(s) => self.serve_with(dir, &["--store", s]),
            None => self.serve_with(dir, &[]),
        }
    }

    /// `sigil serve` on `dir` with more flags.
    fn serve_with(&self, dir: &Path, more: &[&str]) -> (Proc, String, SocketAddr) {
        let mut args = vec!["serve", "--data-dir", dir.to_str().unwrap()];
        args.extend_from_slice(more);
        let p = Proc::spawn(&args, self.tmp.path(), &[]);
        let mut url = String::new();
        let mut http = None;
        while url.is_empty() || http.is_none() {
            let l = p.wait_for(" listening on ");
            if let Some(u) = l.strip_prefix("sigil broker listening on ") {
                url = u.to_owned();
            }
            if let Some(h) = l.strip_prefix("sigil http listening on https://") {
                http = Some(h.parse().unwrap());
            }
        }
        (p, url, http.unwrap())
    }

    fn bundle(&self) -> Vec<u8> {
        std::fs::read(self.seed.join("bundle.pem")).unwrap()
    }
}

async fn ready(http: SocketAddr, bundle: &[u8]) -> u16 {
    https_get(http, "/readyz", bundle)
        .await
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

async fn wait_ready(
    http: SocketAddr,
    bundle: &[u8],
    want: u16,
    within: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    while ready(http, bundle).await != want {
        assert!(
            started.elapsed() < within,
            "{what}: /readyz {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Whether the replica whose HTTP listener is `http` runs the schedules, from its /metrics.
async fn leads(http: SocketAddr, bundle: &[u8]) -> bool {
    https_get(http, "/metrics", bundle)
        .await
        .lines()
        .any(|l| l.trim() == "sigil_schedule_leader 1")
}

/// The key ids in a replica's /keys (JWKS).
async fn kids(http: SocketAddr, bundle: &[u8]) -> std::collections::BTreeSet<String> {
    let resp = https_get(http, "/keys", bundle).await;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/keys is JSON ({e}): {resp}"));
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

async fn create_identity(
    adm: &mut pb::admin_client::AdminClient<sigil_sdk::Failover>,
    path: &str,
    ttl: u32,
) {
    adm.create_identity(pb::CreateIdentityRequest {
        spiffe_id: format!("spiffe://example.org/{path}"),
        owner: "team".into(),
        purpose: "replica test".into(),
        entitlements: Some(pb::Entitlements {
            kinds: vec!["x509".into(), "jwt".into()],
            max_ttl_seconds: ttl,
            audiences: vec!["db".into()],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn join_token(
    adm: &mut pb::admin_client::AdminClient<sigil_sdk::Failover>,
    path: &str,
) -> String {
    adm.create_join_token(pb::CreateJoinTokenRequest {
        id_or_spiffe_id: format!("spiffe://example.org/{path}"),
        ttl_seconds: 0,
    })
    .await
    .unwrap()
    .into_inner()
    .token
}

fn quick() -> SourceConfig {
    SourceConfig {
        min_interval: Duration::from_millis(200),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        ..SourceConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_registry_one_revocation_feed_and_one_use_per_join_token() {
    let Some(c) = cluster("replicas_share_one_registry") else {
        return;
    };
    let (a_dir, b_dir) = (c.replica_dir("a"), c.replica_dir("b"));
    let (_a, a_url, _) = c.serve(&a_dir, None);
    let (_b, b_url, b_http) = c.serve(&b_dir, None);
    // And a third, which only follows the log here.
    let c_dir = c.replica_dir("c");
    let (_c, c_url, c_http) = c.serve(&c_dir, None);
    let bundle = c.bundle();
    wait_ready(b_http, &bundle, 200, Duration::from_secs(10), "B").await;
    wait_ready(c_http, &bundle, 200, Duration::from_secs(10), "C").await;
    let mut adm_a = admin(&a_dir, &a_url);

    // Created through A, and at once a join token made through B (B catches up on the miss:
    // read-your-writes across replicas), attested and issued through B.
    create_identity(&mut adm_a, "svc/api", 600).await;
    let mut adm_b0 = admin(&b_dir, &b_url);
    let token = join_token(&mut adm_b0, "svc/api").await;
    let on_b = WorkloadClient::new(ClientConfig::new(b_url.clone(), bundle.clone())).unwrap();
    let source = Source::start(
        on_b.clone(),
        Arc::new(sigil_sdk::OneTimeEvidence::new(Evidence::JoinToken(
            token.into(),
        ))),
        quick(),
    )
    .await
    .unwrap();
    let verifier = source.verifier();
    let mut adm_b = admin(&b_dir, &b_url);
    let id = adm_b
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: "spiffe://example.org/svc/api".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(id.owner, "team");

    // 100 tokens issued through B and revoked through A: B's Source and Verifier enforce each.
    let mut delays = Vec::new();
    for _ in 0..100 {
        let jwt = on_b
            .fetch_jwt_svid(&JwtRequest::audience("db"))
            .await
            .unwrap();
        let token = jwt.token.expose_secret().to_owned();
        assert!(verifier.verify_jwt(&token, "db").is_ok());
        let started = Instant::now();
        adm_a
            .revoke_credential(pb::RevokeCredentialRequest {
                credential_id: jwt.jti.clone(),
                reason: "replica test".into(),
            })
            .await
            .unwrap();
        while verifier.verify_jwt(&token, "db").is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "B's verifier learns of A's revocation"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(started.elapsed());
        assert!(verifier.verify_jwt(&token, "db").is_err());
    }
    delays.sort();
    let p50 = delays[49];
    let p99 = delays[98];
    eprintln!(
        "revoke through A -> enforced by an SDK on B: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (from the revoke call's start)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        delays[99].as_secs_f64() * 1e3
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?} under 1 s");

    // A join token raced through both replicas: one attestation.
    let token = join_token(&mut adm_a, "svc/api").await;
    let mut racers = Vec::new();
    for i in 0..20 {
        let url = if i % 2 == 0 {
            a_url.clone()
        } else {
            b_url.clone()
        };
        let (bundle, token) = (bundle.clone(), token.clone());
        racers.push(tokio::spawn(async move {
            WorkloadClient::new(ClientConfig::new(url, bundle))
                .unwrap()
                .attest(
                    Evidence::JoinToken(token.into()),
                    SvidOptions::default(),
                    &[],
                )
                .await
                .is_ok()
        }));
    }
    let mut won = 0;
    for r in racers {
        won += usize::from(r.await.unwrap());
    }
    assert_eq!(won, 1, "one attestation per join token across replicas");

    // The third replica knows what A and B did, and its join token works once too.
    let mut adm_c = admin(&c_dir, &c_url);
    let seen = adm_c
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: "spiffe://example.org/svc/api".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.id, id.id);
    let token = join_token(&mut adm_c, "svc/api").await;
    let on_a = WorkloadClient::new(ClientConfig::new(a_url.clone(), bundle.clone())).unwrap();
    let first = on_a
        .attest(
            Evidence::JoinToken(token.clone().into()),
            SvidOptions::default(),
            &[],
        )
        .await;
    assert!(
        first.is_ok(),
        "a token made through C works on A: {:?}",
        first.as_ref().err()
    );
    let replay = WorkloadClient::new(ClientConfig::new(b_url.clone(), bundle.clone()))
        .unwrap()
        .attest(
            Evidence::JoinToken(token.into()),
            SvidOptions::default(),
            &[],
        )
        .await;
    assert!(replay.is_err(), "and only once, on B as well");

    // A key rotation through A reaches B's and C's JWKS through the commit log.
    let before = kids(b_http, &bundle).await;
    let out = sigil(
        &[
            "rotate",
            "jwt",
            "--data-dir",
            a_dir.to_str().unwrap(),
            "--broker",
            &a_url,
        ],
        c.tmp.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = Instant::now();
    for http in [b_http, c_http] {
        while kids(http, &bundle).await.is_subset(&before) {
            assert!(
                rotated.elapsed() < Duration::from_secs(2),
                "B and C publish the key A made"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Backups and the offline verifier work against the database.
    let out = sigil(
        &[
            "audit",
            "verify",
            "--offline",
            "--data-dir",
            a_dir.to_str().unwrap(),
        ],
        c.tmp.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_of_a_replica_under_load_loses_nothing_and_clients_move_on() {
    let Some(c) = cluster("kill_dash_nine_of_a_replica") else {
        return;
    };
    let (a_dir, b_dir) = (c.replica_dir("a"), c.replica_dir("b"));
    let (mut a, a_url, a_http) = c.serve(&a_dir, None);
    let (_b, b_url, b_http) = c.serve(&b_dir, None);
    let bundle = c.bundle();
    wait_ready(b_http, &bundle, 200, Duration::from_secs(10), "B").await;
    let both = format!("{a_url},{b_url}");
    // A started first, so A runs the schedules, and only A.
    let started = Instant::now();
    loop {
        let (a_leads, b_leads) = (leads(a_http, &bundle).await, leads(b_http, &bundle).await);
        if a_leads && !b_leads {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "A leads and B does not"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A Source with 4 s certificates renewing through A first.
    let mut adm = admin(&a_dir, &both);
    create_identity(&mut adm, "svc/short", 4).await;
    let token = join_token(&mut adm, "svc/short").await;
    let client = WorkloadClient::new(ClientConfig::new(both.clone(), bundle.clone())).unwrap();
    let source = Source::start(
        client,
        Arc::new(sigil_sdk::OneTimeEvidence::new(Evidence::JoinToken(
            token.into(),
        ))),
        quick(),
    )
    .await
    .unwrap();
    let mut events = source.events();
    let bad = Arc::new(AtomicBool::new(false));
    let watch_bad = bad.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if matches!(
                e,
                SourceEvent::RenewalFailed { .. } | SourceEvent::Expired { .. }
            ) {
                eprintln!("source event: {e:?}");
                watch_bad.store(true, Ordering::SeqCst);
            }
        }
    });

    let load = Load::start(&a_dir, &both, false).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = load.count();
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    while load.count() < before + 100 {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "clients issue again through B"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let moved = killed.elapsed();
    // B takes the schedules over.
    while !leads(b_http, &bundle).await {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "B leads once A is gone"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took_over = killed.elapsed();
    // Long enough for the Source to renew twice through B.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let refused = load.refused.lock().unwrap().clone();
    let received = load.stop().await;
    eprintln!(
        "kill -9 of replica A under 64 in flight: issuing again through B {:.0} ms later, B leads the schedules {:.0} ms later; {} credentials received, refusals {:?}",
        moved.as_secs_f64() * 1e3,
        took_over.as_secs_f64() * 1e3,
        received.len(),
        refused
    );
    all_on_record(&b_dir, &b_url, &received).await;
    assert!(
        !bad.load(Ordering::SeqCst),
        "the Source saw no failed renewal and no expired certificate"
    );
    assert!(
        source.x509_svid().is_ok(),
        "the Source holds a valid certificate"
    );
    source.shutdown().await;
    watcher.abort();
}

/// A TCP door in front of a replica: while shut it drops every connection at once (as a
/// replica that is not up yet would), and counts the attempts; once open it passes bytes
/// through, TLS and all.
struct Door {
    url: String,
    open: Arc<AtomicBool>,
    attempts: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Door {
    async fn shut_before(url: &str) -> Door {
        let to: SocketAddr = url
            .strip_prefix("https://")
            .unwrap()
            .parse()
            .expect("a replica URL is https://IP:PORT");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let door_url = format!("https://{}", l.local_addr().unwrap());
        let open = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (o, n) = (open.clone(), attempts.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Door {
            url: door_url,
            open,
            attempts,
            task,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_committed_while_the_sdk_is_between_replicas_is_still_enforced() {
    let Some(c) = cluster("a_revocation_committed_between_replicas") else {
        return;
    };
    let (a_dir, b_dir) = (c.replica_dir("a"), c.replica_dir("b"));
    let (mut a, a_url, _) = c.serve(&a_dir, None);
    let (_b, b_url, b_http) = c.serve(&b_dir, None);
    let bundle = c.bundle();
    wait_ready(b_http, &bundle, 200, Duration::from_secs(10), "B").await;
    // The SDK knows A, then B behind a door that stays shut until the revocations are in.
    let door = Door::shut_before(&b_url).await;
    let both = format!("{a_url},{}", door.url);
    let mut adm_b = admin(&b_dir, &b_url);
    create_identity(&mut adm_b, "svc/between", 600).await;
    let token = join_token(&mut adm_b, "svc/between").await;
    let client = WorkloadClient::new(ClientConfig::new(both, bundle.clone())).unwrap();
    let source = Source::start(
        client.clone(),
        Arc::new(sigil_sdk::OneTimeEvidence::new(Evidence::JoinToken(
            token.into(),
        ))),
        quick(),
    )
    .await
    .unwrap();
    let mut events = source.events();
    let verifier = source.verifier();
    let jwt = client
        .fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .unwrap();
    let token = jwt.token.expose_secret().to_owned();
    let serial = source.x509_svid().unwrap().serial.clone();
    assert!(verifier.verify_jwt(&token, "db").is_ok());

    // A dies; the SDK's Watch stream tries A and the shut door, and backs off.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let before = door.attempts.load(Ordering::SeqCst);
    let started = Instant::now();
    while door.attempts.load(Ordering::SeqCst) < before + 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the SDK tries the next replica"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Meanwhile an operator revokes the token and the certificate through B.
    for id in [jwt.jti.clone(), serial.clone()] {
        adm_b
            .revoke_credential(pb::RevokeCredentialRequest {
                credential_id: id,
                reason: "leaked while the SDK was between replicas".into(),
            })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        verifier.verify_jwt(&token, "db").is_ok(),
        "with no replica reachable the SDK cannot have heard yet (the test would prove nothing)"
    );

    // The door opens: on reconnecting, the SDK learns both revocations it missed.
    door.open.store(true, Ordering::SeqCst);
    let opened = Instant::now();
    while verifier.verify_jwt(&token, "db").is_ok() {
        assert!(
            opened.elapsed() < Duration::from_secs(5),
            "the revocation committed in the gap is enforced after reconnecting"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let enforced = opened.elapsed();
    let revoked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Ok(SourceEvent::Revoked { reason }) => return reason,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("events: {e}"),
            }
        }
    })
    .await
    .expect("the Source hears its own certificate was revoked");
    eprintln!(
        "revocations committed while the SDK reached no replica: enforced {:.0} ms after one was reachable again ({revoked})",
        enforced.as_secs_f64() * 1e3
    );
    source.shutdown().await;
    door.task.abort();
}

/// Why the DNS test cannot run here, if it cannot: it needs root (for a private mount
/// namespace whose /etc/hosts names two replicas) and `unshare`.
fn no_private_hosts() -> Option<String> {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("it needs root, for a mount namespace with its own /etc/hosts".into());
    }
    let ok = std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| "`unshare -m` does not work here".into())
}

/// `sigil fetch` run where `replicas.sigil.test` resolves to 127.0.0.1 and 127.0.0.2 (a
/// private mount namespace with its own /etc/hosts), against that name.
fn fetch_by_name(c: &Cluster, port: u16, token: &str, out: &Path) -> std::process::Output {
    let hosts = c.tmp.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 replicas.sigil.test\n127.0.0.2 replicas.sigil.test\n",
    )
    .unwrap();
    let token_file = c.tmp.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
        .arg(&hosts)
        .arg(SIGIL)
        .args(["fetch", "--broker"])
        .arg(format!("https://replicas.sigil.test:{port}"))
        .arg("--trust-bundle")
        .arg(c.seed.join("bundle.pem"))
        .arg("--join-token-file")
        .arg(&token_file)
        .arg("--out")
        .arg(out)
        .env_remove("SIGIL_MASTER_KEY")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_of_several_replicas_is_failed_over_between() {
    if let Some(why) = no_private_hosts() {
        assert!(
            std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
            "the DNS failover test cannot run, and SIGIL_TEST_REQUIRE_ALL is set: {why}"
        );
        eprintln!("\n!!! SKIPPED the DNS failover test: {why} !!!\n");
        return;
    }
    let Some(c) = cluster_with(
        "a_dns_name_of_several_replicas",
        &["--server-name", "replicas.sigil.test"],
    ) else {
        return;
    };
    // Two replicas on one port, one per address the name resolves to.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (a_dir, b_dir) = (c.replica_dir("a"), c.replica_dir("b"));
    let (a_listen, b_listen) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));
    let mut a = Some(c.serve_with(&a_dir, &["--listen", &a_listen]));
    let mut b = Some(c.serve_with(&b_dir, &["--listen", &b_listen]));
    let bundle = c.bundle();
    for r in [&a, &b] {
        let http = r.as_ref().unwrap().2;
        wait_ready(http, &bundle, 200, Duration::from_secs(10), "replica").await;
    }
    let a_url = a.as_ref().unwrap().1.clone();
    let mut adm = admin(&a_dir, &a_url);
    create_identity(&mut adm, "svc/by-name", 600).await;

    // Both up: the name works.
    let out = c.tmp.path().join("both");
    let token = join_token(&mut adm, "svc/by-name").await;
    let got = fetch_by_name(&c, port, &token, &out);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );

    // Either replica down: the name still works, through the other address.
    for (i, down) in ["127.0.0.1", "127.0.0.2"].into_iter().enumerate() {
        let mut p = if down == "127.0.0.1" {
            a.take()
        } else {
            b.take()
        }
        .unwrap()
        .0;
        p.child.kill().unwrap();
        p.child.wait().unwrap();
        // Operators use the other replica (by address) meanwhile.
        let up = if down == "127.0.0.1" { &b } else { &a };
        let up_dir = if down == "127.0.0.1" { &b_dir } else { &a_dir };
        let mut adm = admin(up_dir, &up.as_ref().unwrap().1);
        let token = join_token(&mut adm, "svc/by-name").await;
        let out = c.tmp.path().join(format!("without-{down}"));
        let started = Instant::now();
        let got = fetch_by_name(&c, port, &token, &out);
        assert!(
            got.status.success(),
            "fetch by name with {down} down: {}",
            String::from_utf8_lossy(&got.stderr)
        );
        let pem = std::fs::read_to_string(out.join("svid.pem")).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
        eprintln!(
            "sigil fetch by a name of two replicas with the one at {down} killed: {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        if i == 0 {
            // Bring it back before the other goes down.
            let (dir, listen) = (&a_dir, &a_listen);
            let r = c.serve_with(dir, &["--listen", listen]);
            wait_ready(r.2, &bundle, 200, Duration::from_secs(10), "A again").await;
            a = Some(r);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_fails_closed_and_replicas_recover_by_themselves() {
    let Some(c) = cluster("a_postgres_restart_under_load") else {
        return;
    };
    let (a_dir, b_dir) = (c.replica_dir("a"), c.replica_dir("b"));
    let (_a, a_url, a_http) = c.serve(&a_dir, None);
    let (_b, b_url, b_http) = c.serve(&b_dir, None);
    let bundle = c.bundle();
    for h in [a_http, b_http] {
        wait_ready(h, &bundle, 200, Duration::from_secs(10), "start").await;
    }
    let both = format!("{a_url},{b_url}");
    let load = Load::start(&a_dir, &both, false).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pg_stopped = Instant::now();
    c.pg.stop().unwrap();
    for h in [a_http, b_http] {
        wait_ready(
            h,
            &bundle,
            503,
            Duration::from_secs(10),
            "not ready without the database",
        )
        .await;
    }
    let down_at = load.count();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        load.count(),
        down_at,
        "nothing issued while the database is down"
    );
    // gRPC health says so too (what `sigil status` and load balancers read)…
    let status = |dir: &Path, url: &str| -> String {
        let out = sigil(
            &[
                "status",
                "--json",
                "--data-dir",
                dir.to_str().unwrap(),
                "--broker",
                url,
            ],
            c.tmp.path(),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json ({e}): {:?}", out));
        v["brokers"][0]["status"].as_str().unwrap().to_owned()
    };
    for (dir, url) in [(&a_dir, &a_url), (&b_dir, &b_url)] {
        let asked = Instant::now();
        while status(dir, url) != "not serving" {
            assert!(
                asked.elapsed() < Duration::from_secs(5),
                "{url}: gRPC health NOT_SERVING without the database"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // …while the bundle and JWKS are still served from memory, over gRPC and HTTP.
    let verifier_view = WorkloadClient::new(ClientConfig::new(a_url.clone(), bundle.clone()))
        .unwrap()
        .fetch_bundle()
        .await
        .expect("the bundle is served while the database is down");
    assert!(!verifier_view.bundle.jwt_authorities.is_empty());
    assert!(!verifier_view.bundle.x509_authorities.is_empty());
    for path in ["/keys", "/bundle"] {
        let got = https_get(b_http, path, &bundle).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{path}: {got}");
    }
    c.pg.start_again().unwrap();
    let back = Instant::now();
    for h in [a_http, b_http] {
        wait_ready(
            h,
            &bundle,
            200,
            Duration::from_secs(30),
            "ready again without a restart",
        )
        .await;
    }
    let ready_after = back.elapsed();
    while load.count() < down_at + 100 {
        assert!(back.elapsed() < Duration::from_secs(30), "issuing again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = load.stop().await;
    eprintln!(
        "PostgreSQL down {:.1} s under load: both replicas ready {:.2} s after it came back; {} credentials",
        (back - pg_stopped).as_secs_f64(),
        ready_after.as_secs_f64(),
        received.len()
    );
    all_on_record(&a_dir, &a_url, &received).await;
    let v = admin(&b_dir, &b_url)
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.intact, "{}", v.reason);
}

/// A TCP proxy in front of PostgreSQL that can cut every connection through it, and refuse
/// new ones, until healed.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    cuts: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Proxy {
    async fn start(to: u16) -> Proxy {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let cuts = Arc::new(cuts);
        let (c, g) = (cut.clone(), cuts.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let mut cut_rx = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, cut, cuts }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|g| *g += 1);
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_from_the_database_goes_not_ready_and_catches_up_before_it_is_ready_again() {
    let Some(c) = cluster("a_replica_cut_from_the_database") else {
        return;
    };
    let proxy = Proxy::start(c.pg.port()).await;
    let via_proxy = c.db_url.replace(
        &format!(":{}/", c.pg.port()),
        &format!(":{}/", proxy.addr.port()),
    );
    let (a_dir, c_dir) = (c.replica_dir("a"), c.replica_dir("c"));
    let (_a, a_url, a_http) = c.serve(&a_dir, None);
    let (_c, c_url, c_http) = c.serve(&c_dir, Some(&via_proxy));
    let bundle = c.bundle();
    for h in [a_http, c_http] {
        wait_ready(h, &bundle, 200, Duration::from_secs(10), "start").await;
    }
    // A workload that prefers C, with A as the other replica.
    let mut adm_a = admin(&a_dir, &a_url);
    create_identity(&mut adm_a, "svc/w", 600).await;
    let token = join_token(&mut adm_a, "svc/w").await;
    let w = WorkloadClient::new(ClientConfig::new(
        format!("{c_url},{a_url}"),
        bundle.clone(),
    ))
    .unwrap();
    w.attest(
        Evidence::JoinToken(token.into()),
        SvidOptions::default(),
        &[],
    )
    .await
    .unwrap();

    proxy.cut();
    let cut_at = Instant::now();
    let noticed = wait_ready(
        c_http,
        &bundle,
        503,
        Duration::from_secs(15),
        "C not ready once cut",
    )
    .await;
    // The workload moves to A; A keeps serving, and commits what C cannot see yet.
    for _ in 0..5 {
        w.fetch_jwt_svid(&JwtRequest::audience("db"))
            .await
            .expect("served through A");
    }
    create_identity(&mut adm_a, "svc/during-the-cut", 600).await;
    assert_eq!(ready(a_http, &bundle).await, 200);
    // A real outage, not a blip: C stays cut (and not ready) for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ready(c_http, &bundle).await,
        503,
        "still not ready while cut"
    );

    proxy.heal();
    let healed = Instant::now();
    wait_ready(
        c_http,
        &bundle,
        200,
        Duration::from_secs(30),
        "C ready after the cut heals",
    )
    .await;
    let back = healed.elapsed();
    // Ready means caught up: what A committed during the cut is in C's registry already.
    let mut adm_c = admin(&c_dir, &c_url);
    let got = adm_c
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: "spiffe://example.org/svc/during-the-cut".into(),
        })
        .await;
    assert!(
        got.is_ok(),
        "C caught up before it said it was ready: {got:?}"
    );
    eprintln!(
        "replica cut from PostgreSQL: not ready after {:.2} s; ready (and caught up) {:.2} s after the cut healed (cut for {:.1} s)",
        noticed.as_secs_f64(),
        back.as_secs_f64(),
        (healed - cut_at).as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigil_migrate_moves_an_embedded_store_with_100k_ledger_rows_into_postgres() {
    let Some(c) = cluster("sigil_migrate") else {
        return;
    };
    // An embedded store with 100,000 ledger rows.
    let embedded = c.tmp.path().join("embedded");
    init_at(c.tmp.path(), &embedded, false);
    {
        let cfg = sigil_broker::config::Config::load(&embedded).unwrap();
        let key = sigil_broker::server::load_master_key(&cfg).unwrap();
        let sealer = Arc::new(sigil_broker::seal::Sealer::new(&key));
        let store = sigil_store::open(&cfg.store().unwrap(), sealer, Default::default())
            .await
            .unwrap();
        let now = std::time::SystemTime::now();
        for batch in 0..100 {
            let mut ops = Vec::with_capacity(1000);
            for i in 0..1000u64 {
                let t = now - Duration::from_secs(86_400) + Duration::from_micros(batch * 1000 + i);
                ops.push(sigil_broker::store::Op::AppendLedger(
                    sigil_broker::model::LedgerRecord {
                        credential_id: sigil_pki::ids::to_hex(&sigil_pki::ids::new_serial(t)),
                        kind: sigil_broker::model::CredentialKind::X509,
                        identity_id: "id-bulk".into(),
                        spiffe_id: "spiffe://example.org/bulk".into(),
                        generation: 1,
                        audiences: Vec::new(),
                        scopes: Vec::new(),
                        dns_names: Vec::new(),
                        issued_at: sigil_broker::clock::unix_secs(t),
                        expires_at: sigil_broker::clock::unix_secs(t) + 3600,
                        signing_key_id: "k".into(),
                        attestation: "join_token".into(),
                        source: "127.0.0.1".into(),
                    },
                ));
            }
            store
                .commit(sigil_broker::store::Change {
                    ops,
                    audit: vec![sigil_broker::audit::AuditDraft::new(
                        0,
                        "test",
                        "bulk",
                        "ledger",
                        sigil_broker::audit::Decision::Allow,
                        "populate",
                        "t",
                    )],
                })
                .await
                .unwrap();
        }
        store.close().await;
    }
    c.pg.create_database("migrated").unwrap();
    let target = c.pg.url("migrated");
    // With a wrong master key, migrate refuses and changes nothing on either side (the real
    // migrate below finds the database empty).
    let before = digests(&embedded);
    let wrong = std::process::Command::new(SIGIL)
        .args([
            "migrate",
            "--from",
            embedded.to_str().unwrap(),
            "--to",
            &target,
        ])
        .env(
            "SIGIL_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .current_dir(c.tmp.path())
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("master key"), "{err}");
    assert_eq!(
        digests(&embedded),
        before,
        "the embedded store is unchanged"
    );
    let started = Instant::now();
    let out = sigil(
        &[
            "migrate",
            "--from",
            embedded.to_str().unwrap(),
            "--to",
            &target,
        ],
        c.tmp.path(),
    );
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migrate: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let moved: u64 = stdout
        .split(" ledger records")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("migrate says how many ledger records it moved: {stdout}"));
    // The 100,000 written above, and the operator credential `init` recorded.
    assert!(
        (100_000..=100_002).contains(&moved),
        "every ledger row moved: {moved}"
    );
    assert!(stdout.contains("audit log intact"), "{stdout}");
    eprintln!(
        "sigil migrate of 100,000 ledger rows: {:.1} s",
        took.as_secs_f64()
    );
    // A second migrate into the same database refuses.
    let again = sigil(
        &[
            "migrate",
            "--from",
            embedded.to_str().unwrap(),
            "--to",
            &target,
        ],
        c.tmp.path(),
    );
    assert!(!again.status.success(), "a non-empty target is refused");
    // The broker serves from it, with every row and the chain intact.
    let _p = Proc::spawn(
        &[
            "serve",
            "--data-dir",
            embedded.to_str().unwrap(),
            "--store",
            &target,
        ],
        c.tmp.path(),
        &[],
    );
    let url = _p
        .wait_for("sigil broker listening on ")
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    let mut adm = admin(&embedded, &url);
    let v = adm
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.intact, "{}", v.reason);
    assert!(
        v.entries >= 102,
        "the whole chain came along: {}",
        v.entries
    );

    // A backup with PostgreSQL's own tools (pg_dump, restored with psql into another
    // database) verifies offline, chain and anchor intact.
    let bin = sigil_store::local::binaries().unwrap();
    let port = c.pg.port().to_string();
    let dump = c.tmp.path().join("sigil.sql");
    let pg = |tool: &str, args: &[&str]| {
        let out = std::process::Command::new(bin.join(tool))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    pg("pg_dump", &["-d", "migrated", "-f", dump.to_str().unwrap()]);
    c.pg.create_database("restored").unwrap();
    pg(
        "psql",
        &["-q", "-d", "restored", "-f", dump.to_str().unwrap()],
    );
    let out = sigil(
        &[
            "audit",
            "verify",
            "--offline",
            "--data-dir",
            embedded.to_str().unwrap(),
            "--store",
            &c.pg.url("restored"),
        ],
        c.tmp.path(),
    );
    assert!(
        out.status.success(),
        "audit verify --offline on the restored database: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("intact"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // `migrate --to` alone: nothing to do at this build's schema…
    let out = sigil(&["migrate", "--to", &target], c.tmp.path());
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to do"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // …and a database a newer sigil migrated is refused, by migrate and by serve, unchanged.
    let psql = bin.join("psql");
    let ok = std::process::Command::new(&psql)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "migrated",
            "-qc",
        ])
        .arg("UPDATE sigil_schema SET version = 99")
        .status()
        .unwrap()
        .success();
    assert!(ok, "psql");
    drop(_p);
    let out = sigil(&["migrate", "--to", &target], c.tmp.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("schema version 99, newer than this build's"),
        "{err}"
    );
    let out = sigil(
        &[
            "serve",
            "--data-dir",
            embedded.to_str().unwrap(),
            "--store",
            &target,
        ],
        c.tmp.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("newer than this build's"), "{err}");
}
