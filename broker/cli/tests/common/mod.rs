//! What the process tests share: the real `sigil` binary as a child process, a data dir made
//! by `sigil init`, operator clients, a load of 64 in-flight issuances that remembers every
//! credential it received, and file digests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil_proto::v1 as pb;
use sigil_proto::v1::broker_client::BrokerClient;
use sigil_sdk::transport::{self, ClientCertSlot};
use sigil_sdk::{ClientConfig, Evidence, SvidOptions, WorkloadClient};

pub(crate) const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

/// A child process whose stdout lines arrive on a channel.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) lines: mpsc::Receiver<String>,
}

impl Proc {
    pub(crate) fn spawn(args: &[&str], cwd: &Path, envs: &[(&str, &str)]) -> Proc {
        Self::spawn_as(args, cwd, envs, None)
    }

    /// As [`Proc::spawn`], running as `uid` (and the same gid) when given.
    pub(crate) fn spawn_as(
        args: &[&str],
        cwd: &Path,
        envs: &[(&str, &str)],
        uid: Option<u32>,
    ) -> Proc {
        let mut cmd = Command::new(SIGIL);
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt as _;
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd
            .args(args)
            .current_dir(cwd)
            .env("SIGIL_CONFIG_DIR", cwd.join(".sigil-config"))
            .envs(envs.iter().copied())
            .env_remove("SIGIL_MASTER_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sigil");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// The first line containing `needle`, within 30 s.
    pub(crate) fn wait_for(&self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no line containing {needle:?} from sigil: {e}"),
            }
        }
    }

    pub(crate) fn sigterm(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
        for _ in 0..200 {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sigil did not exit within 10s of SIGTERM");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn sigil(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(SIGIL)
        .args(args)
        .current_dir(cwd)
        .env_remove("SIGIL_MASTER_KEY")
        // Profiles of whoever runs the tests stay out of them.
        .env("SIGIL_CONFIG_DIR", cwd.join(".sigil-config"))
        .output()
        .expect("run sigil")
}

pub(crate) fn init(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    init_at(dir, &data, false);
    data
}

pub(crate) fn serve(dir: &Path, data: &Path) -> (Proc, String) {
    let p = Proc::spawn(&["serve", "--data-dir", data.to_str().unwrap()], dir, &[]);
    let line = p.wait_for("sigil broker listening on ");
    let url = line.rsplit(' ').next().unwrap().to_owned();
    (p, url)
}

pub(crate) fn admin(
    data: &Path,
    url: &str,
) -> sigil_proto::v1::admin_client::AdminClient<sigil_sdk::Failover> {
    let r = |p: &str| std::fs::read(data.join(p)).unwrap();
    sigil_sdk::connect_admin(
        url,
        &r("bundle.pem"),
        &r("admin/admin.crt"),
        &r("admin/admin.key"),
    )
    .unwrap()
}

/// The files of the embedded store in data dir `d`: the database, then its key-check file.
pub(crate) fn files_of(d: &Path) -> Vec<PathBuf> {
    sigil_broker::store::StoreConfig::in_data_dir(d).files()
}

/// sha256 of every file under `dir`, by relative path.
pub(crate) fn digests(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
                out.insert(
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    sigil_pki::ids::to_hex(d.as_ref()),
                );
            }
        }
    }
    out
}

