//! `sigil join-token ...`: one-time join tokens for attesting as an identity.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use sigil_broker::clock::rfc3339;
use sigil_proto::v1 as pb;

use crate::Conn;
use crate::output::ttl32;

/// `sigil join-token ...`.
#[derive(Debug, Subcommand)]
pub enum JoinTokenCmd {
    /// Create a one-time join token; it is printed once, on the last line.
    Create {
        /// The identity (SPIFFE ID or id) the token attests as.
        #[arg(long, alias = "identity")]
        spiffe_id: String,
        /// Lifetime.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Print JSON ({"token", "spiffe_id", "identity_id", "expires_at"}).
        #[arg(long)]
        json: bool,
        /// Write the token to this file (mode 0600, for `sigil fetch --join-token-file`)
        /// instead of printing it; an existing file is refused.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// With --out: replace an existing file (atomically), e.g. the token an agent
        /// re-attests with after its identity was revoked.
        #[arg(long, requires = "out")]
        overwrite: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil join-token ...`.
pub(crate) async fn run(cmd: JoinTokenCmd) -> Result<()> {
    match cmd {
        JoinTokenCmd::Create {
            spiffe_id,
            ttl,
            json,
            out,
            overwrite,
            conn,
        } => {
            if let Some(f) = &out
                && !overwrite
                && std::fs::symlink_metadata(f).is_ok()
            {
                anyhow::bail!(
                    "--out {}: the file exists; refusing to overwrite it (--overwrite replaces it)",
                    f.display()
                );
            }
            let mut c = conn.connect()?;
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    id_or_spiffe_id: spiffe_id,
                    ttl_seconds: ttl32(ttl),
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            if let Some(f) = &out {
                sigil_broker::fsutil::write_atomic(f, r.token.as_bytes(), 0o600)
                    .map_err(|e| anyhow::anyhow!("--out {}: {e}", f.display()))?;
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "token": if out.is_some() { None } else { Some(&r.token) },
                        "token_file": out.as_ref().map(|f| f.display().to_string()),
                        "spiffe_id": r.spiffe_id,
                        "identity_id": r.identity_id, "expires_at": rfc3339(r.expires_at),
                    }))?
                );
                return Ok(());
            }
            if let Some(f) = &out {
                println!(
                    "join token for {} (identity {}), expires {}, written to {} (0600); it works once and is not stored by the broker",
                    r.spiffe_id,
                    r.identity_id,
                    rfc3339(r.expires_at),
                    f.display()
                );
                return Ok(());
            }
            println!(
                "join token for {} (identity {}), expires {}; it works once and is not stored by the broker:",
                r.spiffe_id,
                r.identity_id,
                rfc3339(r.expires_at)
            );
            println!("{}", r.token);
        }
    }
    Ok(())
}
