//! Running the real `sigil serve` the way deployments do: its config in a file of its own
//! (a ConfigMap) with the master key elsewhere (a Secret), as an unprivileged user, and beside
//! another broker that was given the same workload socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;

use common::*;
use sigil_proto::v1 as pb;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A second broker configured with the same socket path is refused and leaves the first one
/// reachable; a socket left by a broker that died is taken over; a broker removes only the
/// socket it made.
#[test]
fn a_live_workload_socket_is_never_taken_and_a_stale_one_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let a_data = tmp.path().join("a");
    let b_data = tmp.path().join("b");
    init_at(tmp.path(), &a_data, false);
    init_at(tmp.path(), &b_data, false);
    let socket = tmp.path().join("run/workload.sock");
    let serve_on = |data: &Path| {
        vec![
            "serve".to_owned(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--http-listen".into(),
            "off".into(),
            "--workload-socket".into(),
            socket.display().to_string(),
        ]
    };
    let a_args = serve_on(&a_data);
    let a_argv: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let mut a = Proc::spawn(&a_argv, tmp.path(), &[]);
    a.wait_for("sigil broker listening on ");
    let inode = std::fs::metadata(&socket).unwrap().ino();

    // B with the same path: refused, with the reason and the way out.
    let b_args = serve_on(&b_data);
    let b_argv: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let out = sigil(&b_argv, tmp.path());
    assert!(!out.status.success(), "{b_argv:?}");
    let err = stderr(&out);
    assert!(err.contains("another process is listening on"), "{err}");
    assert!(err.contains("--workload-socket"), "{err}");
    // A's socket is still there (the same file) and still answers.
    assert_eq!(std::fs::metadata(&socket).unwrap().ino(), inode);
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());

    // A dies without cleaning up: the file is stale, and B takes the path over.
    let _ = a.child.kill();
    let _ = a.child.wait();
    assert!(socket.exists(), "kill -9 leaves the socket file");
    let mut b = Proc::spawn(&b_argv, tmp.path(), &[]);
    b.wait_for("sigil broker listening on ");
    // (A is dead, so whoever answers now is B.)
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    // B exits cleanly and removes its own socket.
    assert!(b.sigterm().success());
    assert!(!socket.exists());
}

/// `sigil serve --config FILE` (or SIGIL_CONFIG): the config, the master key and the data can
/// each live in their own place, as a ConfigMap, a Secret and a volume do.
#[test]
fn serve_reads_its_config_from_its_own_file_and_the_master_key_from_another_place() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let etc = tmp.path().join("etc");
    let secrets = tmp.path().join("secrets");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = secrets.join("master.key");
    std::fs::rename(data.join("master.key"), &key).unwrap();
    let mut cfg = sigil_broker::config::Config::load(&data).unwrap();
    std::fs::remove_file(data.join("sigil.toml")).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http_listen = None;
    cfg.master_key_file = Some(key.clone());
    let conf = etc.join("sigil.toml");
    std::fs::write(&conf, cfg.to_toml()).unwrap();

    // Without --config the data dir alone does not know where the key went.
    let out = sigil(
        &[
            "audit",
            "verify",
            "--offline",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(!out.status.success());

    // Under systemd (Type=notify) the broker says when it is ready, and when it stops.
    let notify_path = tmp.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut p = Proc::spawn(
        &["serve", "--data-dir", data.to_str().unwrap()],
        tmp.path(),
        &[
            ("SIGIL_CONFIG", conf.to_str().unwrap()),
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
        ],
    );
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let line = p.wait_for("sigil broker listening on ");
    let url = line.rsplit(' ').next().unwrap().to_owned();
    assert!(
        !url.ends_with(":8443"),
        "the file's listen address is used: {url}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut admin = admin(&data, &url);
        let r = admin
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.name, "admin");
    });
    assert!(p.sigterm().success());
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");

    // A config file that is not there is named, not replaced by defaults.
    let missing = etc.join("nope.toml");
    let out = sigil(
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--config",
            missing.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope.toml"), "{}", stderr(&out));
}

