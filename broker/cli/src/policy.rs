//! `sigil policy ...`: check Cedar policy files offline, reload the broker's, print the schema.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use sigil_proto::v1 as pb;

use crate::Conn;

/// `sigil policy ...`.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Parse and validate policy files against Sigil's schema, offline.
    Check {
        /// A .cedar file or a directory of them.
        path: PathBuf,
        /// Print JSON ({"files", "policies"}).
        #[arg(long)]
        json: bool,
    },
    /// Make the broker re-read its policy files (as SIGHUP does).
    Reload {
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the Cedar schema policies are validated against.
    Schema,
}

/// `sigil policy ...`.
pub(crate) async fn run(cmd: PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Check { path, json } => {
            let e = sigil_broker::policy::PolicyEngine::load(
                Some(path),
                sigil_broker::config::PolicyDefault::Permit,
            )
            .map_err(|e| anyhow!("{e}"))?;
            let r = e.report();
            if json {
                let ids: Vec<&String> = r
                    .policy_ids
                    .iter()
                    .filter(|i| !i.starts_with("sigil."))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "ok": true, "files": r.files, "policies": ids,
                    }))?
                );
                return Ok(());
            }
            println!(
                "ok: {} policies in {} file(s) validate against the Sigil schema",
                r.policy_ids
                    .iter()
                    .filter(|i| !i.starts_with("sigil."))
                    .count(),
                r.files.len()
            );
            for id in r.policy_ids.iter().filter(|i| !i.starts_with("sigil.")) {
                println!("  {id}");
            }
        }
        PolicyCmd::Reload { conn } => {
            let mut c = conn.connect()?;
            let r = c
                .reload_policy(pb::ReloadPolicyRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            println!(
                "reloaded: {} policies from {} file(s)",
                r.policy_ids.len(),
                r.files.len()
            );
        }
        PolicyCmd::Schema => print!("{}", sigil_broker::policy::SCHEMA),
    }
    Ok(())
}
