//! `sigil fetch`: attest (a join token, an OIDC token from a file, or — with
//! `--broker unix:///path` — the kernel's word on this process) and write the workload's
//! credentials to files, each atomically (temporary file, then rename), keys and tokens with
//! mode 0600.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use sigil_sdk::{ClientConfig, Evidence, JwtRequest, SvidOptions, WorkloadClient};

use sigil_broker::clock::rfc3339;
use sigil_broker::fsutil::{create_private_dir, write_atomic};

/// `sigil fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Broker URL, e.g. https://127.0.0.1:8443, or the broker's Unix socket,
    /// unix:///run/sigil/workload.sock (attests by this process's uid and binary when no
    /// other evidence is given).
    #[arg(long, env = "SIGIL_BROKER")]
    pub broker: String,
    /// The trust bundle (PEM) an operator gave you.
    #[arg(long, env = "SIGIL_TRUST_BUNDLE")]
    pub trust_bundle: PathBuf,
    /// The one-time join token (prefer SIGIL_JOIN_TOKEN or --join-token-file: flags show up in `ps`).
    #[arg(
        long,
        env = "SIGIL_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    pub join_token: Option<String>,
    /// A file holding the join token.
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// Attest with the OIDC token in this file instead (a Kubernetes projected
    /// service-account token, a CI job's ID token).
    #[arg(long, conflicts_with_all = ["join_token", "join_token_file"])]
    pub oidc_token_file: Option<PathBuf>,
    /// The identity wanted, when the evidence matches several.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Directory to write svid.pem, svid.key, bundle.pem and jwt-<audience>.txt into.
    #[arg(long)]
    pub out: PathBuf,
    /// Also fetch a JWT-SVID for this audience (repeatable).
    #[arg(long = "audience")]
    pub audiences: Vec<String>,
    /// X.509-SVID lifetime (clamped to the identity's maximum).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// DNS name to include in the certificate (repeatable).
    #[arg(long = "dns")]
    pub dns_names: Vec<String>,
    /// Scope to ask for in every JWT-SVID (repeatable; each must be one the identity may
    /// hold).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

fn file_safe(aud: &str) -> String {
    aud.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs `sigil fetch`.
pub(super) async fn run(a: FetchArgs) -> Result<()> {
    let read = |f: &PathBuf| -> Result<String> {
        Ok(std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_owned())
    };
    let evidence = match (&a.join_token, &a.join_token_file, &a.oidc_token_file) {
        (Some(t), _, _) => Evidence::JoinToken(t.trim().to_owned().into()),
        (None, Some(f), _) => Evidence::JoinToken(read(f)?.into()),
        (None, None, Some(f)) => Evidence::Oidc(read(f)?.into()),
        (None, None, None) if a.broker.starts_with("unix:") => Evidence::Unix,
        (None, None, None) => bail!(
            "no evidence: pass --join-token, --join-token-file, --oidc-token-file, or --broker unix:///PATH to attest by this process"
        ),
    };
    crate::conn::note_target(&a.broker, &a.trust_bundle, None);
    let bundle = std::fs::read(&a.trust_bundle)
        .with_context(|| format!("reading trust bundle {}", a.trust_bundle.display()))?;
    let client = WorkloadClient::new(ClientConfig::new(a.broker.clone(), bundle))?;
    let jwts: Vec<JwtRequest> = a
        .audiences
        .iter()
        .map(|aud| {
            let mut r = JwtRequest::audience(aud.clone());
            r.scopes = a.scopes.clone();
            r
        })
        .collect();
    let creds = client
        .attest(
            evidence,
            SvidOptions {
                ttl: a.ttl,
                dns_names: a.dns_names.clone(),
                spiffe_id: a.spiffe_id.clone(),
            },
            &jwts,
        )
        .await?;

    create_private_dir(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let svid = &creds.svid;
    let w = |name: &str, bytes: &[u8], mode: u32| -> Result<PathBuf> {
        let p = a.out.join(name);
        write_atomic(&p, bytes, mode).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    // Key first: a reader that sees the new certificate finds its key already in place.
    let key_path = w("svid.key", svid.private_key_pem().expose_secret(), 0o600)?;
    let cert_path = w("svid.pem", svid.cert_chain_pem().as_bytes(), 0o644)?;
    let bundle_path = w("bundle.pem", creds.bundle.x509_pem().as_bytes(), 0o644)?;
    let mut jwt_files = Vec::new();
    for j in &creds.jwts {
        let name = format!("jwt-{}.txt", file_safe(&j.audiences[0]));
        let p = w(
            &name,
            format!("{}\n", j.token.expose_secret()).as_bytes(),
            0o600,
        )?;
        jwt_files.push((p, j));
    }
    if a.json {
        let out = serde_json::json!({
            "spiffe_id": svid.spiffe_id.to_string(),
            "serial": svid.serial,
            "expires_at": rfc3339(svid.expires_at),
            "certificate": cert_path,
            "key": key_path,
            "bundle": bundle_path,
            "notice": (!svid.grant.notice.is_empty()).then_some(&svid.grant.notice),
            "jwt_svids": jwt_files.iter().map(|(p, j)| serde_json::json!({
                "file": p,
                "audiences": j.audiences,
                "scopes": j.scopes,
                "expires_at": rfc3339(j.expires_at),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{} ({})", svid.spiffe_id, svid.serial);
    println!(
        "  certificate: {} (expires {})",
        cert_path.display(),
        rfc3339(svid.expires_at)
    );
    println!("  key:         {} (0600)", key_path.display());
    println!("  bundle:      {}", bundle_path.display());
    if !svid.grant.notice.is_empty() {
        println!("  note:        {}", svid.grant.notice);
    }
    for (p, j) in &jwt_files {
        let scopes = if j.scopes.is_empty() {
            String::new()
        } else {
            format!(", scopes {}", j.scopes.join(","))
        };
        println!(
            "  jwt-svid:    {} (aud {}{scopes}, expires {})",
            p.display(),
            j.audiences.join(","),
            rfc3339(j.expires_at)
        );
        if !j.grant.notice.is_empty() {
            println!("  note:        {}", j.grant.notice);
        }
    }
    Ok(())
}