/// `GET path` over TLS (server name `localhost`, verified with `bundle`); the whole response.
pub(crate) async fn https_get(addr: std::net::SocketAddr, path: &str, bundle: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sets `key = value` (TOML) in `[section]` of the data dir's `sigil.toml`.
pub(crate) fn set_config(data: &Path, section: &str, key: &str, value: &str) {
    let path = data.join("sigil.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    let mut in_section = false;
    let mut done = false;
    for line in text.lines() {
        if line.starts_with('[') {
            if in_section && !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            in_section = line.trim() == format!("[{section}]");
        }
        if in_section && line.split('=').next().map(str::trim) == Some(key) {
            out.push(format!("{key} = {value}"));
            done = true;
            continue;
        }
        out.push(line.to_owned());
    }
    if !done {
        if !in_section {
            out.push(format!("[{section}]"));
        }
        out.push(format!("{key} = {value}"));
    }
    std::fs::write(&path, out.join("\n") + "\n").unwrap();
}

/// `sigil init` into `data` (created), with the HTTP listener on a free port when `http`.
pub(crate) fn init_at(dir: &Path, data: &Path, http: bool) {
    init_with(dir, data, http, &[]);
}

/// [`init_at`] with more flags (e.g. `--store URL`).
pub(crate) fn init_with(dir: &Path, data: &Path, http: bool, more: &[&str]) {
    let mut args = vec![
        "init",
        "--data-dir",
        data.to_str().unwrap(),
        "--trust-domain",
        "example.org",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        if http { "127.0.0.1:0" } else { "off" },
    ];
    args.extend_from_slice(more);
    let out = sigil(&args, dir);
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sigil serve` with the HTTP listener on: the process, the gRPC URL and the HTTP address.
pub(crate) fn serve_http(dir: &Path, data: &Path) -> (Proc, String, std::net::SocketAddr) {
    let p = Proc::spawn(&["serve", "--data-dir", data.to_str().unwrap()], dir, &[]);
    let mut url = String::new();
    let mut http = None;
    while url.is_empty() || http.is_none() {
        let l = p.wait_for(" listening on ");
        if let Some(u) = l.strip_prefix("sigil broker listening on ") {
            url = u.to_owned();
        }
        if let Some(h) = l
            .strip_prefix("sigil http listening on https://")
            .or_else(|| l.strip_prefix("sigil http listening on http://"))
        {
            http = Some(h.parse().unwrap());
        }
    }
    (p, url, http.unwrap())
}

/// Whether this process may mount filesystems (root, with the capability).
pub(crate) fn can_mount() -> bool {
    if !rustix::process::geteuid().is_root() {
        return false;
    }
    let probe = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(probe.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let _ = Command::new("umount").arg(probe.path()).status();
    }
    ok
}

/// A small ext4 filesystem in a file, loop-mounted for the life of the value.
pub(crate) struct LoopFs {
    pub(crate) mount: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// `megabytes` of ext4, mounted (root only).
    pub(crate) fn new(megabytes: u64) -> LoopFs {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(megabytes << 20).unwrap();
        drop(f);
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .expect("mkfs.ext4 (e2fsprogs)")
            .success();
        assert!(ok, "mkfs.ext4");
        let fs = LoopFs {
            mount,
            image,
            _dir: dir,
        };
        fs.mount();
        fs
    }

    pub(crate) fn mount(&self) {
        let ok = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&self.image)
            .arg(&self.mount)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -o loop");
    }

    pub(crate) fn umount(&self) {
        let ok = Command::new("umount")
            .arg(&self.mount)
            .status()
            .unwrap()
            .success();
        assert!(ok, "umount");
    }

    /// Simulates the machine losing power: every later I/O on the filesystem fails and
    /// nothing not already on the device survives (the ext4 shutdown ioctl without flushing
    /// the journal), then unmounts and mounts it again.
    pub(crate) fn crash_and_remount(&self) {
        // EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32) with EXT4_GOING_FLAGS_NOLOGFLUSH (2),
        // from Python's fcntl so the test needs no unsafe code.
        let out = Command::new("python3")
            .args([
                "-c",
                "import fcntl, os, struct, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.ioctl(fd, 0x8004587D, struct.pack('I', 2))",
            ])
            .arg(&self.mount)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "EXT4_IOC_SHUTDOWN: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.umount();
        self.mount();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .stderr(Stdio::null())
            .status();
    }
}

/// Skips a test that needs root and mounts, loudly; fails instead where every test must run.
pub(crate) fn require_mounts(test: &str) -> bool {
    if can_mount() {
        return true;
    }
    assert!(
        std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
        "{test} needs root and mount(2), and SIGIL_TEST_REQUIRE_ALL is set"
    );
    eprintln!("\n!!! SKIPPED {test}: it needs root and mount(2) (loop-mounted filesystems) !!!\n");
    false
}

/// 64 clients issuing as fast as they can over 8 attested mTLS connections, remembering every
/// credential they receive (kind, serial or jti) and counting refusals by code.
pub(crate) struct Load {
    pub(crate) received: Arc<Mutex<Vec<(String, String)>>>,
    pub(crate) refused: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The identity the load issues for.
pub(crate) const LOAD_ID: &str = "spiffe://example.org/load/worker";

impl Load {
    /// Creates the identity (if missing), attests 8 workloads and starts 64 issuers. With
    /// `until_gone`, an issuer stops at its first error (the broker was killed); otherwise
    /// issuers count errors and go on until [`Load::stop`].
    pub(crate) async fn start(data: &Path, url: &str, until_gone: bool) -> Load {
        let bundle = std::fs::read(data.join("bundle.pem")).unwrap();
        let mut adm = admin(data, url);
        let _ = adm
            .create_identity(pb::CreateIdentityRequest {
                spiffe_id: LOAD_ID.into(),
                owner: "team".into(),
                purpose: "durability test".into(),
                entitlements: Some(pb::Entitlements {
                    kinds: vec!["x509".into(), "jwt".into()],
                    max_ttl_seconds: 3600,
                    audiences: vec!["db".into()],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        let roots = transport::roots_from_pem(&bundle).unwrap();
        // `url` may name several replicas: the issuers move on when one goes.
        let targets = Arc::new(sigil_sdk::Targets::parse(url).unwrap());
        let mut clients: Vec<BrokerClient<sigil_sdk::Failover>> = Vec::new();
        for _ in 0..8 {
            let token = adm
                .create_join_token(pb::CreateJoinTokenRequest {
                    id_or_spiffe_id: LOAD_ID.into(),
                    ttl_seconds: 0,
                })
                .await
                .unwrap()
                .into_inner()
                .token;
            let w = WorkloadClient::new(ClientConfig::new(url.to_owned(), bundle.clone())).unwrap();
            let c = w
                .attest(
                    Evidence::JoinToken(token.into()),
                    SvidOptions::default(),
                    &[],
                )
                .await
                .unwrap();
            let slot = Arc::new(ClientCertSlot::default());
            slot.set(
                c.svid.cert_chain.clone(),
                c.svid.private_key_der().expose_secret(),
            )
            .unwrap();
            let tls = transport::client_config(roots.clone(), Some(slot)).unwrap();
            clients.push(BrokerClient::new(
                sigil_sdk::Failover::new(targets.clone(), tls, Duration::from_secs(5)).unwrap(),
            ));
        }
        let csrs: Vec<Vec<u8>> = (0..16)
            .map(|_| sigil_pki::csr::request_for(&sigil_pki::EcKey::generate().unwrap()).unwrap())
            .collect();
        let received: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let refused: Arc<Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..64 {
            let mut c = clients[i % clients.len()].clone();
            let (received, refused, stop) = (received.clone(), refused.clone(), stop.clone());
            let csr = csrs[i % csrs.len()].clone();
            tasks.push(tokio::spawn(async move {
                for n in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let got = if (n + i as u64).is_multiple_of(4) {
                        c.mint_x509_svid(pb::MintX509SvidRequest {
                            csr: csr.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|r| ("x509".to_owned(), r.into_inner().svid.unwrap().serial))
                    } else {
                        c.mint_jwt_svid(pb::MintJwtSvidRequest {
                            request: Some(pb::JwtRequest {
                                audiences: vec!["db".into()],
                                ..Default::default()
                            }),
                        })
                        .await
                        .map(|r| ("jwt".to_owned(), r.into_inner().svid.unwrap().jti))
                    };
                    match got {
                        Ok(x) => received.lock().unwrap().push(x),
                        Err(_) if until_gone => return,
                        Err(s) => {
                            *refused
                                .lock()
                                .unwrap()
                                .entry(format!("{:?}", s.code()))
                                .or_default() += 1;
                            // Do not spin on a refusing broker.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            }));
        }
        Load {
            received,
            refused,
            stop,
            tasks,
        }
    }

    /// How many credentials were received so far.
    pub(crate) fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Stops the issuers (or waits for them to notice the broker is gone) and returns every
    /// credential received.
    pub(crate) async fn stop(self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("issuers stop");
        }
        self.received.lock().unwrap().clone()
    }
}

/// Asserts that every credential in `received` has an allowing audit entry and a ledger record
/// on the broker at `url`.
pub(crate) async fn all_on_record(data: &Path, url: &str, received: &[(String, String)]) {
    let mut adm = admin(data, url);
    let mut audited = std::collections::BTreeSet::new();
    let mut from = 1;
    loop {
        let page = adm
            .list_audit(pb::ListAuditRequest {
                from_sequence: from,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        for e in &page {
            let v: serde_json::Value = serde_json::from_str(e).unwrap();
            if v["decision"] == "allow" {
                for k in ["serial", "jti"] {
                    if let Some(s) = v["detail"][k].as_str() {
                        audited.insert(s.to_owned());
                    }
                }
            }
        }
        if page.len() < 1000 {
            break;
        }
        from += 1000;
    }
    let mut missing_ledger = 0;
    for (kind, cid) in received {
        assert!(
            audited.contains(cid),
            "{kind} {cid} was received by a client but has no audit entry"
        );
        match adm
            .get_credential(pb::GetCredentialRequest {
                credential_id: cid.clone(),
            })
            .await
        {
            Ok(r) => assert_eq!(r.into_inner().kind, *kind),
            Err(_) => missing_ledger += 1,
        }
    }
    assert_eq!(
        missing_ledger, 0,
        "every received credential is in the ledger"
    );
}
