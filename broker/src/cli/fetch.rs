//! `sigil fetch`: attest with a join token and write the workload's credentials to files,
//! each atomically (temporary file, then rename), keys and tokens with mode 0600.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use sigil_sdk::{ClientConfig, Evidence, JwtRequest, SvidOptions, WorkloadClient};

use crate::clock::rfc3339;
use crate::fsutil::{create_private_dir, write_atomic};

/// `sigil fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Broker URL, e.g. https://127.0.0.1:8443.
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
    let token = match (&a.join_token, &a.join_token_file) {
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_owned(),
        (None, None) => {
            bail!("no join token: pass --join-token, --join-token-file or set SIGIL_JOIN_TOKEN")
        }
    };
    let bundle = std::fs::read(&a.trust_bundle)
        .with_context(|| format!("reading trust bundle {}", a.trust_bundle.display()))?;
    let client = WorkloadClient::new(ClientConfig::new(a.broker.clone(), bundle))?;
    let jwts: Vec<JwtRequest> = a
        .audiences
        .iter()
        .map(|aud| JwtRequest::audience(aud.clone()))
        .collect();
    let creds = client
        .attest(
            Evidence::JoinToken(token.into()),
            SvidOptions {
                ttl: a.ttl,
                dns_names: a.dns_names.clone(),
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
    for j in &creds.jwts {
        let name = format!("jwt-{}.txt", file_safe(&j.audiences[0]));
        let p = w(
            &name,
            format!("{}\n", j.token.expose_secret()).as_bytes(),
            0o600,
        )?;
        println!(
            "  jwt-svid:    {} (aud {}, expires {})",
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
