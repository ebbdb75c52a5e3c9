//! A real peer for the X.509 comparison: CloudFlare's cfssl (`cfssl serve`, Debian package
//! `golang-cfssl`), driven with the same load generator and the same CSRs over its HTTP sign API.
//! cfssl signs and returns; it stores nothing and speaks plain HTTP, so the comparison
//! flatters it against a broker that commits every certificate durably over TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::args::BenchArgs;
use super::driver::{Figures, OpError, drive};

/// A running `cfssl serve` on loopback.
pub(super) struct Cfssl {
    child: tokio::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Cfssl {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Starts cfssl with a fresh P-256 CA, or says why it cannot.
pub(super) async fn start_cfssl() -> Result<Cfssl> {
    let bin = which("cfssl")
        .ok_or_else(|| anyhow!("cfssl is not installed (Debian: apt-get install golang-cfssl)"))?;
    let dir = tempfile::tempdir()?;
    let now = std::time::SystemTime::now();
    let td: sigil_pki::TrustDomain = "peer.bench.test".parse().map_err(|e| anyhow!("{e}"))?;
    let key = sigil_pki::EcKey::generate()?;
    let key_pem = key.to_pkcs8_pem()?;
    let ca = sigil_pki::CertificateAuthority::new_self_signed(
        sigil_pki::CaRole::Root,
        &td,
        key,
        now,
        Duration::from_secs(86400),
    )?;
    std::fs::write(
        dir.path().join("ca.pem"),
        sigil_pki::certs_to_pem([ca.cert()]),
    )?;
    sigil_broker::fsutil::write_atomic(
        &dir.path().join("ca-key.pem"),
        key_pem.expose_secret(),
        0o600,
    )?;
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"signing":{"default":{"expiry":"10m","usages":["digital signature","server auth","client auth"]}}}"#,
    )?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let child = tokio::process::Command::new(bin)
        .current_dir(dir.path())
        .args([
            "serve",
            "-address",
            "127.0.0.1",
            "-port",
            &port.to_string(),
            "-ca",
            "ca.pem",
            "-ca-key",
            "ca-key.pem",
            "-config",
            "config.json",
            // Warnings only: logging every request would be a handicap ours does not carry.
            "-loglevel",
            "2",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting cfssl serve")?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(Cfssl {
                child,
                addr,
                _dir: dir,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("cfssl serve did not start listening within 5s")
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Drives cfssl's sign API with the CSRs the x509 scenario uses.
pub(super) async fn drive_cfssl(cfssl: &Cfssl, csrs: &[Vec<u8>], a: &BenchArgs) -> Result<Figures> {
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        csrs.iter()
            .map(|der| {
                let pem = pem_csr(der);
                Bytes::from(serde_json::json!({ "certificate_request": pem }).to_string())
            })
            .collect(),
    );
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(a.concurrency)
            .build(http);
    let url: hyper::Uri = format!("http://{}/api/v1/cfssl/sign", cfssl.addr).parse()?;
    // One request first, so a broken peer is an error rather than a table of failures.
    let first = sign(&client, &url, bodies[0].clone()).await;
    if let Err(OpError::Failed(why)) = first {
        bail!("cfssl refused the first request: {why}");
    }
    Ok(
        drive("cfssl", a, None, (a.warmup, a.duration), move |_, n| {
            let client = client.clone();
            let url = url.clone();
            let body = bodies[n as usize % bodies.len()].clone();
            async move { sign(&client, &url, body).await }
        })
        .await,
    )
}

async fn sign(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &hyper::Uri,
    body: Bytes,
) -> Result<(), OpError> {
    let req = hyper::Request::post(url.clone())
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| OpError::Failed(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| OpError::Failed(format!("http: {e}")))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| OpError::Failed(format!("http: {e}")))?
        .to_bytes();
    if !status.is_success() {
        return Err(OpError::Failed(format!("HTTP {status}")));
    }
    // A signed certificate, not just a 200.
    if !bytes
        .windows(b"BEGIN CERTIFICATE".len())
        .any(|w| w == b"BEGIN CERTIFICATE")
    {
        return Err(OpError::Failed("no certificate in the reply".into()));
    }
    Ok(())
}

fn pem_csr(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE REQUEST-----\n");
    out
}
