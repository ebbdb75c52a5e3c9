//! `sigil dev`: one command for a newcomer. Initializes a local data dir if there is none,
//! serves (also the SPIFFE Workload API on a socket in the data dir), registers a demo
//! identity (and one for this user's processes, attested by uid), writes a join token to a
//! 0600 file and prints the exact `sigil fetch` commands to use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use sigil_proto::v1 as pb;

use crate::Conn;
use crate::serve::{load_config, parse_http_listen, shutdown_signal};

/// `sigil dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where to keep the dev broker's data.
    #[arg(long, default_value = ".sigil-dev")]
    pub data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// HTTP listen address, or `off`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: String,
    /// The SPIFFE Workload API socket (default: `workload.sock` in the data dir), or `off`.
    #[arg(long)]
    pub workload_socket: Option<String>,
}

/// Trust domain of a dev data dir.
pub(crate) const DEV_TRUST_DOMAIN: &str = "demo.sigil.test";
/// The demo identity.
pub(crate) const DEMO_SPIFFE_ID: &str = "spiffe://demo.sigil.test/demo/web";
/// The demo identity of this user's processes on the Workload API socket.
pub(crate) const DEMO_LOCAL_SPIFFE_ID: &str = "spiffe://demo.sigil.test/demo/local";

fn shown(p: &Path) -> String {
    let cwd = std::env::current_dir().ok();
    match cwd.as_deref().and_then(|c| p.strip_prefix(c).ok()) {
        Some(rel) if !rel.as_os_str().is_empty() => format!("./{}", rel.display()),
        _ => p.display().to_string(),
    }
}

