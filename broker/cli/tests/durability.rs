//! Durability of the real `sigil` process on real files: kill -9 under load, a full disk, a
//! damaged store, a store whose audit tail was cut, SIGTERM with idle clients, a crash right
//! after `init`, and backups taken under load. Tests that need root and loop mounts skip
//! loudly elsewhere (and fail under SIGIL_TEST_REQUIRE_ALL, as in CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sigil_proto::v1 as pb;

mod common;
use common::*;

/// Issuance from one identity is not rate limited in these tests: they measure the store.
fn unlimited(data: &Path) {
    set_config(data, "limits", "authenticated_per_second", "0");
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// No command may crash on a damaged store: a message, never a panic.
fn no_panic(what: &str, o: &std::process::Output) {
    let err = stderr(o);
    assert!(
        !err.contains("panicked") && o.status.code().is_some(),
        "{what} crashed: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_ten_times_under_load_loses_nothing_and_each_crashed_store_verifies_offline()
{
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    unlimited(&data);
    let mut received = Vec::new();
    let data_s = data.to_str().unwrap();
    for round in 1..=10 {
        let (mut broker, url) = serve(tmp.path(), &data);
        let load = Load::start(&data, &url, true).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        broker.child.kill().expect("kill -9");
        broker.child.wait().unwrap();
        let got = load.stop().await;
        assert!(!got.is_empty(), "round {round}: the load was real");
        received.extend(got);

        // The tool an operator reaches for after a crash works on exactly this store, and
        // changes nothing in it.
        let before = digests(&data);
        let out = sigil(
            &["audit", "verify", "--offline", "--data-dir", data_s],
            tmp.path(),
        );
        assert!(
            out.status.success(),
            "round {round}: audit verify --offline on a crashed store: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(
            stdout(&out).contains("intact"),
            "round {round}: {}",
            stdout(&out)
        );
        assert_eq!(
            digests(&data),
            before,
            "round {round}: the offline check wrote nothing"
        );
    }
    eprintln!("{} credentials received over 10 kill -9", received.len());
    assert!(
        received.len() > 500,
        "the load was real: {}",
        received.len()
    );
    let (_broker, url) = serve(tmp.path(), &data);
    all_on_record(&data, &url, &received).await;
    let verify = admin(&data, &url)
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verify.intact, "{}", verify.reason);
}

/// Fills `path` with zeros until the filesystem is full.
fn fill(path: &Path) -> u64 {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k as u64,
        }
    }
    let _ = f.sync_all();
    n
}

