//! Tests that run the real `sigil` binary as a separate process: refusing a wrong master key,
//! `sigil dev` exactly as a newcomer runs it, SIGHUP, the bench, idle connections. Crash
//! safety and the store's durability are in `durability.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sigil_proto::v1 as pb;
use sigil_sdk::{ClientConfig, Evidence, SvidOptions, WorkloadClient};

mod common;
use common::*;

#[test]
fn a_wrong_master_key_refuses_to_start_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let out = Command::new(SIGIL)
        .args(["serve", "--data-dir", data.to_str().unwrap()])
        .env(
            "SIGIL_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: the master key does not match the data in"),
        "{err}"
    );
    // A group-readable key file is refused too.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("master.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = sigil(&["serve", "--data-dir", data.to_str().unwrap()], tmp.path());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("is readable by group or others (mode 644); run `chmod 600"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And init refuses to overwrite.
    let out = sigil(
        &[
            "init",
            "--data-dir",
            data.to_str().unwrap(),
            "--trust-domain",
            "example.org",
        ],
        tmp.path(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
}

#[test]
fn sigil_dev_prints_a_fetch_command_that_works_as_printed() {
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..2 {
        // Second round: an existing dev dir is reused, with a fresh join token.
        let mut dev = Proc::spawn(
            &[
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ],
            tmp.path(),
            &[],
        );
        let fetch = dev.wait_for(" fetch --broker ");
        let unix_fetch = dev.wait_for(" fetch --broker unix://");
        let list = dev.wait_for(" identity list ");
        assert!(
            !fetch.contains("sigil_jt_") && fetch.contains("--join-token-file"),
            "the token is in a file, not on the command line (where ps shows it): {fetch}"
        );
        let out_dir = format!("demo-creds-{round}");
        let fetch = fetch
            .trim()
            .replace("./demo-creds", &format!("./{out_dir}"));
        let out = Command::new("sh")
            .arg("-c")
            .arg(&fetch)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{fetch}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://demo.sigil.test/demo/web"));
        for f in ["svid.pem", "svid.key", "bundle.pem", "jwt-demo-api.txt"] {
            assert!(tmp.path().join(&out_dir).join(f).exists(), "{f} written");
        }
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("scopes demo.read"),
            "the scope dev advertises can be fetched: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // The SPIFFE path, from the same one command: the Workload API socket, by uid.
        let unix_fetch = unix_fetch
            .trim()
            .replace("./demo-local", &format!("./demo-local-{round}"));
        let out = Command::new("sh")
            .arg("-c")
            .arg(&unix_fetch)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{unix_fetch}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("spiffe://demo.sigil.test/demo/local"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(list.trim())
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{}`: {}",
            list.trim(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://demo.sigil.test/demo/web"));
        assert!(
            dev.sigterm().success(),
            "sigil dev exits cleanly on SIGTERM"
        );
    }
}

/// Polls the audit log for `action` entries until there are `n`, for up to 10 s.
async fn audit_entries(
    admin: &mut sigil_proto::v1::admin_client::AdminClient<sigil_sdk::Failover>,
    action: &str,
    n: usize,
) -> Vec<serde_json::Value> {
    for _ in 0..200 {
        let r = admin
            .list_audit(pb::ListAuditRequest {
                from_sequence: 1,
                limit: 1000,
                action: action.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.entries.len() >= n {
            return r
                .entries
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} {action} audit entries after 10s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policies_and_sigil_fetch_attests_over_the_unix_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let policies = tmp.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("base.cedar"),
        "@id(\"no-ledger\")\nforbid(principal, action == Sigil::Action::\"mint_jwt\", resource == Sigil::Audience::\"ledger\");\n",
    )
    .unwrap();
    let mut cfg = sigil_broker::config::Config::load(&data).unwrap();
    cfg.policy.path = Some(policies.clone());
    std::fs::write(data.join("sigil.toml"), cfg.to_toml()).unwrap();
    let socket = tmp.path().join("workload.sock");
    let p = Proc::spawn(
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--workload-socket",
            socket.to_str().unwrap(),
        ],
        tmp.path(),
        &[],
    );
    let line = p.wait_for("sigil broker listening on ");
    let url = line.rsplit(' ').next().unwrap().to_owned();
    let mut admin = admin(&data, &url);

    // `sigil fetch` over the socket, attested by the uid it runs as and its own binary.
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    let sha = sigil_broker::attest::unix::file_sha256(Path::new(SIGIL)).unwrap();
    admin
        .create_identity(pb::CreateIdentityRequest {
            spiffe_id: "spiffe://example.org/host/agent".into(),
            owner: "platform".into(),
            purpose: "the host's sigil agent".into(),
            selectors: vec![format!("unix:uid:{uid}"), format!("unix:sha256:{sha}")],
            entitlements: Some(pb::Entitlements {
                kinds: vec!["x509".into(), "jwt".into()],
                audiences: vec!["db".into(), "ledger".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let out_dir = tmp.path().join("creds");
    let fetch = |aud: &str| {
        sigil(
            &[
                "fetch",
                "--broker",
                &format!("unix://{}", socket.display()),
                "--trust-bundle",
                data.join("bundle.pem").to_str().unwrap(),
                "--out",
                out_dir.to_str().unwrap(),
                "--audience",
                aud,
            ],
            tmp.path(),
        )
    };
    let out = fetch("db");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/host/agent"));
    let out = fetch("ledger");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-ledger"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A broken file and SIGHUP: refused, audited, the old policy stays.
    std::fs::write(policies.join("zz.cedar"), "permit(principal,\n").unwrap();
    let hup = |pid: u32| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        )
    };
    hup(p.child.id());
    let entries = audit_entries(&mut admin, "policy.reload", 1).await;
    assert_eq!(entries[0]["decision"], "deny");
    assert_eq!(entries[0]["actor"], "signal:SIGHUP");
    assert!(
        entries[0]["reason"].as_str().unwrap().contains("zz.cedar:"),
        "{}",
        entries[0]
    );
    assert!(!fetch("ledger").status.success(), "old policy in force");

    // Fixed, and the forbid lifted: SIGHUP puts it in force.
    std::fs::remove_file(policies.join("zz.cedar")).unwrap();
    std::fs::write(policies.join("base.cedar"), "// nothing forbidden\n").unwrap();
    hup(p.child.id());
    let entries = audit_entries(&mut admin, "policy.reload", 2).await;
    assert_eq!(entries[1]["decision"], "allow");
    let out = fetch("ledger");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigil_bench_runs_embedded_and_prints_the_documented_json() {
    // Small counts: this checks the tool works end to end, not how fast anything is.
    let tmp = tempfile::tempdir().unwrap();
    let out = sigil(
        &[
            "bench",
            "--embedded",
            "--scenario",
            "jwt,x509,attest,mixed",
            "--count",
            "40",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--warmup",
            "0s",
            "--attest-tokens",
            "60",
            "--populate",
            "2000",
            "--live-revocations",
            "100",
            "--json",
        ],
        tmp.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for s in ["jwt", "x509", "attest", "mixed"] {
        let f = &v["scenarios"][s];
        assert!(f["ops_per_s"].as_f64().unwrap() > 0.0, "{s}: {f}");
        assert!(f["ops"].as_u64().unwrap() >= 40, "{s}: {f}");
        assert_eq!(f["errors"], 0, "{s}: {f}");
        assert!(f["p99_ms"].as_f64().unwrap() >= f["p50_ms"].as_f64().unwrap());
    }
    // The scale run: filled, restarted, and compared with an empty broker run by turns.
    let p = &v["populated"];
    assert_eq!(p["ledger_rows"], 2000, "{p}");
    assert_eq!(p["live_revocations"], 100, "{p}");
    assert!(p["ready_after_restart_ms"].as_u64().is_some(), "{p}");
    for s in ["jwt", "x509"] {
        let rounds = p["alternate_rounds"].as_u64().unwrap();
        for side in ["scenarios", "empty_alternated"] {
            let f = &p[side][s];
            assert!(f["ops"].as_u64().unwrap() >= 40 * rounds, "{side} {s}: {f}");
            assert_eq!(f["errors"], 0, "{side} {s}: {f}");
        }
        assert!(p["vs_empty"][s].as_f64().unwrap() > 0.0, "{p}");
    }
    assert!(
        p["scenarios"]["revoke_call"]["ops"].as_u64().unwrap() > 0,
        "{p}"
    );
}

/// A wrong, garbage or mismatched key, or a damaged store, is refused by every command that
/// opens a store — and not one byte of the data dir changes, even for a store a `kill -9` left
/// needing crash recovery (whose recovery would rewrite it).
#[test]
fn a_wrong_master_key_or_a_damaged_store_changes_nothing_in_any_start_path() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    // Leave the store as a crash does: served, then killed.
    let (mut p, _) = serve(tmp.path(), &data);
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let _ = std::fs::remove_file(data.join("broker.url"));
    let good = digests(&data);
    let wrong = sigil_broker::seal::MasterKey::generate().to_base64();
    let files = sigil_broker::store::StoreConfig::in_data_dir(&data).files();
    let (store, sidecar) = (files[0].clone(), files[1].clone());
    let sidecar_bytes = std::fs::read(&sidecar).unwrap();
    let store_bytes = std::fs::read(&store).unwrap();
    let d = data.to_str().unwrap();
    let commands: [&[&str]; 3] = [
        &["serve", "--data-dir", d],
        &["audit", "verify", "--offline", "--data-dir", d],
        &[
            "dev",
            "--data-dir",
            d,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
        ],
    ];
    // (case, key in the environment, what to do to the data dir, what the error must say)
    type Damage = fn(&Path, &[u8], &[u8]);
    let cases: [(&str, Option<&str>, Damage, &str); 5] = [
        (
            "wrong key",
            Some(wrong.expose_secret()),
            |_, _, _| {},
            "the master key does not match the data in",
        ),
        (
            "wrong key, no key-check file",
            Some(wrong.expose_secret()),
            |d, _, _| std::fs::remove_file(files_of(d)[1].clone()).unwrap(),
            "the master key does not match the data in",
        ),
        (
            "garbage key",
            Some("this is not a key"),
            |_, _, _| {},
            "is not valid: expected 32 bytes, base64-encoded",
        ),
        (
            "truncated store",
            None,
            |d, _, store| {
                std::fs::write(files_of(d)[0].clone(), &store[..store.len() / 2]).unwrap()
            },
            "the store could not be opened",
        ),
        (
            "torn key-check file",
            None,
            |d, _, _| std::fs::write(files_of(d)[1].clone(), b"").unwrap(),
            "is empty (torn by a crash",
        ),
    ];
    for (case, key, damage, says) in cases {
        // Every case starts from the crashed store.
        std::fs::write(&sidecar, &sidecar_bytes).unwrap();
        std::fs::write(&store, &store_bytes).unwrap();
        assert_eq!(digests(&data), good);
        damage(&data, &sidecar_bytes, &store_bytes);
        let before = digests(&data);
        for args in commands {
            let mut cmd = Command::new(SIGIL);
            cmd.args(args)
                .current_dir(tmp.path())
                .env_remove("SIGIL_MASTER_KEY");
            if let Some(k) = key {
                cmd.env("SIGIL_MASTER_KEY", k);
            }
            let out = cmd.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{case}: {args:?} must refuse");
            assert!(err.contains(says), "{case}: {args:?}: {err}");
            assert!(!err.contains("panicked"), "{case}: {args:?}: {err}");
            assert_eq!(
                digests(&data),
                before,
                "{case}: {args:?} changed the data dir"
            );
        }
    }
    // The right key still opens the crashed store (recovering it).
    std::fs::write(&sidecar, &sidecar_bytes).unwrap();
    std::fs::write(&store, &store_bytes).unwrap();
    let out = sigil(
        &["audit", "verify", "--offline", "--data-dir", d],
        tmp.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(digests(&data), good, "the offline verifier writes nothing");
    let (p, _) = serve(tmp.path(), &data);
    drop(p);
}

/// More idle connections to the HTTP listener than it may hold, on a broker started with a
/// small open-file limit: the listener refuses the excess, and gRPC issuance carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_connections_beyond_the_cap_do_not_stop_issuance() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    init_at(tmp.path(), &data, true);
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!(
                "ulimit -n 256 && exec {SIGIL} serve --data-dir {}",
                data.display()
            ),
        ])
        .env_remove("SIGIL_MASTER_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log, kept to count what it says about the refusals (and echoed for the test log).
    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let kept = log.clone();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            eprintln!("{l}");
            kept.lock().unwrap().push(l);
        }
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut url = String::new();
    let mut http = String::new();
    while url.is_empty() || http.is_empty() {
        let l = lines.next().expect("sigil printed its addresses").unwrap();
        if let Some(u) = l.strip_prefix("sigil broker listening on ") {
            url = u.to_owned();
        }
        if let Some(h) = l.strip_prefix("sigil http listening on https://") {
            http = h.to_owned();
        }
    }
    let http: std::net::SocketAddr = http.parse().unwrap();
    // Hold 300 idle connections (more than the process has descriptors for).
    let mut idle = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = std::net::TcpStream::connect(http) {
            idle.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Issuance is unaffected.
    let bundle = std::fs::read(data.join("bundle.pem")).unwrap();
    let mut adm = admin(&data, &url);
    let id = "spiffe://example.org/svc/app";
    adm.create_identity(pb::CreateIdentityRequest {
        spiffe_id: id.into(),
        owner: "team".into(),
        purpose: "fd test".into(),
        entitlements: Some(pb::Entitlements {
            kinds: vec!["x509".into(), "jwt".into()],
            max_ttl_seconds: 3600,
            audiences: vec!["db".into()],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let token = adm
        .create_join_token(pb::CreateJoinTokenRequest {
            id_or_spiffe_id: id.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let w = WorkloadClient::new(ClientConfig::new(url.clone(), bundle.clone())).unwrap();
    let started = std::time::Instant::now();
    let c = tokio::time::timeout(
        Duration::from_secs(5),
        w.attest(
            Evidence::JoinToken(token.into()),
            SvidOptions::default(),
            &[sigil_sdk::JwtRequest::audience("db")],
        ),
    )
    .await
    .expect("issuance answered")
    .expect("issued");
    assert_eq!(c.jwts.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // A normal client's bundle fetch and JWT-SVID mint each answer within a second.
    let t = std::time::Instant::now();
    w.fetch_bundle().await.expect("bundle");
    let bundle_took = t.elapsed();
    let t = std::time::Instant::now();
    w.fetch_jwt_svid(&sigil_sdk::JwtRequest::audience("db"))
        .await
        .expect("mint");
    let mint_took = t.elapsed();
    assert!(
        bundle_took < Duration::from_secs(1) && mint_took < Duration::from_secs(1),
        "bundle {bundle_took:?}, mint {mint_took:?} while the HTTP listener is full"
    );
    // Once they are gone, the HTTP listener serves again, and counted what it refused.
    drop(idle);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = https_get(http, "/metrics", &bundle).await;
    let refused: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("sigil_connections_refused_total") && l.contains("listener=\"http\"")
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert!(refused >= 100.0, "{refused} refusals counted: {m}");
    // ...and said so once for the interval, not once per refused connection.
    let said = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("refusing connections on the http listener"))
        .count();
    assert_eq!(said, 1, "{refused} refusals logged {said} times");
    let _ = child.kill();
    let _ = child.wait();
}

/// What scripts rely on: documented exit codes by kind of failure, `--version` with the
/// commit, completion scripts a shell accepts, man pages, and a port in use said once with
/// what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_version_completions_man_pages_and_a_port_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let (mut broker, url) = serve(tmp.path(), &data);
    let d = data.to_str().unwrap();
    let code = |args: &[&str]| {
        let out = sigil(args, tmp.path());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code(&["identity", "list", "--data-dir", d]).0, Some(0));
    let (c, err) = code(&[
        "identity",
        "show",
        "spiffe://example.org/nobody",
        "--data-dir",
        d,
    ]);
    assert_eq!(c, Some(3), "not found: {err}");
    assert_eq!(code(&["identity", "show"]).0, Some(2), "usage");
    // Denied: an auditor may read but not create.
    let out = sigil(
        &[
            "operator",
            "create",
            "ana",
            "--role",
            "auditor",
            "--out",
            tmp.path().join("ana").to_str().unwrap(),
            "--data-dir",
            d,
        ],
        tmp.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ana = tmp.path().join("ana");
    let (c, err) = code(&[
        "identity",
        "create",
        "--spiffe-id",
        "spiffe://example.org/x",
        "--owner",
        "t",
        "--purpose",
        "p",
        "--broker",
        &url,
        "--trust-bundle",
        data.join("bundle.pem").to_str().unwrap(),
        "--admin-cert",
        ana.join("ana.crt").to_str().unwrap(),
        "--admin-key",
        ana.join("ana.key").to_str().unwrap(),
    ]);
    assert_eq!(c, Some(4), "denied: {err}");

    // The port in use: said once, with what to do.
    let port = url.rsplit(':').next().unwrap().to_owned();
    let (c, err) = code(&[
        "serve",
        "--data-dir",
        d,
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    assert_eq!(c, Some(1));
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(err.contains("--listen"), "{err}");

    // A trust bundle of another broker: a misconfiguration (not retryable), named as such,
    // with the bundle file.
    let other = tmp.path().join("other-bundle.pem");
    let other_dir = tmp.path().join("other");
    init_at(tmp.path(), &other_dir, false);
    std::fs::copy(other_dir.join("bundle.pem"), &other).unwrap();
    let (c, err) = code(&[
        "identity",
        "list",
        "--data-dir",
        d,
        "--trust-bundle",
        other.to_str().unwrap(),
    ]);
    assert_eq!(
        c,
        Some(1),
        "a wrong bundle is an error, not an outage: {err}"
    );
    assert!(
        err.contains("does not chain to the trust bundle") && err.contains("other-bundle.pem"),
        "{err}"
    );

    // The broker gone: unavailable, naming the address.
    assert!(broker.sigterm().success());
    let (c, err) = code(&["identity", "list", "--data-dir", d, "--broker", &url]);
    assert_eq!(c, Some(5), "unavailable: {err}");
    assert!(
        err.contains("connection refused") && err.contains(&url),
        "names what failed and where: {err}"
    );

    let v = String::from_utf8_lossy(&sigil(&["--version"], tmp.path()).stdout).into_owned();
    assert!(v.starts_with("sigil ") && v.contains("commit "), "{v}");
    let help = String::from_utf8_lossy(&sigil(&["--help"], tmp.path()).stdout).into_owned();
    assert!(help.contains("Exit codes: 0 ok"), "{help}");

    // Completions a shell accepts, and man pages.
    let bash = sigil(&["completion", "bash"], tmp.path()).stdout;
    let script = tmp.path().join("sigil.bash");
    std::fs::write(&script, &bash).unwrap();
    let ok = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(ok.success(), "bash accepts the completion script");
    for shell in ["zsh", "fish"] {
        let out = sigil(&["completion", shell], tmp.path());
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let man = tmp.path().join("man");
    let out = sigil(&["man", "--out", man.to_str().unwrap()], tmp.path());
    assert!(out.status.success());
    let page = std::fs::read_to_string(man.join("sigil-serve.1")).unwrap();
    assert!(page.contains(".TH sigil-serve"), "{page}");
    assert!(man.join("sigil-identity-create.1").exists());
}

/// What scripts and careful operators rely on: `--json` that parses, `--dry-run` that changes
/// nothing, and an irreversible command that a script without `--yes` cannot run by accident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_dry_runs_and_confirmation_for_irreversible_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let (_broker, _url) = serve(tmp.path(), &data);
    let d = data.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--data-dir", d]);
        let out = sigil(&all, tmp.path());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let (c, out, err) = run(args);
        assert_eq!(c, Some(0), "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} prints JSON ({e}): {out}"))
    };
    let (c, _, err) = run(&[
        "identity",
        "create",
        "--spiffe-id",
        "spiffe://example.org/billing",
        "--owner",
        "team-billing",
        "--purpose",
        "invoices",
    ]);
    assert_eq!(c, Some(0), "{err}");

    let me = json(&["whoami", "--json"]);
    assert!(me["role"].is_string(), "{me}");
    let before = json(&["keys", "list", "--json"]);
    let jwt = before["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"].as_str().unwrap().contains("jwt") && k["state"] == "current")
        .unwrap_or_else(|| panic!("a current jwt key: {before}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Dry runs say what would happen and change nothing.
    let plan = json(&["keys", "revoke", &jwt, "--dry-run", "--json"]);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["key"]["id"], jwt.as_str());
    let plan = json(&["rotate", "jwt", "--dry-run", "--json"]);
    assert!(
        plan["plan"].as_str().unwrap().contains("next jwt key"),
        "{plan}"
    );
    let plan = json(&["owner", "deactivate", "team-billing", "--dry-run", "--json"]);
    assert_eq!(
        plan["identities"],
        serde_json::json!(["spiffe://example.org/billing"])
    );
    let (c, _, err) = run(&["owner", "deactivate", "nobody", "--dry-run"]);
    assert_eq!(c, Some(1));
    assert!(err.contains("no owner \"nobody\""), "{err}");
    assert_eq!(
        json(&["keys", "list", "--json"]),
        before,
        "dry runs changed nothing"
    );
    let owners = json(&["owner", "list", "--json"]);
    assert!(owners.to_string().contains("team-billing"), "{owners}");
    assert!(
        !owners.to_string().contains("\"active\":false"),
        "the owner is still active: {owners}"
    );

    // Revoking a key from a script without --yes is refused, and nothing changes.
    let (c, _, err) = run(&["keys", "revoke", &jwt]);
    assert_eq!(c, Some(1), "{err}");
    assert!(err.contains("--yes") && err.contains("--dry-run"), "{err}");
    assert_eq!(json(&["keys", "list", "--json"]), before);
    let after = json(&[
        "keys", "revoke", &jwt, "--yes", "--reason", "test", "--json",
    ]);
    let old = after["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == jwt.as_str())
        .cloned();
    assert!(
        old.is_none_or(|k| k["state"] != "current"),
        "the revoked key is no longer current: {after}"
    );

    // The audit log: verification as JSON, entries readable by default and raw with --json.
    let v = json(&["audit", "verify", "--json"]);
    assert_eq!(v["intact"], true, "{v}");
    assert!(v["entries"].as_u64().unwrap() >= 3, "{v}");
    let (c, out, err) = run(&["audit", "tail"]);
    assert_eq!(c, Some(0), "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("identity.create"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("ALLOW")
            && line.contains("spiffe://example.org/billing")
            && line.contains('T'),
        "one readable line with time, decision, action and target: {line}"
    );
    let (_, out, _) = run(&["audit", "tail", "--json"]);
    for l in out.lines() {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("each line is JSON ({e}): {l}"));
    }
}

/// A remote operator's setup: a profile saved once (checked against the broker, credential
/// copied with its mode), used with no other flag, picked by name, listed and removed;
/// `sigil status` waits for a starting broker; `init --server-name` puts the name workloads
/// dial into the broker's certificate, and a name that is not a DNS name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_status_and_the_names_in_the_brokers_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    init_with(
        tmp.path(),
        &data,
        false,
        &["--server-name", "sigil.internal"],
    );
    let d = data.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = sigil(args, tmp.path());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Nothing listens yet: status says so with exit code 5, at once.
    let (c, out, _) = run(&["status", "--data-dir", d]);
    assert_eq!(c, Some(5), "{out}");
    assert!(out.contains("unreachable"), "{out}");
    // `status --wait` sees the broker come up.
    let waiter = {
        let dir = tmp.path().to_owned();
        let d = d.to_owned();
        std::thread::spawn(move || sigil(&["status", "--wait", "30s", "--data-dir", &d], &dir))
    };
    std::thread::sleep(Duration::from_millis(300));
    let (broker, url) = serve(tmp.path(), &data);
    let w = waiter.join().unwrap();
    let out = String::from_utf8_lossy(&w.stdout);
    assert!(
        w.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(out.contains(&url) && out.contains("serving"), "{out}");
    assert!(out.contains("operator \"admin\" (role admin)"), "{out}");

    // The certificate names sigil.internal.
    let s_client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            url.trim_start_matches("https://"),
            "-servername",
            "sigil.internal",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let cert = String::from_utf8_lossy(&s_client.stdout).into_owned();
    let pem_start = cert
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let pem_end = cert.find("-----END CERTIFICATE-----").unwrap() + 25;
    std::fs::write(tmp.path().join("server.pem"), &cert[pem_start..pem_end]).unwrap();
    let san = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(tmp.path().join("server.pem"))
        .output()
        .unwrap();
    let san = String::from_utf8_lossy(&san.stdout);
    assert!(
        san.contains("DNS:sigil.internal") && san.contains("DNS:localhost"),
        "{san}"
    );
    let (c, _, err) = run(&[
        "init",
        "--data-dir",
        tmp.path().join("other").to_str().unwrap(),
        "--trust-domain",
        "example.org",
        "--server-name",
        "not a name",
    ]);
    assert_eq!(c, Some(1));
    assert!(err.contains("\"not a name\" is not a DNS name"), "{err}");
    assert!(!tmp.path().join("other/sigil.redb").exists());

    // A profile: saved from explicit files, then used with no flag at all.
    let (c, out, err) = run(&[
        "profile",
        "add",
        "prod",
        "--broker",
        &url,
        "--trust-bundle",
        data.join("bundle.pem").to_str().unwrap(),
        "--admin-cert",
        data.join("admin/admin.crt").to_str().unwrap(),
        "--admin-key",
        data.join("admin/admin.key").to_str().unwrap(),
    ]);
    assert_eq!(c, Some(0), "{err}");
    assert!(
        out.contains("as operator \"admin\"") && out.contains("current"),
        "{out}"
    );
    let saved = tmp.path().join(".sigil-config/profiles/prod/operator.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (c, out, err) = run(&["whoami"]);
    assert_eq!(c, Some(0), "{err}");
    assert!(out.starts_with("admin (role admin)"), "{out}");
    // A second profile that points nowhere: saving it is refused after the check...
    let (c, _, err) = run(&[
        "profile",
        "add",
        "gone",
        "--profile",
        "prod",
        "--broker",
        "https://127.0.0.1:1",
    ]);
    assert_eq!(c, Some(5), "{err}");
    // ... unless asked not to check; picking it by name uses it, and says so when it fails.
    let (c, _, err) = run(&[
        "profile",
        "add",
        "gone",
        "--profile",
        "prod",
        "--broker",
        "https://127.0.0.1:1",
        "--no-verify",
    ]);
    assert_eq!(c, Some(0), "{err}");
    let (c, _, err) = run(&["identity", "list", "--profile", "gone"]);
    assert_eq!(c, Some(5));
    assert!(err.contains("profile gone"), "{err}");
    let (_, out, _) = run(&["profile", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["profiles"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(run(&["profile", "use", "gone"]).0, Some(0));
    assert_eq!(run(&["whoami"]).0, Some(5), "the current profile is used");
    assert_eq!(
        run(&["whoami", "--data-dir", d]).0,
        Some(0),
        "--data-dir beats it"
    );
    assert_eq!(run(&["profile", "remove", "gone"]).0, Some(0));
    assert!(!tmp.path().join(".sigil-config/profiles/gone").exists());
    let (c, _, err) = run(&["whoami", "--profile", "gone"]);
    assert_eq!(c, Some(1));
    assert!(err.contains("no profile \"gone\""), "{err}");
    let (c, _, err) = run(&["profile", "add", "../x", "--data-dir", d]);
    assert_eq!(c, Some(1));
    assert!(err.contains("profile name"), "{err}");

    // Scripts: a key id by kind and state, and a join token to a file that is never
    // overwritten.
    let (_, ids, _) = run(&[
        "keys",
        "list",
        "--kind",
        "jwt",
        "--state",
        "current",
        "-q",
        "--data-dir",
        d,
    ]);
    assert_eq!(ids.lines().count(), 1, "{ids}");
    assert!(!ids.contains(' '), "{ids}");
    let (c, _, err) = run(&[
        "identity",
        "create",
        "--spiffe-id",
        "spiffe://example.org/a",
        "--owner",
        "o",
        "--purpose",
        "p",
        "--data-dir",
        d,
    ]);
    assert_eq!(c, Some(0), "{err}");
    let tok = tmp.path().join("a.token");
    let args = [
        "join-token",
        "create",
        "--spiffe-id",
        "spiffe://example.org/a",
        "--out",
    ];
    let mut with_out = args.to_vec();
    with_out.extend([tok.to_str().unwrap(), "--data-dir", d]);
    let (c, out, err) = run(&with_out);
    assert_eq!(c, Some(0), "{err}");
    assert!(
        !out.contains("sigil_jt_"),
        "the token is not printed: {out}"
    );
    assert!(
        std::fs::read_to_string(&tok)
            .unwrap()
            .starts_with("sigil_jt_")
    );
    assert_eq!(
        std::fs::metadata(&tok).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = std::fs::read(&tok).unwrap();
    let (c, _, err) = run(&with_out);
    assert_eq!(c, Some(1));
    assert!(err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&tok).unwrap(), before);
    drop(broker);
}

/// The rest of what scripts and operators read: `--json` on `join-token create`, `fetch` and
/// `policy check`; `credential show` as text; `revoke credential` with `--dry-run`, and a
/// second revocation that says when the first was and changes nothing; a gRPC client pointed
/// at the HTTP port told so; and colour in logs only on a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_read_back_scripts_parse_and_logs_are_plain_off_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    init_at(tmp.path(), &data, true);
    let p = Proc::spawn(
        &["serve", "--data-dir", data.to_str().unwrap()],
        tmp.path(),
        &[],
    );
    p.wait_for("sigil broker listening on ");
    let http = p
        .wait_for("sigil http listening on ")
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    let d = data.to_str().unwrap();
    let run = |args: &[&str], with_data_dir: bool| {
        let mut all = args.to_vec();
        if with_data_dir {
            all.extend(["--data-dir", d]);
        }
        let out = sigil(&all, tmp.path());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let json = |args: &[&str], with_data_dir: bool| -> serde_json::Value {
        let (c, out, err) = run(args, with_data_dir);
        assert_eq!(c, Some(0), "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} prints JSON ({e}): {out}"))
    };
    let (c, _, err) = run(
        &[
            "identity",
            "create",
            "--spiffe-id",
            "spiffe://example.org/billing",
            "--owner",
            "team-billing",
            "--purpose",
            "invoices",
            "--kind",
            "x509,jwt",
            "--audience",
            "db",
        ],
        true,
    );
    assert_eq!(c, Some(0), "{err}");

    // join-token create --json: the token file, not the token, when written to a file.
    let token_file = tmp.path().join("jt");
    let t = json(
        &[
            "join-token",
            "create",
            "--spiffe-id",
            "spiffe://example.org/billing",
            "--out",
            token_file.to_str().unwrap(),
            "--json",
        ],
        true,
    );
    assert_eq!(t["spiffe_id"], "spiffe://example.org/billing", "{t}");
    assert!(t["token"].is_null(), "the token stays in its file: {t}");
    assert_eq!(t["token_file"], token_file.to_str().unwrap());
    let broker = std::fs::read_to_string(data.join("broker.url")).unwrap();
    let out = tmp.path().join("creds");
    let f = json(
        &[
            "fetch",
            "--broker",
            broker.trim(),
            "--trust-bundle",
            data.join("bundle.pem").to_str().unwrap(),
            "--join-token-file",
            token_file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--audience",
            "db",
            "--json",
        ],
        false,
    );
    let serial = f["serial"].as_str().unwrap().to_owned();
    assert_eq!(f["jwt_svids"][0]["audiences"], serde_json::json!(["db"]));
    assert!(
        std::path::Path::new(f["certificate"].as_str().unwrap()).exists(),
        "{f}"
    );

    // credential show: text for people, one field per line, live.
    let (c, shown, err) = run(&["credential", "show", &serial], true);
    assert_eq!(c, Some(0), "{err}");
    assert!(shown.contains(&serial) && shown.contains("live"), "{shown}");
    // A dry run changes nothing…
    let (c, said, err) = run(&["revoke", "credential", &serial, "--dry-run"], true);
    assert_eq!(c, Some(0), "{err}");
    assert!(said.starts_with("DRY RUN: nothing was changed"), "{said}");
    assert_eq!(run(&["credential", "show", &serial], true).1, shown);
    // …the revocation is shown with when, who and why…
    let (c, said, err) = run(
        &["revoke", "credential", &serial, "--reason", "laptop stolen"],
        true,
    );
    assert_eq!(c, Some(0), "{err}");
    assert!(said.starts_with("revoked x509"), "{said}");
    let (_, shown, _) = run(&["credential", "show", &serial], true);
    assert!(
        shown.contains("REVOKED at ") && shown.contains("laptop stolen"),
        "{shown}"
    );
    // …and revoking again says it already was (and when), and changes nothing.
    let (c, said, err) = run(&["revoke", "credential", &serial], true);
    assert_eq!(c, Some(0), "{err}");
    assert!(
        said.contains("was already revoked at ") && said.contains("nothing changed"),
        "{said}"
    );
    let again = json(&["revoke", "credential", &serial, "--json"], true);
    assert_eq!(again["already_revoked"], true, "{again}");
    assert_eq!(run(&["credential", "show", &serial], true).1, shown);

    // policy check --json.
    let policies = tmp.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("p.cedar"),
        "@id(\"no-ledger\")\nforbid(principal, action == Sigil::Action::\"mint_jwt\", resource == Sigil::Audience::\"ledger\");\n",
    )
    .unwrap();
    let v = json(
        &["policy", "check", policies.to_str().unwrap(), "--json"],
        false,
    );
    assert_eq!(v["ok"], true);
    assert_eq!(v["policies"], serde_json::json!(["no-ledger"]));

    // gRPC sent to the HTTP port: told which port to use.
    let (c, _, err) = run(&["whoami", "--broker", &http], true);
    assert_ne!(c, Some(0));
    assert!(
        err.contains("is this the broker's gRPC port (not its HTTP port)?"),
        "{err}"
    );

    // An irreversible command at a terminal asks, and a wrong answer changes nothing.
    let keys = json(&["keys", "list", "--json"], true);
    let jwt = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"].as_str().unwrap().contains("jwt") && k["state"] == "current")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let at_terminal = |answer: &str| {
        let mut child = std::process::Command::new("script")
            .args([
                "-qec",
                &format!("{SIGIL} keys revoke {jwt} --reason test --data-dir {d}"),
                "/dev/null",
            ])
            .current_dir(tmp.path())
            .env("SIGIL_CONFIG_DIR", tmp.path().join(".sigil-config"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Typed once the prompt is up (script passes it on to the terminal).
        std::thread::sleep(Duration::from_millis(1500));
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = at_terminal("no");
    assert!(
        said.contains("cannot be undone") && said.contains("nothing was changed"),
        "{said}"
    );
    assert_eq!(
        json(&["keys", "list", "--json"], true),
        keys,
        "nothing changed"
    );

    // Logs: plain text when stderr is a file, colour on a terminal (`script` gives one).
    let second = tmp.path().join("second");
    init_at(tmp.path(), &second, false);
    let log = |through_a_terminal: bool| -> String {
        let serve = format!(
            "{SIGIL} serve --data-dir {} & pid=$!; sleep 2; kill $pid; wait $pid",
            second.display()
        );
        let out = if through_a_terminal {
            std::process::Command::new("script")
                .args(["-qec", &serve, "/dev/null"])
                .env_remove("NO_COLOR")
                .output()
                .unwrap()
        } else {
            std::process::Command::new("sh")
                .args(["-c", &serve])
                .env_remove("NO_COLOR")
                .output()
                .unwrap()
        };
        // `script` hands the terminal's output on its stdout.
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let plain = log(false);
    assert!(plain.contains("INFO"), "serve logs at start: {plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "no escape codes off a terminal: {plain:?}"
    );
    let tty = log(true);
    assert!(tty.contains('\u{1b}'), "colour on a terminal: {tty:?}");
}
