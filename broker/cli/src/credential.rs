//! `sigil credential ...`: look up an issued credential in the ledger.

use anyhow::Result;
use clap::Subcommand;
use sigil_proto::v1 as pb;

use crate::Conn;
use crate::output::credential_json;

/// `sigil credential ...`.
#[derive(Debug, Subcommand)]
pub enum CredentialCmd {
    /// Show the ledger record of a serial number (hex) or JWT id.
    Show {
        /// Serial or jti.
        /// (A jti is base64url, so it may start with `-`.)
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil credential ...`.
pub(crate) async fn run(cmd: CredentialCmd) -> Result<()> {
    match cmd {
        CredentialCmd::Show { id, json, conn } => {
            let mut c = conn.connect()?;
            let r = c
                .get_credential(pb::GetCredentialRequest { credential_id: id })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&credential_json(&r))?);
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                crate::output::print_credential(&r, now);
            }
        }
    }
    Ok(())
}
