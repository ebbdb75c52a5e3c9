//! `sigil approve` and `sigil approvals ...`: time-limited approvals of approval-gated scopes.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use sigil_broker::clock::rfc3339;
use sigil_proto::v1 as pb;

use crate::Conn;
use crate::output::print_table;

/// `sigil approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// Identity id or SPIFFE ID.
    pub identity: String,
    /// Approval-gated scope to allow (repeatable).
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<String>,
    /// How long (at most 24h).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Why (a ticket, an incident); required.
    #[arg(long)]
    pub reason: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil approvals ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ApprovalsCmd {
    /// Approvals in force (or all with --all), newest first.
    List {
        /// Only this identity's.
        identity: Option<String>,
        /// Include expired and ended ones.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// End an approval now.
    Revoke {
        /// Approval id (apr-...).
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil approve`.
pub(crate) async fn approve(a: ApproveArgs) -> Result<()> {
    let mut c = a.conn.connect()?;
    let r = c
        .approve(pb::ApproveRequest {
            id_or_spiffe_id: a.identity,
            scopes: a.scopes,
            ttl_seconds: u32::try_from(a.duration.as_secs()).unwrap_or(u32::MAX),
            reason: a.reason,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&approval_json(&r))?);
    } else {
        println!(
            "approved {} for {} until {} ({})",
            r.scopes.join(", "),
            r.spiffe_id,
            rfc3339(r.expires_at),
            r.id
        );
    }
    Ok(())
}

/// `sigil approvals ...`.
pub(crate) async fn approvals(cmd: ApprovalsCmd) -> Result<()> {
    match cmd {
        ApprovalsCmd::List {
            identity,
            all,
            json,
            conn,
        } => {
            let mut c = conn.connect()?;
            let r = c
                .list_approvals(pb::ListApprovalsRequest {
                    id_or_spiffe_id: identity.unwrap_or_default(),
                    all,
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            if json {
                let v: Vec<_> = r.approvals.iter().map(approval_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let mut rows = vec![[
                "ID".to_owned(),
                "SPIFFE ID".to_owned(),
                "SCOPES".to_owned(),
                "UNTIL".to_owned(),
                "BY".to_owned(),
                "REASON".to_owned(),
            ]];
            for x in &r.approvals {
                rows.push([
                    x.id.clone(),
                    x.spiffe_id.clone(),
                    x.scopes.join(","),
                    if x.revoked_at != 0 {
                        format!("ended {}", rfc3339(x.revoked_at))
                    } else {
                        rfc3339(x.expires_at)
                    },
                    x.approved_by.clone(),
                    x.reason.clone(),
                ]);
            }
            print_table(&rows);
        }
        ApprovalsCmd::Revoke { id, reason, conn } => {
            let mut c = conn.connect()?;
            let r = c
                .revoke_approval(pb::RevokeApprovalRequest { id, reason })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            println!("ended approval {} for {}", r.id, r.spiffe_id);
        }
    }
    Ok(())
}

fn approval_json(a: &pb::Approval) -> serde_json::Value {
    json!({"id": a.id, "identity_id": a.identity_id, "spiffe_id": a.spiffe_id,
        "scopes": a.scopes, "created_at": a.created_at, "expires_at": a.expires_at,
        "approved_by": a.approved_by, "reason": a.reason,
        "revoked_at": (a.revoked_at != 0).then_some(a.revoked_at)})
}
