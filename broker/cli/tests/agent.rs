//! `sigil agent` end to end: the real binary against a real broker, writing files a workload
//! in any language can use — here a Python mTLS server and client with no Sigil code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use sigil_proto::v1 as pb;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from the agent's health listener: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

fn metric(port: u16, name: &str) -> u64 {
    let (_, body) = http_get(port, "/metrics").unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in {body}"))
        .trim()
        .parse()
        .unwrap()
}

/// The serial of the leaf in a PEM chain file (its DER, hashed: enough to tell certificates
/// apart).
fn leaf_id(path: &Path) -> Option<String> {
    let pem = std::fs::read_to_string(path).ok()?;
    let b64: String = pem
        .split("-----END CERTIFICATE-----")
        .next()?
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b64.as_bytes());
    Some(sigil_pki::ids::to_hex(d.as_ref()))
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

struct Broker {
    proc: Proc,
    url: String,
    port: u16,
}

fn start_broker(tmp: &Path, data: &Path, port: u16) -> Broker {
    let listen = format!("127.0.0.1:{port}");
    let proc = Proc::spawn(
        &[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
            "--http-listen",
            "off",
        ],
        tmp,
        &[],
    );
    let line = proc.wait_for("sigil broker listening on ");
    let url = line.rsplit(' ').next().unwrap().to_owned();
    Broker { proc, url, port }
}

