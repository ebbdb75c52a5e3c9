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
            conn,
        } => {
            let mut c = conn.connect()?;
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    id_or_spiffe_id: spiffe_id,
                    ttl_seconds: ttl32(ttl),
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "token": r.token, "spiffe_id": r.spiffe_id,
                        "identity_id": r.identity_id, "expires_at": rfc3339(r.expires_at),
                    }))?
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
