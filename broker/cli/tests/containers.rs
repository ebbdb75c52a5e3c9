//! The deploy files on this machine's Docker Engine, as a user runs them: the image built from
//! deploy/Dockerfile (on a Debian base made here, since no registry can be reached), and
//! deploy/compose.yaml — PostgreSQL, two broker replicas, an agent sidecar and a demo workload
//! serving mutual TLS with the agent's files. Skips loudly where there is no Docker Engine,
//! never where SIGIL_TEST_REQUIRE_ALL is set (CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sigil_proto::v1 as pb;
use sigil_sdk::{ClientConfig, Evidence, SvidOptions, WorkloadClient};

const BASE: &str = "sigil-base:bookworm";
const IMAGE: &str = "sigil-test:latest";
const DEMO_IMAGE: &str = "sigil-demo-test:latest";
const PG_IMAGE: &str = "sigil-test-postgres:latest";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd`, fails the test with its output when it fails, returns its stdout.
fn run(cmd: &mut Command) -> String {
    let o = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(o.status.success(), "{cmd:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn docker_engine(test: &str) -> bool {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    assert!(
        std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
        "{test} needs a Docker Engine, and SIGIL_TEST_REQUIRE_ALL is set"
    );
    eprintln!("\n!!! SKIPPED {test}: no Docker Engine answers `docker info` !!!\n");
    false
}

/// `docker compose` (v2) where it exists, else v1.29's `docker-compose`.
fn compose_cmd() -> Command {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if v2 {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    }
}

/// The base (made once per machine), then the Sigil image with the binary under test, the
/// demo workload and a PostgreSQL taking the official image's variables.
fn build_images() {
    let repo = repo();
    run(Command::new(repo.join("deploy/docker/make-base.sh")).arg(BASE));
    // The build context deploy/Dockerfile expects, holding only what it copies.
    let ctx = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ctx.path().join("target/release")).unwrap();
    std::fs::create_dir_all(ctx.path().join("deploy")).unwrap();
    std::fs::copy(SIGIL, ctx.path().join("target/release/sigil")).unwrap();
    std::fs::copy(
        repo.join("deploy/sigil.toml"),
        ctx.path().join("deploy/sigil.toml"),
    )
    .unwrap();
    let started = Instant::now();
    run(Command::new("docker")
        .args(["build", "-q", "--build-arg"])
        .arg(format!("BASE={BASE}"))
        .arg("-f")
        .arg(repo.join("deploy/Dockerfile"))
        .args(["-t", IMAGE])
        .arg(ctx.path()));
    for (image, dir) in [
        (DEMO_IMAGE, "deploy/docker/demo"),
        (PG_IMAGE, "tests/docker/postgres"),
    ] {
        run(Command::new("docker")
            .args(["build", "-q", "--build-arg"])
            .arg(format!("BASE={BASE}"))
            .args(["-t", image])
            .arg(repo.join(dir)));
    }
    eprintln!("images built in {:.1} s", started.elapsed().as_secs_f64());
}

/// A compose project of deploy/compose.yaml, taken down (volumes too) when dropped.
struct Project {
    name: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn cmd(&self) -> Command {
        let mut c = compose_cmd();
        c.arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(repo().join("deploy/compose.yaml"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    fn container(&self, service: &str) -> String {
        let id = run(Command::new("docker").args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]));
        let id = id.lines().next().unwrap_or_default().trim().to_owned();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    fn health(&self, service: &str) -> String {
        let c = self.container(service);
        run(Command::new("docker").args(["inspect", "--format", "{{.State.Health.Status}}", &c]))
            .trim()
            .to_owned()
    }

    fn logs(&self) -> String {
        text(
            &self
                .cmd()
                .args(["logs", "--no-color", "--tail", "40"])
                .output()
                .unwrap(),
        )
    }

    /// `docker compose run --rm admin ARGS`: an operator command inside the project.
    fn admin(&self, args: &[&str]) -> String {
        run(self.cmd().args(["run", "--rm", "-T", "admin"]).args(args))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("compose logs:\n{}", self.logs());
        }
        let _ = self
            .cmd()
            .args(["--profile", "tools", "down", "-v", "--timeout", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

/// Connects to the demo workload with mutual TLS using `dir`'s svid.pem / svid.key /
/// bundle.pem (Python's ssl module, no Sigil code): the server certificate's serial and what
/// it answered, or the error.
fn demo_call(port: u16, dir: &Path) -> Result<(String, String), String> {
    const CLIENT: &str = r#"
import os, socket, ssl, sys
port, d = int(sys.argv[1]), sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_cert_chain(os.path.join(d, "svid.pem"), os.path.join(d, "svid.key"))
ctx.load_verify_locations(os.path.join(d, "bundle.pem"))
ctx.check_hostname = False  # SPIFFE: the peer is named by its URI SAN
with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
    with ctx.wrap_socket(raw) as t:
        serial = t.getpeercert()["serialNumber"]
        t.sendall(b"GET / HTTP/1.0\r\nHost: demo\r\n\r\n")
        body = b""
        try:
            while chunk := t.recv(4096):
                body += chunk
        except ssl.SSLEOFError:
            pass  # the server closed without close_notify after a complete HTTP/1.0 answer
print(serial)
print(body.decode().split("\r\n\r\n", 1)[1].strip())
"#;
    let o = Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(port.to_string())
        .arg(dir)
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(text(&o));
    }
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = out.lines();
    Ok((
        lines.next().unwrap_or_default().to_owned(),
        lines.next().unwrap_or_default().to_owned(),
    ))
}

#[test]
fn the_image_and_the_compose_file_run_replicas_an_agent_and_a_workload_through_failures() {
    if !docker_engine("the_image_and_the_compose_file") {
        return;
    }
    build_images();

    // The image as deploy/Dockerfile promises: a non-root user, the ports, a health check,
    // nothing but the binary, its libraries and CA certificates.
    let inspect: serde_json::Value = serde_json::from_str(&run(
        Command::new("docker").args(["image", "inspect", IMAGE])
    ))
    .unwrap();
    let cfg = &inspect[0]["Config"];
    assert_eq!(cfg["User"], "10001:10001", "{cfg}");
    for port in ["8443/tcp", "8080/tcp"] {
        assert!(cfg["ExposedPorts"].get(port).is_some(), "{port}: {cfg}");
    }
    assert!(
        cfg["Healthcheck"]["Test"].to_string().contains("status"),
        "{cfg}"
    );
    let files = {
        let c = run(Command::new("docker").args(["create", IMAGE]));
        let c = c.trim();
        let list = run(Command::new("sh").arg("-c").arg(format!(
            "docker export {c} | tar -t; docker rm {c} >/dev/null"
        )));
        list.lines()
            .filter(|l| !l.ends_with('/'))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(
        files.iter().any(|f| f == "usr/local/bin/sigil"),
        "{files:?}"
    );
    assert!(
        files.iter().all(|f| f.starts_with("usr/local/bin/sigil")
            || f.starts_with("lib")
            || f.starts_with("usr/lib")
            || f.starts_with("etc/")
            || f.starts_with("usr/share/sigil/")
            // What Docker itself adds to every container.
            || f.starts_with(".docker")
            || f.starts_with("dev/")),
        "only the binary, its libraries, CA certificates and config: {files:?}"
    );
    assert!(
        files.iter().all(|f| !f.contains("bin/sh")),
        "no shell: {files:?}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let (grpc1, http1, grpc2, http2, demo) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let password: String = rand_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let project = Project {
        name: format!("sigiltest{}", std::process::id()),
        env: [
            ("SIGIL_IMAGE", IMAGE.to_owned()),
            ("SIGIL_DEMO_IMAGE", DEMO_IMAGE.to_owned()),
            ("POSTGRES_IMAGE", PG_IMAGE.to_owned()),
            ("BASE", BASE.to_owned()),
            ("POSTGRES_PASSWORD", password),
            ("SIGIL_GRPC_PORT_1", grpc1.to_string()),
            ("SIGIL_HTTP_PORT_1", http1.to_string()),
            ("SIGIL_GRPC_PORT_2", grpc2.to_string()),
            ("SIGIL_HTTP_PORT_2", http2.to_string()),
            ("SIGIL_DEMO_PORT", demo.to_string()),
            ("SIGIL_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    };
    let up = Instant::now();
    run(project.cmd().args(["up", "-d", "--no-build"]));
    let healthy = wait_until("both replicas healthy", Duration::from_secs(120), || {
        project.health("broker-1") == "healthy" && project.health("broker-2") == "healthy"
    });
    eprintln!(
        "compose up: both replicas healthy {:.1} s after `up`",
        (up.elapsed()).as_secs_f64().max(healthy.as_secs_f64())
    );

    // `init` ran once and left the config, the bundle and the operator credential.
    let config = tmp.path().join("config");
    run(Command::new("docker")
        .arg("cp")
        .arg(format!("{}:/etc/sigil", project.container("init")))
        .arg(&config));
    let bundle = std::fs::read(config.join("bundle.pem")).unwrap();
    let toml = std::fs::read_to_string(config.join("sigil.toml")).unwrap();
    assert!(
        !toml.contains(&project.env[4].1),
        "the database password stays out of sigil.toml"
    );

    // The operator's first job, inside the project: an identity for the demo and a join
    // token where its agent looks.
    project.admin(&[
        "identity",
        "create",
        "--spiffe-id",
        "spiffe://example.org/demo/web",
        "--owner",
        "team-web",
        "--purpose",
        "compose demo",
        "--kind",
        "x509",
        "--dns",
        "demo",
    ]);
    project.admin(&[
        "join-token",
        "create",
        "--spiffe-id",
        "spiffe://example.org/demo/web",
        "--out",
        "/run/sigil/demo.token",
    ]);

    // A client of the demo, from the host through replica 1's published port.
    let both = format!("https://127.0.0.1:{grpc1},https://127.0.0.1:{grpc2}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let mut adm = admin_with(&config, &both);
    let client = rt.block_on(async {
        adm.create_identity(pb::CreateIdentityRequest {
            spiffe_id: "spiffe://example.org/demo/client".into(),
            owner: "team-web".into(),
            purpose: "compose test client".into(),
            entitlements: Some(pb::Entitlements {
                kinds: vec!["x509".into()],
                max_ttl_seconds: 3600,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let token = adm
            .create_join_token(pb::CreateJoinTokenRequest {
                id_or_spiffe_id: "spiffe://example.org/demo/client".into(),
                ttl_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let w = WorkloadClient::new(ClientConfig::new(both.clone(), bundle.clone())).unwrap();
        w.attest(
            Evidence::JoinToken(token.into()),
            SvidOptions::default(),
            &[],
        )
        .await
        .unwrap();
        w
    });
    let me = tmp.path().join("client");
    let write_client_files = |w: &WorkloadClient| {
        std::fs::create_dir_all(&me).unwrap();
        let svid = w.x509_svid().unwrap();
        std::fs::write(me.join("svid.pem"), svid.cert_chain_pem()).unwrap();
        std::fs::write(me.join("svid.key"), svid.private_key_pem().expose_secret()).unwrap();
        std::fs::write(me.join("bundle.pem"), &bundle).unwrap();
        svid.serial.clone()
    };
    let first_client = write_client_files(&client);

    // The agent attests with the dropped token and the demo serves with its files.
    let mut served = None;
    let mut last_error = String::new();
    let waited = wait_until(
        "the demo serves mTLS with the agent's files",
        Duration::from_secs(60),
        || {
            match demo_call(demo, &me) {
                Ok(r) => served = Some(r),
                Err(e) if e != last_error => {
                    eprintln!("demo not serving yet: {e}");
                    last_error = e;
                }
                Err(_) => {}
            }
            served.is_some()
        },
    );
    let (serial1, hello) = served.unwrap();
    assert_eq!(hello, "hello spiffe://example.org/demo/client");
    eprintln!(
        "demo serving with the agent's certificate {:.1} s after the token was dropped",
        waited.as_secs_f64()
    );

    // Replica 1 killed: the client renews through replica 2.
    let killed = Instant::now();
    run(Command::new("docker").args(["kill", &project.container("broker-1")]));
    let renewed = rt
        .block_on(client.renew_x509_svid())
        .expect("renewal through replica 2");
    assert_ne!(renewed.serial, first_client);
    eprintln!(
        "replica 1 killed: renewed through replica 2 {:.0} ms later",
        killed.elapsed().as_secs_f64() * 1e3
    );
    write_client_files(&client);
    assert_eq!(
        demo_call(demo, &me).unwrap().0,
        serial1,
        "the demo keeps serving"
    );

    // Revocation through replica 2: a fresh token where the agent looks, the identity
    // revoked; the agent re-attests and the demo serves a new certificate.
    project.admin(&[
        "join-token",
        "create",
        "--spiffe-id",
        "spiffe://example.org/demo/web",
        "--out",
        "/run/sigil/demo.token",
        "--overwrite",
    ]);
    let revoked = Instant::now();
    rt.block_on(adm.revoke_identity(pb::RevokeIdentityRequest {
        id_or_spiffe_id: "spiffe://example.org/demo/web".into(),
        reason: "compose test".into(),
        ..Default::default()
    }))
    .unwrap();
    let mut serial2 = String::new();
    let rotated = wait_until(
        "the demo serves a new certificate after revocation",
        Duration::from_secs(30),
        || {
            serial2 = demo_call(demo, &me).map(|r| r.0).unwrap_or_default();
            !serial2.is_empty() && serial2 != serial1
        },
    );
    eprintln!(
        "identity revoked through replica 2: the demo served a new certificate {:.2} s later",
        rotated.as_secs_f64()
    );
    let _ = revoked;

    // Replica 2 cut from PostgreSQL goes not ready, and ready again when reconnected.
    run(Command::new("docker").args(["start", &project.container("broker-1")]));
    let network = run(Command::new("docker").args([
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={}", project.name),
        "--filter",
        "label=com.docker.compose.network=db",
    ]));
    let network = network.trim().to_owned();
    assert!(!network.is_empty(), "the db network");
    let b2 = project.container("broker-2");
    let ready = |port: u16| -> u16 {
        let rt2 = tokio::runtime::Runtime::new().unwrap();
        rt2.block_on(async {
            // A port that refuses (a replica restarting) counts as not ready.
            let probe = tokio::spawn(ready_status(port, bundle.clone()));
            match tokio::time::timeout(Duration::from_secs(3), probe).await {
                Ok(Ok(code)) => code,
                _ => 0,
            }
        })
    };
    assert_eq!(ready(http2), 200);
    run(Command::new("docker").args(["network", "disconnect", &network, &b2]));
    let cut = wait_until(
        "replica 2 not ready once cut from PostgreSQL",
        Duration::from_secs(40),
        || ready(http2) == 503,
    );
    eprintln!(
        "replica 2 cut from PostgreSQL: /readyz 503 after {:.1} s",
        cut.as_secs_f64()
    );
    run(Command::new("docker").args(["network", "connect", &network, &b2]));
    let back = wait_until("replica 2 ready again", Duration::from_secs(60), || {
        ready(http2) == 200
    });
    eprintln!("reconnected: ready again after {:.1} s", back.as_secs_f64());
    wait_until(
        "replica 1 ready after restart",
        Duration::from_secs(60),
        || ready(http1) == 200,
    );
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b
}

/// The operator client from a copied config dir, over the published ports.
fn admin_with(
    config: &Path,
    urls: &str,
) -> sigil_proto::v1::admin_client::AdminClient<sigil_sdk::Failover> {
    admin(config, urls)
}

/// `/readyz`'s status over the published HTTP port (HTTPS with the broker's bundle).
async fn ready_status(port: u16, bundle: Vec<u8>) -> u16 {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let r = https_get(addr, "/readyz", &bundle).await;
    r.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}