async fn identity(
    admin: &mut sigil_proto::v1::admin_client::AdminClient<sigil_sdk::Failover>,
    name: &str,
    max_ttl: u32,
) {
    admin
        .create_identity(pb::CreateIdentityRequest {
            spiffe_id: format!("spiffe://example.org/{name}"),
            owner: "platform".into(),
            purpose: "agent test".into(),
            entitlements: Some(pb::Entitlements {
                kinds: vec!["x509".into(), "jwt".into()],
                audiences: vec!["db".into()],
                max_ttl_seconds: max_ttl,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn token_into(
    admin: &mut sigil_proto::v1::admin_client::AdminClient<sigil_sdk::Failover>,
    name: &str,
    file: &Path,
) {
    let t = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            id_or_spiffe_id: format!("spiffe://example.org/{name}"),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    sigil_broker::fsutil::write_atomic(file, t.as_bytes(), 0o600).unwrap();
}

fn agent(tmp: &Path, url: &str, bundle: &Path, token: &Path, out: &Path, more: &[&str]) -> Proc {
    let mut args = vec![
        "agent",
        "--broker",
        url,
        "--trust-bundle",
        bundle.to_str().unwrap(),
        "--join-token-file",
        token.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    let p = Proc::spawn(&args, tmp, &[]);
    p.wait_for("sigil agent: credentials in");
    p
}

const PYTHON_MTLS: &str = r#"
import hashlib, json, os, socket, ssl, sys, threading, time
srv_dir, cli_dir, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])

def context(side, d):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(os.path.join(d, "svid.pem"), os.path.join(d, "svid.key"))
    ctx.load_verify_locations(os.path.join(d, "bundle.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # SPIFFE: the peer is named by its URI SAN, not a host name
    return ctx

class Reloading:
    # A context rebuilt when the agent renames new files in; until the new pair loads
    # (the key may be new and the certificate not yet), the last good one stays.
    def __init__(self, side, d):
        self.side, self.d, self.stamp, self.ctx = side, d, None, None
    def get(self):
        st = os.stat(os.path.join(self.d, "svid.pem")).st_mtime_ns, os.stat(os.path.join(self.d, "svid.key")).st_mtime_ns
        if st != self.stamp:
            try:
                self.ctx, self.stamp = context(self.side, self.d), st
            except ssl.SSLError:
                pass
        return self.ctx

server = Reloading("server", srv_dir)
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(64)
port = lst.getsockname()[1]
def serve():
    while True:
        conn, _ = lst.accept()
        try:
            with server.get().wrap_socket(conn, server_side=True) as t:
                t.sendall(t.recv(16))
        except Exception:
            conn.close()
threading.Thread(target=serve, daemon=True).start()

client = Reloading("client", cli_dir)
ok, failed, seen, errors = 0, 0, set(), []
end = time.time() + seconds
while time.time() < end:
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with client.get().wrap_socket(raw) as t:
                t.sendall(b"ping")
                assert t.recv(16) == b"ping"
                seen.add(hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest())
        ok += 1
    except Exception as e:
        failed += 1
        errors.append(repr(e))
    time.sleep(0.01)
print(json.dumps({"ok": ok, "failed": failed, "server_certs": len(seen), "errors": errors[:5]}))
"#;

#[test]
fn the_agent_keeps_files_fresh_through_rotation_revocation_and_a_broker_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let port = free_port();
    let mut broker = start_broker(tmp.path(), &data, port);
    let bundle = data.join("bundle.pem");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _rt = rt.enter();
    let mut admin = admin(&data, &broker.url);
    rt.block_on(async {
        identity(&mut admin, "web", 4).await;
        identity(&mut admin, "client", 3600).await;
    });
    let (web_token, client_token) = (
        tmp.path().join("web.token"),
        tmp.path().join("client.token"),
    );
    rt.block_on(async {
        token_into(&mut admin, "web", &web_token).await;
        token_into(&mut admin, "client", &client_token).await;
    });

    // The server's agent: 4 s certificates (renewed every ~2 s), a hook that logs each change,
    // health and metrics.
    let web = tmp.path().join("web");
    let hook_log = tmp.path().join("hook.log");
    let health = free_port();
    let exec = format!("echo \"$SIGIL_SVID_SERIAL\" >> {}", hook_log.display());
    let health_addr = format!("127.0.0.1:{health}");
    let _web_agent = agent(
        tmp.path(),
        &broker.url,
        &bundle,
        &web_token,
        &web,
        &[
            "--ttl",
            "4s",
            "--exec",
            &exec,
            "--health-listen",
            &health_addr,
        ],
    );
    // The files, atomically in place with the modes spiffe-helper users expect.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&web), 0o700);
    assert_eq!(mode(&web.join("svid.key")), 0o600);
    assert_eq!(mode(&web.join("svid.pem")), 0o644);
    assert_eq!(mode(&web.join("bundle.pem")), 0o644);
    assert!(
        std::fs::read_to_string(web.join("bundle.json"))
            .unwrap()
            .contains("jwt-svid")
    );
    let chain = std::fs::read_to_string(web.join("svid.pem")).unwrap();
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf then intermediate"
    );
    // openssl accepts the chain against the bundle.
    let v = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(web.join("bundle.pem"))
        .arg("-untrusted")
        .arg(web.join("svid.pem"))
        .arg(web.join("svid.pem"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    assert_eq!(http_get(health, "/readyz").unwrap().0, 200);
    assert_eq!(http_get(health, "/healthz").unwrap().0, 200);

    // The client's agent, with a JWT-SVID for `db` and a pid to signal on every change.
    let client = tmp.path().join("client");
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let pid_file = tmp.path().join("sleeper.pid");
    std::fs::write(&pid_file, sleeper.id().to_string()).unwrap();
    let mut client_agent = agent(
        tmp.path(),
        &broker.url,
        &bundle,
        &client_token,
        &client,
        &[
            "--audience",
            "db",
            "--signal",
            "USR2",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
    );
    let jwt = std::fs::read_to_string(client.join("jwt-db.txt")).unwrap();
    assert_eq!(jwt.trim().split('.').count(), 3, "a JWT in jwt-db.txt");
    assert_eq!(mode(&client.join("jwt-db.txt")), 0o600);

    // A Python server and client (the ssl module, no Sigil code) on the agents' files: zero
    // failed handshakes while the server's certificate rotates at least three times.
    let py = std::process::Command::new("python3")
        .arg("-c")
        .arg(PYTHON_MTLS)
        .arg(&web)
        .arg(&client)
        .arg("7.5")
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    eprintln!("python mTLS through rotations: {r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert!(r["ok"].as_u64().unwrap() > 50, "{r}");
    assert!(
        r["server_certs"].as_u64().unwrap() >= 4,
        "three rotations seen: {r}"
    );

    // The hook ran once per change of the files, never on the first write.
    let writes = metric(health, "sigil_agent_writes_total");
    let runs = metric(health, "sigil_agent_hook_runs_total");
    let logged = std::fs::read_to_string(&hook_log).unwrap().lines().count() as u64;
    assert!(writes >= 4, "renewed at about half of 4 s: {writes} writes");
    assert_eq!(runs, writes - 1);
    assert!(
        logged == runs || logged + 1 == runs,
        "{logged} lines, {runs} runs"
    );
    assert_eq!(metric(health, "sigil_agent_hook_failures_total"), 0);

    // Revocation: a fresh token where the agent looks, then the identity revoked → new files
    // within a second of the revoke call, and the signal sent once.
    let before = leaf_id(&client.join("svid.pem")).unwrap();
    rt.block_on(token_into(&mut admin, "client", &client_token));
    let t = Instant::now();
    rt.block_on(async {
        admin
            .revoke_identity(pb::RevokeIdentityRequest {
                id_or_spiffe_id: "spiffe://example.org/client".into(),
                reason: "agent test".into(),
                ..Default::default()
            })
            .await
            .unwrap()
    });
    wait_until("new files after revocation", Duration::from_secs(1), || {
        leaf_id(&client.join("svid.pem")).is_some_and(|id| id != before)
    });
    wait_until(
        "a new JWT-SVID after revocation",
        Duration::from_secs(1),
        || std::fs::read_to_string(client.join("jwt-db.txt")).unwrap() != jwt,
    );
    eprintln!("revocation → new files in {:?}", t.elapsed());
    // USR2's default action ends `sleep`: the signal reached the pid in the file.
    wait_until("the signal", Duration::from_secs(2), || {
        sleeper.try_wait().unwrap().is_some()
    });

    // The broker dies: the files stay as they are and the agent keeps running.
    let kept = std::fs::read(client.join("svid.pem")).unwrap();
    let _ = broker.proc.child.kill();
    let _ = broker.proc.child.wait();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(std::fs::read(client.join("svid.pem")).unwrap(), kept);
    assert!(client.join("svid.key").exists());
    assert!(
        client_agent.child.try_wait().unwrap().is_none(),
        "the agent runs on"
    );
    // It comes back: the agent reconnects by itself and follows the next revocation.
    broker = start_broker(tmp.path(), &data, broker.port);
    let mut admin = common::admin(&data, &broker.url);
    rt.block_on(token_into(&mut admin, "client", &client_token));
    let before = leaf_id(&client.join("svid.pem")).unwrap();
    rt.block_on(async {
        admin
            .revoke_identity(pb::RevokeIdentityRequest {
                id_or_spiffe_id: "spiffe://example.org/client".into(),
                reason: "after the outage".into(),
                ..Default::default()
            })
            .await
            .unwrap()
    });
    let took = wait_until(
        "new files after the broker returned",
        Duration::from_secs(30),
        || leaf_id(&client.join("svid.pem")).is_some_and(|id| id != before),
    );
    eprintln!("after the outage, revocation → new files in {took:?}");
    let _ = sleeper.kill();
}

#[test]
fn agent_once_writes_and_exits_and_says_why_when_it_cannot() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let broker = start_broker(tmp.path(), &data, free_port());
    let bundle = data.join("bundle.pem");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _rt = rt.enter();
    let mut admin = admin(&data, &broker.url);
    let token = tmp.path().join("t");
    rt.block_on(async {
        identity(&mut admin, "batch", 3600).await;
        token_into(&mut admin, "batch", &token).await;
    });
    // The keys of a config file, as in a ConfigMap; a flag overrides one.
    let out = tmp.path().join("creds");
    let conf = tmp.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "broker = \"https://127.0.0.1:1\"\ntrust_bundle = {:?}\njoin_token_file = {:?}\nout = {:?}\naudiences = [\"db\"]\ncert_file_name = \"tls.crt\"\nkey_file_name = \"tls.key\"\njwt_file_name = \"token\"\n",
            bundle, token, out
        ),
    )
    .unwrap();
    let once = |extra: &[&str]| {
        let mut args = vec!["agent", "--once", "--config", conf.to_str().unwrap()];
        args.extend_from_slice(extra);
        sigil(&args, tmp.path())
    };
    let o = once(&["--broker", &broker.url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["tls.crt", "tls.key", "bundle.pem", "token"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // The token is spent: exit non-zero, saying so.
    let o = once(&["--broker", &broker.url]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("used"), "{err}");
    // No broker there (the file's address): unavailable, exit 5.
    let o = once(&[]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A typo in the file is named.
    std::fs::write(&conf, "brokr = \"x\"\n").unwrap();
    let o = once(&[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("brokr"));
    let _keep: PathBuf = out;
}

/// A Kubernetes-style projected token for `key`: ES256, issuer `K8S_ISS`, audience `sigil`,
/// service account `payments/api`.
fn projected_token(key: &sigil_pki::EcKey, kid: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    let claims = serde_json::json!({
        "iss": K8S_ISS, "sub": "system:serviceaccount:payments:api", "aud": ["sigil"],
        "iat": now, "nbf": now, "exp": now + 600,
        "kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "api", "uid": "5c1e"}},
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = key.sign_es256(signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64(&sig))
}

const K8S_ISS: &str = "https://kubernetes.default.svc.cluster.local";

/// The agent on a projected service-account token file, as in a Kubernetes pod: it reads the
/// file again at every attestation (the kubelet rewrites it), keeps its files while the file
/// holds nothing usable, and writes them with the owner and modes asked for.
#[test]
fn the_agent_attests_with_a_projected_token_file_and_reads_it_again_each_time() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    // A cluster issuer whose keys Sigil reads from a file.
    let key = sigil_pki::EcKey::generate().unwrap();
    let p = key.public_point();
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let jwks = tmp.path().join("cluster-jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "c1",
            "x": b64(&p[1..33]), "y": b64(&p[33..65])}]})
        .to_string(),
    )
    .unwrap();
    let mut toml = std::fs::read_to_string(data.join("sigil.toml")).unwrap();
    toml.push_str(&format!(
        "\n[[oidc]]\nname = \"cluster\"\npreset = \"kubernetes\"\nissuer = \"{K8S_ISS}\"\naudiences = [\"sigil\"]\njwks_file = {jwks:?}\nalgorithms = [\"ES256\"]\n"
    ));
    std::fs::write(data.join("sigil.toml"), toml).unwrap();
    let broker = start_broker(tmp.path(), &data, free_port());
    let bundle = data.join("bundle.pem");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _rt = rt.enter();
    let mut admin = admin(&data, &broker.url);
    rt.block_on(async {
        admin
            .create_identity(pb::CreateIdentityRequest {
                spiffe_id: "spiffe://example.org/k8s/payments/api".into(),
                owner: "payments".into(),
                purpose: "agent on a projected token".into(),
                selectors: vec![
                    format!("oidc:iss:{K8S_ISS}"),
                    "k8s:ns:payments".into(),
                    "k8s:sa:api".into(),
                ],
                entitlements: Some(pb::Entitlements {
                    kinds: vec!["x509".into()],
                    max_ttl_seconds: 3600,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let token = tmp.path().join("token");
    std::fs::write(&token, projected_token(&key, "c1")).unwrap();
    let out = tmp.path().join("creds");
    let _agent = Proc::spawn(
        &[
            "agent",
            "--broker",
            &broker.url,
            "--trust-bundle",
            bundle.to_str().unwrap(),
            "--oidc-token-file",
            token.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--owner-uid",
            "65534",
            "--owner-gid",
            "65534",
            "--file-mode",
            "0640",
        ],
        tmp.path(),
        &[],
    );
    let cert = out.join("svid.pem");
    wait_until("the first certificate", Duration::from_secs(20), || {
        leaf_id(&cert).is_some()
    });
    let first = leaf_id(&cert).unwrap();
    let uri = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&uri.stdout).contains("spiffe://example.org/k8s/payments/api"),
        "{}",
        String::from_utf8_lossy(&uri.stdout)
    );
    // Owner and modes as asked (the key stays 0600 whatever --file-mode says).
    use std::os::unix::fs::MetadataExt as _;
    for (f, mode) in [
        ("svid.pem", 0o640),
        ("bundle.pem", 0o640),
        ("svid.key", 0o600),
    ] {
        let m = std::fs::metadata(out.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{f} owner");
        assert_eq!(m.permissions().mode() & 0o777, mode, "{f} mode");
    }

    // The file stops holding a usable token, and the identity is revoked: the agent cannot
    // attest again, and keeps the files it has.
    std::fs::write(&token, "not a token").unwrap();
    let out_s = sigil(
        &[
            "revoke",
            "identity",
            "spiffe://example.org/k8s/payments/api",
            "--data-dir",
            data.to_str().unwrap(),
            "--broker",
            &broker.url,
        ],
        tmp.path(),
    );
    assert!(
        out_s.status.success(),
        "{}",
        String::from_utf8_lossy(&out_s.stderr)
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        leaf_id(&cert).as_deref(),
        Some(first.as_str()),
        "the files are kept"
    );
    // The kubelet writes a fresh token: the agent reads it at its next attempt.
    std::fs::write(&token, projected_token(&key, "c1")).unwrap();
    let took = wait_until(
        "a new certificate from the rewritten token",
        Duration::from_secs(40),
        || leaf_id(&cert).is_some_and(|l| l != first),
    );
    eprintln!(
        "agent on a projected token: new certificate {:.1} s after the token file was rewritten",
        took.as_secs_f64()
    );
    drop(broker);
}
