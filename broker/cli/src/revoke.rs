//! `sigil revoke ...` and `sigil leak`: revoke one credential or everything an identity holds,
//! and report leaked material.

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use sigil_broker::clock::rfc3339;
use sigil_proto::v1 as pb;

use crate::Conn;
use crate::output::print_report;

/// `sigil revoke ...`.
#[derive(Debug, Subcommand)]
pub enum RevokeCmd {
    /// Revoke one certificate (serial) or JWT-SVID (jti).
    Credential {
        /// Serial (hex) or jti.
        /// (A jti is base64url, so it may start with `-`.)
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        /// Show the credential and its state, without revoking it.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke everything an identity holds (its generation moves on).
    Identity {
        /// Identity id or SPIFFE ID.
        identity: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        /// Also suspend it, so it cannot get new credentials until resumed.
        #[arg(long)]
        suspend: bool,
        /// Show what would be revoked; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil leak`.
#[derive(Debug, Args)]
pub struct LeakArgs {
    /// A file holding the leaked JWT or PEM certificate, or `-` for standard input.
    pub file: String,
    /// Why (recorded in the incident).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Show the blast radius; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil revoke ...`.
pub(crate) async fn revoke(cmd: RevokeCmd) -> Result<()> {
    match cmd {
        RevokeCmd::Credential {
            id,
            reason,
            dry_run,
            json,
            conn,
        } => {
            let mut c = conn.connect()?;
            if dry_run {
                let cr = c
                    .get_credential(pb::GetCredentialRequest { credential_id: id })
                    .await
                    .map_err(sigil_sdk::SdkError::from)?
                    .into_inner();
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "dry_run": true, "credential": crate::output::credential_json(&cr),
                        }))?
                    );
                } else {
                    match &cr.revocation {
                        Some(v) => println!(
                            "DRY RUN: nothing was changed. {} {} is already {}",
                            cr.kind,
                            cr.credential_id,
                            crate::output::revocation_line(v).replacen("REVOKED", "revoked", 1)
                        ),
                        None => println!(
                            "DRY RUN: nothing was changed. Would revoke {} {} of {} (it expires {}); exchanged tokens made from it stop working with it",
                            cr.kind,
                            cr.credential_id,
                            cr.spiffe_id,
                            rfc3339(cr.expires_at)
                        ),
                    }
                }
                return Ok(());
            }
            let r = c
                .revoke_credential(pb::RevokeCredentialRequest {
                    credential_id: id,
                    reason,
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            let cr = r.credential.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "already_revoked": r.already_revoked,
                        "credential": crate::output::credential_json(&cr),
                    }))?
                );
                return Ok(());
            }
            match (&cr.revocation, r.already_revoked) {
                (Some(v), true) => println!(
                    "{} {} of {} was already {}; nothing changed",
                    cr.kind,
                    cr.credential_id,
                    cr.spiffe_id,
                    crate::output::revocation_line(v).replacen("REVOKED", "revoked", 1)
                ),
                _ => println!(
                    "revoked {} {} of {} (it would have expired {})",
                    cr.kind,
                    cr.credential_id,
                    cr.spiffe_id,
                    rfc3339(cr.expires_at)
                ),
            }
        }
        RevokeCmd::Identity {
            identity,
            reason,
            suspend,
            dry_run,
            json,
            conn,
        } => {
            let mut c = conn.connect()?;
            let r = c
                .revoke_identity(pb::RevokeIdentityRequest {
                    id_or_spiffe_id: identity,
                    reason,
                    suspend,
                    dry_run,
                    retire: false,
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_report(&r, json);
        }
    }
    Ok(())
}

/// `sigil leak`.
pub(crate) async fn leak(a: LeakArgs) -> Result<()> {
    let material = zeroize::Zeroizing::new(if a.file == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading the leaked material from standard input")?;
        s
    } else {
        std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file))?
    });
    let mut c = a.conn.connect()?;
    let r = c
        .report_leak(pb::ReportLeakRequest {
            material: material.trim().to_owned(),
            reason: a.reason,
            dry_run: a.dry_run,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    print_report(&r, a.json);
    Ok(())
}
