//! `sigil operator ...` and `sigil whoami`: operator credentials with a role, and which one is in
//! use.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use sigil_broker::clock::rfc3339;
use sigil_proto::v1 as pb;

use crate::Conn;

/// `sigil operator ...`.
#[derive(Debug, clap::Subcommand)]
pub enum OperatorCmd {
    /// Issue a credential for a new operator: the key is made here and never leaves; the
    /// certificate and key go to --out.
    Create {
        /// Operator name.
        name: String,
        /// admin, operator, auditor or revoker.
        #[arg(long)]
        role: String,
        /// Lifetime.
        #[arg(long = "for", default_value = "30d", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Directory for NAME.crt and NAME.key (0600).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil operator ...`.
pub(crate) async fn operator_cred(cmd: OperatorCmd) -> Result<()> {
    match cmd {
        OperatorCmd::Create {
            name,
            role,
            duration,
            out,
            conn,
        } => {
            let key = sigil_pki::EcKey::generate()?;
            let csr = sigil_pki::csr::request_for(&key)?;
            let mut c = conn.connect()?;
            let r = c
                .issue_operator_credential(pb::IssueOperatorCredentialRequest {
                    name: name.clone(),
                    role: role.clone(),
                    csr,
                    ttl_seconds: u32::try_from(duration.as_secs()).unwrap_or(u32::MAX),
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            sigil_broker::fsutil::create_private_dir(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let leaf = r
                .cert_chain
                .first()
                .ok_or_else(|| anyhow!("the broker returned no certificate"))?;
            let cert_path = out.join(format!("{name}.crt"));
            let key_path = out.join(format!("{name}.key"));
            sigil_broker::fsutil::write_atomic(
                &cert_path,
                sigil_pki::certs_to_pem([&sigil_pki::CertificateDer::from(leaf.clone())])
                    .as_bytes(),
                0o644,
            )?;
            sigil_broker::fsutil::write_atomic(
                &key_path,
                key.to_pkcs8_pem()?.expose_secret(),
                0o600,
            )?;
            println!(
                "{role} credential for {name}: {} (expires {})\n  certificate: {}\n  key:         {} (0600)\nUse it with --admin-cert {} --admin-key {}",
                r.spiffe_id,
                rfc3339(r.expires_at),
                cert_path.display(),
                key_path.display(),
                cert_path.display(),
                key_path.display()
            );
        }
    }
    Ok(())
}

/// `sigil whoami`.
pub(crate) async fn whoami(conn: Conn, json: bool) -> Result<()> {
    let mut c = conn.connect()?;
    let r = c
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "name": r.name, "role": r.role, "spiffe_id": r.spiffe_id,
            }))?
        );
    } else {
        println!("{} (role {}) {}", r.name, r.role, r.spiffe_id);
    }
    Ok(())
}
