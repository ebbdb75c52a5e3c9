//! End-to-end test harness: a real broker on loopback (real TLS, a real store file in a temp
//! dir), driven through the real SDK and the real admin API.
//!
//! Layout:
//! - [`TestBroker`]: init a data dir, start the broker in-process on `127.0.0.1:0`, restart it,
//!   stop it; helpers to create identities and join tokens and to read the audit log.
//! - [`raw`]: hand-built gRPC clients for requests the SDK would never send (greedy CSRs).
//! - [`openssl`]: cross-checks with the `openssl` command line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod fuzz;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sigil_broker::clock::{Clock, SystemClock};
use sigil_broker::seal::MasterKey;
use sigil_broker::server::{RunningBroker, StartOptions};
use sigil_broker::store::FaultSwitch;
use sigil_proto::v1 as pb;
use sigil_proto::v1::admin_client::AdminClient;
use sigil_sdk::{ClientConfig, Credentials, Evidence, JwtRequest, SvidOptions, WorkloadClient};

/// The trust domain of every test broker.
pub const TD: &str = "example.org";

/// A broker with its own data dir.
#[derive(Debug)]
pub struct TestBroker {
    /// Keeps the temp dir alive.
    pub dir: tempfile::TempDir,
    /// The data dir inside it.
    pub data: PathBuf,
    /// The master key it was created with.
    pub master: MasterKey,
    /// The clock it runs on.
    pub clock: Arc<dyn Clock>,
    /// The clock its SDK clients run on, when the test shares one with the broker.
    sdk_clock: Option<Arc<dyn sigil_sdk::clock::Clock>>,
    /// Flip to make the store's disk writes fail.
    pub faults: FaultSwitch,
    running: Option<RunningBroker>,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The trust bundle (PEM).
    pub bundle_pem: Vec<u8>,
}

impl TestBroker {
    /// A new broker on the system clock.
    pub async fn start() -> Self {
        Self::start_with_clock(Arc::new(SystemClock)).await
    }

    /// A new broker on `clock`.
    pub async fn start_with_clock(clock: Arc<dyn Clock>) -> Self {
        Self::start_configured(clock, |_| {}).await
    }

    /// A new broker whose clients (from [`TestBroker::workload`], and so `attested` and any
    /// `Source` built on them) share `clock` with it: time moves only when the test moves it.
    pub async fn start_on(
        clock: &SharedClock,
        edit: impl FnOnce(&mut sigil_broker::config::Config),
    ) -> Self {
        let mut b = Self::start_configured(Arc::new(clock.clone()), edit).await;
        b.sdk_clock = Some(clock.0.clone());
        b
    }

