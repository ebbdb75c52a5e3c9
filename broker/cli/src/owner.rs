//! `sigil owner ...`: deactivate an owner who left (flagging what they own), undo it, list owners.

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use sigil_proto::v1 as pb;

use crate::Conn;

/// `sigil owner ...`.
#[derive(Debug, Subcommand)]
pub enum OwnerCmd {
    /// Flag every identity this person or team owns until it is reassigned.
    Deactivate {
        /// The owner's name, as identities spell it.
        name: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Undo a deactivation.
    Activate {
        /// The owner's name.
        name: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Every owner with the identities they own.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil owner ...`.
pub(crate) async fn run(cmd: OwnerCmd) -> Result<()> {
    let (name, active, reason, conn) = match cmd {
        OwnerCmd::List { json, conn } => {
            let r = conn
                .connect()?
                .list_owners(pb::ListOwnersRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            if json {
                let v: Vec<_> = r.owners.iter().map(|o| json!({"name": o.name, "active": o.active, "deactivated_at": o.deactivated_at, "reason": o.reason, "identities": o.identities})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<32} {:<12} IDENTITIES", "OWNER", "STATUS");
                for o in &r.owners {
                    println!(
                        "{:<32} {:<12} {}",
                        o.name,
                        if o.active { "active" } else { "deactivated" },
                        o.identities.len()
                    );
                }
            }
            return Ok(());
        }
        OwnerCmd::Deactivate { name, reason, conn } => (name, false, reason, conn),
        OwnerCmd::Activate { name, reason, conn } => (name, true, reason, conn),
    };
    let o = conn
        .connect()?
        .set_owner_active(pb::SetOwnerActiveRequest {
            name,
            active,
            reason,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    if active {
        println!(
            "owner {:?} is active again ({} identities)",
            o.name,
            o.identities.len()
        );
    } else {
        println!(
            "owner {:?} deactivated; these identities are flagged in `sigil report` until reassigned or retired:",
            o.name
        );
        for i in &o.identities {
            println!("  {i}");
        }
    }
    Ok(())
}