/// The status code of `GET path` on the broker's HTTPS listener.
async fn http_status(addr: std::net::SocketAddr, path: &str, bundle: &[u8]) -> u16 {
    let r = https_get(addr, path, bundle).await;
    r.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_and_issuance_comes_back_without_a_restart_when_space_is_freed() {
    if !require_mounts("a_full_disk_fails_closed_and_issuance_comes_back") {
        return;
    }
    let fs = LoopFs::new(64);
    let tmp = tempfile::tempdir().unwrap();
    let data = fs.mount.join("data");
    init_at(tmp.path(), &data, true);
    unlimited(&data);
    let (mut broker, url, http) = serve_http(tmp.path(), &data);
    let bundle = std::fs::read(data.join("bundle.pem")).unwrap();
    assert_eq!(http_status(http, "/readyz", &bundle).await, 200);

    let load = Load::start(&data, &url, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let filler = fs.mount.join("filler");
    let filled = fill(&filler);
    eprintln!("filled the disk with {} MB", filled >> 20);

    // The broker notices at its next commit that needs room, fails closed and says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(http, "/readyz", &bundle).await != 503 {
        assert!(
            Instant::now() < deadline,
            "not-ready within 60 s of the disk filling up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        http_status(http, "/healthz", &bundle).await,
        200,
        "alive: a restart would not help, freeing space does"
    );
    // While full, issuance fails closed. (A commit that finds room inside the file — pages
    // freed by recovery — is durable and may succeed; that every credential a client got is
    // durable is checked below, after a restart too.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let while_full = load.count();
    assert!(
        load.refused.lock().unwrap().contains_key("Unavailable"),
        "refused as Unavailable: {:?}",
        load.refused.lock().unwrap()
    );

    // Space comes back: so does issuance, by itself.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    while http_status(http, "/readyz", &bundle).await != 200 {
        assert!(
            freed.elapsed() < Duration::from_secs(20),
            "ready again within 20 s of space coming back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_after = freed.elapsed();
    while load.count() < while_full + 200 {
        assert!(
            freed.elapsed() < Duration::from_secs(30),
            "issuing again after space came back ({} new)",
            load.count() - while_full
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "ready {:.2} s after space was freed; {} credentials before the disk filled",
        ready_after.as_secs_f64(),
        while_full
    );
    let received = load.stop().await;
    all_on_record(&data, &url, &received).await;
    let verify = admin(&data, &url)
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verify.intact, "{}", verify.reason);

    // And all of it survives a restart.
    assert!(broker.sigterm().success());
    let (_broker, url) = serve(tmp.path(), &data);
    all_on_record(&data, &url, &received).await;
}

/// Runs `cmd` to its end and returns its output, or kills it and returns `None` if it is
/// still running after `within` (a server that started).
fn output_within(cmd: &mut Command, within: Duration) -> Option<std::process::Output> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().unwrap())
}

/// Every byte offset of `needle` in `hay`.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_unchanged_with_a_clear_message_and_no_command_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = init(tmp.path());
    let (mut broker, url) = serve(tmp.path(), &pristine);
    admin(&pristine, &url)
        .create_identity(pb::CreateIdentityRequest {
            spiffe_id: "spiffe://example.org/marked".into(),
            owner: "owner-marker-7f3a".into(),
            purpose: "corruption test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let load = Load::start(&pristine, &url, false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop().await;
    assert!(broker.sigterm().success());
    drop(broker);

    let file = files_of(&pristine)[0].clone();
    let bytes = std::fs::read(&file).unwrap();
    let chain =
        sigil_broker::store::read_audit_offline(&sigil_broker::store::StoreConfig::redb(&file))
            .unwrap();
    let last_hash = chain.anchor.unwrap().hash;
    let identity_at = find_all(&bytes, b"owner-marker-7f3a")[0];
    let audit_at = find_all(&bytes, b"\"action\":\"identity.create\"")[0];
    // The newest audit entry (and the anchor naming it) sit on the last pages the chain uses.
    let tail_at = *find_all(&bytes, last_hash.as_bytes()).last().unwrap();
    let ledger_at = *find_all(&bytes, b"\"attestation\":\"join_token\"")
        .last()
        .unwrap();
    let cases: [(&str, usize); 5] = [
        ("a page of the identities table", identity_at),
        ("a page of the audit log", audit_at),
        ("the page holding the chain's end", tail_at),
        ("the file header", 0),
        ("a page of the ledger", ledger_at),
    ];
    for (what, at) in cases {
        let case = tmp.path().join(format!("case-{at}"));
        let out = Command::new("cp")
            .args(["-a"])
            .arg(&pristine)
            .arg(&case)
            .status()
            .unwrap();
        assert!(out.success());
        let f = files_of(&case)[0].clone();
        let mut b = std::fs::read(&f).unwrap();
        for x in &mut b[at..(at + 64).min(bytes.len())] {
            *x ^= 0xff;
        }
        std::fs::write(&f, &b).unwrap();
        let before = digests(&case);
        let dir = case.to_str().unwrap();

        let out = output_within(
            Command::new(SIGIL)
                .args(["serve", "--data-dir", dir])
                .env_remove("SIGIL_MASTER_KEY"),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("serve started on a store with 64 bytes flipped in {what}"));
        no_panic(&format!("serve on {what}"), &out);
        assert!(
            !out.status.success(),
            "serve refuses a store with 64 bytes flipped in {what}"
        );
        let err = stderr(&out);
        assert!(
            err.contains("sigil.redb")
                && (err.contains("damaged")
                    || err.contains("integrity")
                    || err.contains("corrupt")
                    || err.contains("Not a redb database")),
            "serve names the file and the damage ({what}): {err}"
        );
        for args in [
            vec!["audit", "verify", "--offline", "--data-dir", dir],
            vec![
                "backup",
                "--offline",
                "--data-dir",
                dir,
                "--out",
                tmp.path().join(format!("b-{at}")).to_str().unwrap(),
            ],
        ] {
            let out = sigil(&args, tmp.path());
            no_panic(&format!("{} on {what}", args[..2].join(" ")), &out);
            assert!(
                !out.status.success(),
                "{} refuses {what}",
                args[..2].join(" ")
            );
        }
        assert_eq!(
            digests(&case),
            before,
            "{what}: the damaged store is byte for byte as it was"
        );
        eprintln!("{what}: {}", err.lines().last().unwrap_or_default());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_audit_log_and_ledger_tail_is_found_online_and_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    init_at(tmp.path(), &data, true);
    let (mut broker, url, _) = serve_http(tmp.path(), &data);
    let load = Load::start(&data, &url, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.stop().await;
    let head = admin(&data, &url)
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(broker.sigterm().success());
    drop(broker);

    // Someone with write access to the file but not the master key removes the newest five
    // audit entries and the newest ledger row, to hide an issuance.
    let cfg = sigil_broker::store::StoreConfig::in_data_dir(&data);
    sigil_store::testing::truncate_tail(&cfg, 5, 1).unwrap();
    let dir = data.to_str().unwrap();
    let out = sigil(
        &["audit", "verify", "--offline", "--data-dir", dir],
        tmp.path(),
    );
    assert!(!out.status.success(), "offline verify finds the cut");
    assert!(
        stderr(&out).contains(&format!("entries {} to {head} were removed", head - 4)),
        "offline verify names what was removed: {}",
        stderr(&out)
    );

    // Online: the broker starts (operators need to read what is there), refuses to append to
    // a cut chain (that would bury the evidence), is not ready, and says why.
    let (_broker, url, http) = serve_http(tmp.path(), &data);
    let mut adm = admin(&data, &url);
    let v = adm
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!v.intact, "online verify finds the cut");
    assert_eq!(v.first_bad_sequence, head - 4, "{}", v.reason);
    let e = adm
        .create_identity(pb::CreateIdentityRequest {
            spiffe_id: "spiffe://example.org/after-the-cut".into(),
            owner: "team".into(),
            purpose: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("anchored"), "{}", e.message());
    let bundle = std::fs::read(data.join("bundle.pem")).unwrap();
    assert_eq!(http_status(http, "/readyz", &bundle).await, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_grace_period_despite_idle_and_silent_clients() {
    use tokio::io::AsyncWriteExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    set_config(&data, "limits", "shutdown_grace", "\"2s\"");
    let (mut broker, url) = serve(tmp.path(), &data);
    let addr: std::net::SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let bundle = std::fs::read(data.join("bundle.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in sigil_pki::certs_from_pem(&bundle).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // One client completes TLS and never sends the HTTP/2 preface; another sends the preface
    // and then nothing; a third only opens TCP.
    let silent = connector
        .connect(
            name.clone(),
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        )
        .await
        .unwrap();
    let mut idle = connector
        .connect(name, tokio::net::TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    idle.flush().await.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sent = Instant::now();
    let status = tokio::task::spawn_blocking(move || broker.sigterm())
        .await
        .unwrap();
    let took = sent.elapsed();
    eprintln!("exited {:.2} s after SIGTERM", took.as_secs_f64());
    assert!(status.success(), "a clean exit: {status:?}");
    assert!(
        took < Duration::from_secs(3),
        "exits within the 2 s grace period plus a second, not {took:?}"
    );
    drop((silent, idle, tcp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_crash_right_after_init_leaves_a_store_that_starts() {
    if !require_mounts("a_machine_crash_right_after_init_leaves_a_store_that_starts") {
        return;
    }
    let fs = LoopFs::new(32);
    let tmp = tempfile::tempdir().unwrap();
    let data = fs.mount.join("data");
    init_at(tmp.path(), &data, false);
    // Power lost at once: nothing that was not made durable survives.
    fs.crash_and_remount();
    let (_broker, url) = serve(tmp.path(), &data);
    let who = admin(&data, &url)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(who.role, "admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_into_a_store_that_starts_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    unlimited(&data);
    let (mut broker, url) = serve(tmp.path(), &data);
    let load = Load::start(&data, &url, false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: Vec<(String, String)> = load.received.lock().unwrap().clone();
    let backup = tmp.path().join("sigil.backup");
    let (b, d, t) = (backup.clone(), data.clone(), tmp.path().to_owned());
    let out = tokio::task::spawn_blocking(move || {
        sigil(
            &[
                "backup",
                "--data-dir",
                d.to_str().unwrap(),
                "--out",
                b.to_str().unwrap(),
            ],
            &t,
        )
    })
    .await
    .unwrap();
    let during = load.count();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let received = load.stop().await;
    assert!(out.status.success(), "backup under load: {}", stderr(&out));
    assert!(
        received.len() > before.len() && before.len() > 100,
        "the load ran before and during the backup ({} before, {during} when it ended)",
        before.len()
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600,
        "a backup is private"
    );

    // Restored into a new data dir (holding only the config and the master key, as a
    // ConfigMap and a Secret would put them), it starts, verifies, and holds everything
    // issued before the backup began.
    let restored = tmp.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    for f in ["sigil.toml", "master.key"] {
        std::fs::copy(data.join(f), restored.join(f)).unwrap();
    }
    let r = restored.to_str().unwrap();
    let out = sigil(
        &["restore", backup.to_str().unwrap(), "--data-dir", r],
        tmp.path(),
    );
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert!(
        stdout(&out).contains("audit log intact"),
        "{}",
        stdout(&out)
    );
    let out = sigil(
        &["audit", "verify", "--offline", "--data-dir", r],
        tmp.path(),
    );
    assert!(
        out.status.success(),
        "offline verify of the restored store: {}",
        stderr(&out)
    );
    Command::new("cp")
        .args(["-a"])
        .arg(data.join("admin"))
        .arg(&restored)
        .status()
        .unwrap();
    let (mut second, url2) = serve(tmp.path(), &restored);
    all_on_record(&restored, &url2, &before).await;
    let v = admin(&restored, &url2)
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.intact, "{}", v.reason);
    assert!(second.sigterm().success());

    // Refusals change nothing: a data dir that is not new, and another master key.
    let out = sigil(
        &["restore", backup.to_str().unwrap(), "--data-dir", r],
        tmp.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    let other = tmp.path().join("other");
    let out = Command::new(SIGIL)
        .args(["restore", backup.to_str().unwrap(), "--data-dir"])
        .arg(&other)
        .env(
            "SIGIL_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("another master key"),
        "{}",
        stderr(&out)
    );
    assert!(!other.exists(), "a refused restore leaves nothing behind");

    // After a kill -9, an offline backup of the crashed store restores too.
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    let offline = tmp.path().join("offline.backup");
    let out = sigil(
        &[
            "backup",
            "--offline",
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            offline.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(
        out.status.success(),
        "offline backup of a crashed store: {}",
        stderr(&out)
    );
    let third = tmp.path().join("third");
    std::fs::create_dir(&third).unwrap();
    std::fs::copy(data.join("master.key"), third.join("master.key")).unwrap();
    let out = sigil(
        &[
            "restore",
            offline.to_str().unwrap(),
            "--data-dir",
            third.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Everything issued, before and during the first backup, is in it.
    let out = sigil(
        &[
            "audit",
            "verify",
            "--offline",
            "--data-dir",
            third.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    Command::new("cp")
        .args(["-a"])
        .arg(data.join("admin"))
        .arg(&third)
        .status()
        .unwrap();
    std::fs::copy(data.join("sigil.toml"), third.join("sigil.toml")).unwrap();
    let (_b, url3) = serve(tmp.path(), &third);
    all_on_record(&third, &url3, &received).await;
}