    /// A new broker on `clock` whose config `edit` changes before it starts. Set `RUST_LOG`
    /// to see its logs.
    pub async fn start_configured(
        clock: Arc<dyn Clock>,
        edit: impl FnOnce(&mut sigil_broker::config::Config),
    ) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let master = MasterKey::generate();
        sigil_broker::init::init(
            sigil_broker::init::InitOptions {
                data_dir: data.clone(),
                trust_domain: TD.parse().expect("td"),
                listen: Some(([127, 0, 0, 1], 0).into()),
                http_listen: Some(Some(([127, 0, 0, 1], 0).into())),
                operator: "admin".into(),
                operator_ttl: Duration::from_secs(365 * 86400),
                master_key: Some(master.clone()),
                store: None,
                store_ca_file: None,
                server_names: Vec::new(),
            },
            clock.as_ref(),
        )
        .await
        .expect("init");
        let bundle_pem = std::fs::read(data.join("bundle.pem")).expect("bundle.pem");
        let mut cfg = sigil_broker::config::Config::load(&data).expect("config");
        edit(&mut cfg);
        std::fs::write(data.join("sigil.toml"), cfg.to_toml()).expect("write config");
        let mut b = TestBroker {
            dir,
            data,
            master,
            clock,
            sdk_clock: None,
            faults: FaultSwitch::default(),
            running: None,
            url: String::new(),
            bundle_pem,
        };
        b.boot().await.expect("start");
        b
    }

    /// Starts the broker on the existing data dir with `master`.
    pub async fn boot_with(
        &mut self,
        master: MasterKey,
    ) -> Result<(), sigil_broker::server::StartError> {
        let cfg = sigil_broker::config::Config::load(&self.data).expect("config");
        let running = sigil_broker::server::start(
            cfg,
            master,
            StartOptions {
                clock: self.clock.clone(),
                store_faults: Some(self.faults.clone()),
            },
        )
        .await?;
        self.url = running.url();
        self.running = Some(running);
        Ok(())
    }

    async fn boot(&mut self) -> Result<(), sigil_broker::server::StartError> {
        self.boot_with(self.master.clone()).await
    }

    /// Stops the broker (clean shutdown).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Stops and starts again on the same data dir (a new port).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.boot().await.expect("restart");
    }

    /// Starts again on the port it had before (clients keep their broker URL).
    pub async fn start_again_on_same_port(&mut self) {
        let addr: std::net::SocketAddr = self
            .url
            .trim_start_matches("https://")
            .parse()
            .expect("url");
        let mut cfg = sigil_broker::config::Config::load(&self.data).expect("config");
        cfg.listen = addr;
        std::fs::write(self.data.join("sigil.toml"), cfg.to_toml()).expect("write config");
        self.boot().await.expect("restart on the same port");
    }

    /// The broker's state, for driving it directly (rotation ticks, pruning).
    pub fn broker(&self) -> Arc<sigil_broker::Broker> {
        self.running().broker().clone()
    }

    /// The running broker.
    pub fn running(&self) -> &RunningBroker {
        self.running.as_ref().expect("broker is running")
    }

    /// An admin client with the operator credential `init` wrote.
    pub fn admin(&self) -> AdminClient<sigil_sdk::Failover> {
        let cert = std::fs::read(self.data.join("admin/admin.crt")).expect("admin cert");
        let key = std::fs::read(self.data.join("admin/admin.key")).expect("admin key");
        sigil_sdk::connect_admin(&self.url, &self.bundle_pem, &cert, &key).expect("admin client")
    }

    /// Registers `spiffe://example.org/<path>` (x509 + jwt, audience `db`, scope `read`,
    /// DNS `app.internal`, max TTL 1h), after `edit` has had its say.
    pub async fn identity(
        &self,
        path: &str,
        edit: impl FnOnce(&mut pb::CreateIdentityRequest),
    ) -> pb::Identity {
        let mut req = pb::CreateIdentityRequest {
            spiffe_id: format!("spiffe://{TD}/{path}"),
            owner: "team-test".into(),
            purpose: "end-to-end test".into(),
            labels: Default::default(),
            selectors: Vec::new(),
            entitlements: Some(pb::Entitlements {
                kinds: vec!["x509".into(), "jwt".into()],
                max_ttl_seconds: 3600,
                audiences: vec!["db".into()],
                scopes: vec!["read".into()],
                dns_names: vec!["app.internal".into()],
                approval_scopes: vec![],
            }),
            expires_in_seconds: 0,
        };
        edit(&mut req);
        self.admin()
            .create_identity(req)
            .await
            .expect("create identity")
            .into_inner()
    }

    /// A join token for `spiffe_id`.
    pub async fn join_token(&self, spiffe_id: &str) -> String {
        self.admin()
            .create_join_token(pb::CreateJoinTokenRequest {
                id_or_spiffe_id: spiffe_id.into(),
                ttl_seconds: 0,
            })
            .await
            .expect("join token")
            .into_inner()
            .token
    }

    /// A fresh SDK client.
    pub fn workload(&self) -> WorkloadClient {
        let mut cfg = ClientConfig::new(self.url.clone(), self.bundle_pem.clone());
        if let Some(c) = &self.sdk_clock {
            cfg = cfg.with_clock(c.clone());
        }
        WorkloadClient::new(cfg).expect("workload client")
    }

    /// Attests as `spiffe_id` with a fresh join token, asking for JWTs for `audiences`.
    pub async fn attested(
        &self,
        spiffe_id: &str,
        audiences: &[&str],
    ) -> (WorkloadClient, Credentials) {
        let w = self.workload();
        let token = self.join_token(spiffe_id).await;
        let jwts: Vec<JwtRequest> = audiences.iter().map(|a| JwtRequest::audience(*a)).collect();
        let creds = w
            .attest(
                Evidence::JoinToken(token.into()),
                SvidOptions::default(),
                &jwts,
            )
            .await
            .expect("attest");
        (w, creds)
    }

    /// Every audit entry, parsed.
    pub async fn audit(&self) -> Vec<Value> {
        let entries = self
            .admin()
            .list_audit(pb::ListAuditRequest {
                from_sequence: 1,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner()
            .entries;
        entries
            .iter()
            .map(|e| serde_json::from_str(e).expect("audit JSON"))
            .collect()
    }

    /// Audit entries with this action.
    pub async fn audit_for(&self, action: &str) -> Vec<Value> {
        self.audit()
            .await
            .into_iter()
            .filter(|e| e["action"] == action)
            .collect()
    }
}

/// One hand-moved clock shared by a broker ([`TestBroker::start_on`]) and its SDK clients:
/// certificates are minted, renewed, checked in TLS handshakes and expire on it, so tests of
/// renewal and expiry jump through time instead of waiting for it.
#[derive(Debug, Clone)]
pub struct SharedClock(pub Arc<sigil_sdk::clock::ManualClock>);

impl SharedClock {
    /// A clock reading the machine's time now (and then moving only when told to).
    pub fn starting_now() -> Self {
        SharedClock(Arc::new(sigil_sdk::clock::ManualClock::new(
            std::time::SystemTime::now(),
        )))
    }

    /// Moves time forward, waking every SDK schedule that falls due.
    pub fn advance(&self, by: Duration) {
        self.0.advance(by);
    }

    /// Moves time to `unix` seconds (never backwards).
    pub fn advance_to_unix(&self, unix: f64) {
        self.0
            .advance_to(std::time::UNIX_EPOCH + Duration::from_secs_f64(unix.max(0.0)));
    }

    /// Now, in seconds since the Unix epoch.
    pub fn unix_f64(&self) -> f64 {
        sigil_sdk::clock::Clock::now(&*self.0)
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}

impl Clock for SharedClock {
    fn now(&self) -> std::time::SystemTime {
        sigil_sdk::clock::Clock::now(&*self.0)
    }
}

/// The next event from a `Source` that `want` accepts, within `within` (panics otherwise, or
/// if the stream ends).
pub async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<sigil_sdk::SourceEvent>,
    within: Duration,
    want: impl Fn(&sigil_sdk::SourceEvent) -> bool,
) -> sigil_sdk::SourceEvent {
    tokio::time::timeout(within, async {
        loop {
            match rx.recv().await {
                Ok(e) if want(&e) => return e,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .expect("the event arrived in time")
}

impl TestBroker {
    /// `GET path` on the broker's HTTP listener (over TLS, verified with the bundle, when the
    /// listener serves TLS); returns the status code and the body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let (status, body) = self.http_get_bytes(path).await;
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// `GET path` returning the raw body.
    pub async fn http_get_bytes(&self, path: &str) -> (u16, Vec<u8>) {
        let addr = self.running().http_addr.expect("the HTTP listener is on");
        let tls = self
            .broker()
            .config()
            .http_tls
            .then_some(self.bundle_pem.as_slice());
        http_get_bytes(addr, path, tls).await
    }
}

/// `GET path` over HTTP/1.1 on loopback, over TLS (server name `localhost`) verified with
/// `tls_roots` (PEM) when given; returns the status code and the body.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    tls_roots: Option<&[u8]>,
) -> (u16, String) {
    let (status, body) = http_get_bytes(addr, path, tls_roots).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `GET path` returning the raw body.
pub async fn http_get_bytes(
    addr: std::net::SocketAddr,
    path: &str,
    tls_roots: Option<&[u8]>,
) -> (u16, Vec<u8>) {
    http_get_with_host(addr, path, &addr.to_string(), tls_roots).await
}

/// `GET path` with the `Host` header a caller (or a proxy) chooses.
pub async fn http_get_with_host(
    addr: std::net::SocketAddr,
    path: &str,
    host: &str,
    tls_roots: Option<&[u8]>,
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut s: Box<dyn Io> = match tls_roots {
        None => Box::new(tcp),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in sigil_pki::certs_from_pem(pem).expect("roots") {
                roots.add(c).expect("root");
            }
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            Box::new(
                tokio_rustls::TlsConnector::from(Arc::new(cfg))
                    .connect(name, tcp)
                    .await
                    .expect("TLS to the HTTP listener"),
            )
        }
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    // A TLS peer may close without close_notify after the response; what was read counts.
    let _ = s.read_to_end(&mut buf).await;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    (status, buf[split + 4..].to_vec())
}

/// The bytes of every file under `dir`, by relative path, to show that something changed
/// nothing on disk.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("prefix").display().to_string();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// Paths whose bytes differ between two snapshots (added, removed or changed).
pub fn changed_files(
    before: &std::collections::BTreeMap<String, Vec<u8>>,
    after: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Vec<String> {
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect()
}

/// Says loudly that part of a test is skipped because a tool is missing — or, when
/// `SIGIL_TEST_REQUIRE_ALL` is set (as `.ci/run` does), fails: CI must not skip.
pub fn skip(why: &str) {
    if std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_some() {
        panic!("SIGIL_TEST_REQUIRE_ALL is set, so this may not be skipped: {why}");
    }
    eprintln!("SKIPPED (loudly): {why}");
}

/// Python tools from PyPI, in virtual environments the tests make once per target dir.
pub mod python {
    use std::path::{Path, PathBuf};

    /// The `python` of a virtual environment under `base` named `name` with `packages`
    /// installed from PyPI, made on first use; `None` (with a message) when there is no
    /// Python or PyPI cannot be reached.
    pub fn venv(base: &Path, name: &str, packages: &[&str]) -> Option<PathBuf> {
        let Some(python) = ["python3", "python"].into_iter().find(|p| {
            std::process::Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        }) else {
            super::skip("no Python on this machine");
            return None;
        };
        let venv = base.join(name);
        let bin = venv.join("bin/python");
        let ready = venv.join(".installed");
        if !ready.exists() {
            let ok = std::process::Command::new(python)
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .is_ok_and(|s| s.success())
                && std::process::Command::new(&bin)
                    .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                    .args(packages)
                    .status()
                    .is_ok_and(|s| s.success());
            if !ok {
                super::skip(&format!(
                    "could not install {packages:?} from PyPI into {}",
                    venv.display()
                ));
                return None;
            }
            std::fs::write(&ready, b"").ok()?;
        }
        Some(bin)
    }
}

/// Hand-built gRPC clients.
pub mod raw {
    use std::sync::Arc;
    use std::time::Duration;

    use sigil_proto::v1::broker_client::BrokerClient;
    use sigil_sdk::X509Svid;
    use sigil_sdk::transport::{self, BrokerTarget, ClientCertSlot};
    use tonic::transport::Channel;

    /// A workload-API client without a client certificate.
    pub fn anon(url: &str, bundle_pem: &[u8]) -> BrokerClient<Channel> {
        let roots = transport::roots_from_pem(bundle_pem).expect("roots");
        let tls = transport::client_config(roots, None).expect("tls");
        BrokerClient::new(
            transport::channel(
                &BrokerTarget::parse(url).expect("url"),
                tls,
                Duration::from_secs(10),
            )
            .expect("channel"),
        )
    }

    /// A workload-API client presenting `svid`.
    pub fn mtls(url: &str, bundle_pem: &[u8], svid: &X509Svid) -> BrokerClient<Channel> {
        let roots = transport::roots_from_pem(bundle_pem).expect("roots");
        let slot = Arc::new(ClientCertSlot::default());
        slot.set(
            svid.cert_chain.clone(),
            svid.private_key_der().expose_secret(),
        )
        .expect("client cert");
        let tls = transport::client_config(roots, Some(slot)).expect("tls");
        BrokerClient::new(
            transport::channel(
                &BrokerTarget::parse(url).expect("url"),
                tls,
                Duration::from_secs(10),
            )
            .expect("channel"),
        )
    }
}

/// The `openssl` command line.
pub mod openssl {
    use std::path::Path;
    use std::process::Command;

    /// Runs `openssl args...` and returns (success, stdout+stderr).
    pub fn run(args: &[&str], cwd: &Path) -> (bool, String) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(cwd)
            .output()
            .expect("the openssl CLI must be installed (apt-get install openssl)");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

/// A tiny mTLS resource server built from an SDK [`sigil_sdk::Source`]: for each connection it
/// reads one line (a JWT-SVID), checks it with the source's [`sigil_sdk::Verifier`] for
/// audience `svc`, and answers `ok <client SPIFFE ID> <client serial>` or `denied <reason>`.
pub mod peer {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use sigil_sdk::{Authorizer, Source};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// Serves until the returned handle is aborted.
    pub async fn serve(
        source: &Source,
        clients: Authorizer,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let cfg = source.server_config(clients).expect("server config");
        let verifier = source.verifier();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let h = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let verifier = verifier.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec());
                    let serial = peer
                        .and_then(|d| {
                            x509_parser::parse_x509_certificate(&d)
                                .ok()
                                .map(|(_, c)| sigil_pki::ids::to_hex(c.raw_serial()))
                        })
                        .unwrap_or_default();
                    let (r, mut w) = tokio::io::split(tls);
                    let mut line = String::new();
                    if BufReader::new(r).read_line(&mut line).await.is_err() {
                        return;
                    }
                    let reply = match verifier.verify_jwt(line.trim(), "svc") {
                        Ok(v) => format!("ok {} {serial}\n", v.claims.sub),
                        Err(e) => format!("denied {e}\n"),
                    };
                    let _ = w.write_all(reply.as_bytes()).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        (addr, h)
    }

    /// One request: a new TLS connection with `cfg`, send `token`, read the reply line.
    pub async fn call(
        addr: SocketAddr,
        cfg: Arc<rustls::ClientConfig>,
        token: &str,
    ) -> Result<String, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name =
            rustls_pki_types::ServerName::try_from("peer.invalid").map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (r, mut w) = tokio::io::split(tls);
        w.write_all(format!("{token}\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        BufReader::new(r)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if line.is_empty() {
            return Err("connection closed without a reply (handshake refused)".into());
        }
        Ok(line.trim().to_owned())
    }
}