/// A broker run as an unprivileged user cannot read another user's program: it still attests
/// by uid, refuses binary-pinned identities with the reason and the fix, and attests its own
/// user's programs by hash.
#[test]
fn an_unprivileged_broker_attests_by_uid_and_says_what_binary_pinning_needs() {
    if !nix_is_root() {
        assert!(
            std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
            "this test needs root (to run processes as other users), and SIGIL_TEST_REQUIRE_ALL is set"
        );
        eprintln!("\n!!! SKIPPED: unprivileged attestation needs root to switch users !!!\n");
        return;
    }
    const BROKER: u32 = 64_901;
    const WORKLOAD: u32 = 64_902;
    const PINNED: u32 = 64_903;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = init(tmp.path());
    let run = tmp.path().join("run");
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let bundle = tmp.path().join("bundle.pem");
    std::fs::copy(data.join("bundle.pem"), &bundle).unwrap();
    std::fs::set_permissions(&bundle, std::fs::Permissions::from_mode(0o644)).unwrap();
    let chown = |p: &Path| {
        assert!(
            Command::new("chown")
                .args(["-R", &format!("{BROKER}:{BROKER}")])
                .arg(p)
                .status()
                .unwrap()
                .success()
        )
    };
    chown(&data);
    chown(&run);
    let socket = run.join("workload.sock");
    let p = Proc::spawn_as(
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
            "--workload-socket",
            socket.to_str().unwrap(),
        ],
        tmp.path(),
        &[],
        Some(BROKER),
    );
    let line = p.wait_for("sigil broker listening on ");
    let url = line.rsplit(' ').next().unwrap().to_owned();
    let sha = sigil_broker::attest::unix::file_sha256(Path::new(SIGIL)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut admin = admin(&data, &url);
        for (name, selectors) in [
            ("by-uid", vec![format!("unix:uid:{WORKLOAD}")]),
            (
                "pinned",
                vec![format!("unix:uid:{PINNED}"), format!("unix:sha256:{sha}")],
            ),
            (
                "same-user",
                vec![format!("unix:uid:{BROKER}"), format!("unix:sha256:{sha}")],
            ),
        ] {
            admin
                .create_identity(pb::CreateIdentityRequest {
                    spiffe_id: format!("spiffe://example.org/{name}"),
                    owner: "platform".into(),
                    purpose: "unprivileged attestation".into(),
                    selectors,
                    entitlements: Some(pb::Entitlements {
                        kinds: vec!["x509".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    });
    let fetch_as = |uid: u32| {
        use std::os::unix::process::CommandExt as _;
        let out = out_dir.join(uid.to_string());
        Command::new(SIGIL)
            .uid(uid)
            .gid(uid)
            .args(["fetch", "--broker"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--out")
            .arg(&out)
            .current_dir(&out_dir)
            .env_remove("SIGIL_MASTER_KEY")
            .output()
            .unwrap()
    };
    // Another user, identity by uid: attested (the kernel's uid is enough).
    let o = fetch_as(WORKLOAD);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("spiffe://example.org/by-uid"));
    // Another user, identity pinned to the binary: refused, saying why and what fixes it.
    let o = fetch_as(PINNED);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("may not read process"), "{err}");
    assert!(err.contains("CAP_SYS_PTRACE"), "{err}");
    // The broker's own user: its programs are readable, so pinning works.
    let o = fetch_as(BROKER);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("spiffe://example.org/same-user"));
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0)
}

/// The systemd units in deploy/ pass `systemd-analyze verify` with nothing to say (it exits 0
/// even for unknown keys, so its output must be empty too).
#[test]
fn the_systemd_units_verify_cleanly() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if analyze.is_err() {
        assert!(
            std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
            "systemd-analyze is missing, and SIGIL_TEST_REQUIRE_ALL is set"
        );
        eprintln!(
            "\n!!! SKIPPED: systemd-analyze (Debian's systemd package) is not installed !!!\n"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd");
    let verify = |names: &[&str], edit: &dyn Fn(String) -> String| {
        let mut paths = Vec::new();
        for n in names {
            let text = std::fs::read_to_string(units.join(n)).unwrap();
            // The installed binary's path, pointed at the one under test.
            let text = edit(text.replace("/usr/local/bin/sigil", SIGIL));
            let p = tmp.path().join(n);
            std::fs::write(&p, text).unwrap();
            paths.push(p);
        }
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .args(&paths)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            stderr(&out) + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let (ok, said) = verify(&["sigil.service", "sigil-agent@.service"], &|t| t);
    assert!(ok && said.trim().is_empty(), "{said}");
    // The check can fail: a misspelt key is reported.
    let (_, said) = verify(&["sigil.service"], &|t| {
        t.replace("ProtectSystem=", "ProtectSystm=")
    });
    assert!(said.contains("ProtectSystm"), "{said}");
}