/// Runs `sigil dev` until Ctrl-C.
pub(crate) async fn run(a: DevArgs) -> Result<()> {
    let http = parse_http_listen(&a.http_listen)?;
    if !sigil_broker::store::StoreConfig::in_data_dir(&a.data_dir).exists() {
        let r = sigil_broker::init::init(
            sigil_broker::init::InitOptions {
                data_dir: a.data_dir.clone(),
                trust_domain: DEV_TRUST_DOMAIN
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                listen: Some(a.listen),
                http_listen: Some(http),
                operator: "admin".into(),
                operator_ttl: Duration::from_secs(365 * 86400),
                master_key: None,
                store: None,
                store_ca_file: None,
                server_names: Vec::new(),
            },
            &sigil_broker::clock::SystemClock,
        )
        .await?;
        println!(
            "Created a dev data dir in {} (trust domain {}).",
            r.data_dir.display(),
            r.trust_domain
        );
    }
    let mut cfg = load_config(
        &a.data_dir,
        None,
        Some(a.listen),
        Some(&a.http_listen),
        &crate::serve::StoreArgs::default(),
    )?;
    // The SPIFFE path too: a Workload API socket in the data dir, by default.
    let socket = match a.workload_socket.as_deref() {
        Some("off") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(
            a.data_dir
                .canonicalize()
                .unwrap_or(a.data_dir.clone())
                .join("workload.sock"),
        ),
    };
    if socket.is_some() {
        cfg.workload_socket = socket.clone();
    }
    let master = sigil_broker::server::load_master_key(&cfg)?;
    let running = sigil_broker::server::start(
        cfg,
        master,
        sigil_broker::server::StartOptions::default(),
    )
    .await
    .context(
        "starting the dev broker (is another broker using the port? try --listen 127.0.0.1:0)",
    )?;

    let conn = Conn {
        data_dir: Some(a.data_dir.clone()),
        broker: Some(running.url()),
        trust_bundle: None,
        admin_cert: None,
        admin_key: None,
        profile: None,
    };
    let mut admin = conn.connect()?;
    let existing = admin
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: DEMO_SPIFFE_ID.into(),
        })
        .await;
    if existing.is_err() {
        admin
            .create_identity(pb::CreateIdentityRequest {
                spiffe_id: DEMO_SPIFFE_ID.into(),
                owner: "you (sigil dev)".into(),
                purpose: "demo workload for trying Sigil locally".into(),
                labels: [("env".to_owned(), "dev".to_owned())].into(),
                selectors: Vec::new(),
                entitlements: Some(pb::Entitlements {
                    kinds: vec!["x509".into(), "jwt".into()],
                    max_ttl_seconds: 3600,
                    audiences: vec!["demo-api".into()],
                    scopes: vec!["demo.read".into()],
                    dns_names: vec!["web.demo.local".into()],
                    ..Default::default()
                }),
                expires_in_seconds: 0,
            })
            .await
            .map_err(sigil_sdk::SdkError::from)?;
    }
    // A second demo identity for this user's processes on the Workload API socket, attested
    // by uid.
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if socket.is_some()
        && !uid.is_empty()
        && admin
            .get_identity(pb::GetIdentityRequest {
                id_or_spiffe_id: DEMO_LOCAL_SPIFFE_ID.into(),
            })
            .await
            .is_err()
    {
        admin
            .create_identity(pb::CreateIdentityRequest {
                spiffe_id: DEMO_LOCAL_SPIFFE_ID.into(),
                owner: "you (sigil dev)".into(),
                purpose: "your processes on the Workload API socket, attested by uid".into(),
                labels: [("env".to_owned(), "dev".to_owned())].into(),
                selectors: vec![format!("unix:uid:{uid}")],
                entitlements: Some(pb::Entitlements {
                    kinds: vec!["x509".into(), "jwt".into()],
                    max_ttl_seconds: 3600,
                    audiences: vec!["demo-api".into()],
                    ..Default::default()
                }),
                expires_in_seconds: 0,
            })
            .await
            .map_err(sigil_sdk::SdkError::from)?;
    }
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            id_or_spiffe_id: DEMO_SPIFFE_ID.into(),
            ttl_seconds: 3600,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    // The token goes to a 0600 file, never onto a command line (where `ps` shows it).
    let token_file = a
        .data_dir
        .canonicalize()
        .unwrap_or(a.data_dir.clone())
        .join("demo-join-token");
    sigil_broker::fsutil::write_atomic(&token_file, token.token.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", token_file.display()))?;

    let exe = std::env::current_exe()
        .map(|p| shown(&p))
        .unwrap_or_else(|_| "sigil".into());
    let dir = shown(&a.data_dir.canonicalize().unwrap_or(a.data_dir.clone()));
    println!();
    println!("Sigil dev broker is running (Ctrl-C to stop).");
    println!("  gRPC (TLS):    {}", running.url());
    if let Some(h) = running.http_url() {
        println!(
            "  HTTP:          {h}/healthz, /bundle, /.well-known/openid-configuration (TLS: --cacert bundle.pem)"
        );
    }
    println!("  data dir:      {dir}");
    println!("  demo identity: {DEMO_SPIFFE_ID} (audience demo-api, scope demo.read)");
    println!();
    println!(
        "Fetch credentials as the demo workload (the join token in {} works once, within 1h):",
        shown(&token_file)
    );
    println!();
    println!(
        "  {exe} fetch --broker {} --trust-bundle {dir}/bundle.pem --join-token-file {} --out ./demo-creds --audience demo-api --scope demo.read",
        running.url(),
        shown(&token_file)
    );
    println!();
    if let Some(sock) = &socket {
        // Socket URLs take absolute paths.
        let sock = sock.display();
        println!(
            "Or take the SPIFFE path: the Workload API on {sock} knows your processes by uid as {DEMO_LOCAL_SPIFFE_ID}:"
        );
        println!();
        println!(
            "  {exe} fetch --broker unix://{sock} --trust-bundle {dir}/bundle.pem --out ./demo-local --audience demo-api"
        );
        println!(
            "  export SPIFFE_ENDPOINT_SOCKET=unix://{sock}   # then any SPIFFE client (go-spiffe, py-spiffe, spiffe-helper)"
        );
        println!();
    }
    println!("Then look around:");
    println!("  openssl x509 -in ./demo-creds/svid.pem -noout -text");
    println!("  {exe} identity list --data-dir {dir}");
    println!("  {exe} join-token create --data-dir {dir} --spiffe-id {DEMO_SPIFFE_ID}");
    println!("  {exe} audit export --data-dir {dir}");
    shutdown_signal().await;
    println!("stopping");
    running.shutdown().await;
    Ok(())
}
