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
        /// Show the identities that would be flagged, without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
    let (name, active, reason, conn, json) = match cmd {
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
        OwnerCmd::Deactivate {
            name,
            dry_run: true,
            json,
            conn,
            ..
        } => {
            let r = conn
                .connect()?
                .list_owners(pb::ListOwnersRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            let Some(owned) = r
                .owners
                .iter()
                .find(|o| o.name == name)
                .map(|o| o.identities.clone())
            else {
                anyhow::bail!("no owner {name:?} (see `sigil owner list`)");
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"dry_run": true, "owner": name, "identities": owned})
                    )?
                );
            } else {
                println!(
                    "DRY RUN: nothing was changed. Deactivating {name:?} would flag {} identities in `sigil report` until reassigned or retired:",
                    owned.len()
                );
                for i in owned {
                    println!("  {i}");
                }
            }
            return Ok(());
        }
        OwnerCmd::Deactivate {
            name,
            reason,
            json,
            conn,
            ..
        } => (name, false, reason, conn, json),
        OwnerCmd::Activate { name, reason, conn } => (name, true, reason, conn, false),
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
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"owner": o.name, "active": o.active, "identities": o.identities})
            )?
        );
        return Ok(());
    }
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
