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
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil credential ...`.
pub(crate) async fn run(cmd: CredentialCmd) -> Result<()> {
    match cmd {
        CredentialCmd::Show { id, conn } => {
            let mut c = conn.connect()?;
            let r = c
                .get_credential(pb::GetCredentialRequest { credential_id: id })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            println!("{}", serde_json::to_string_pretty(&credential_json(&r))?);
        }
    }
    Ok(())
}
