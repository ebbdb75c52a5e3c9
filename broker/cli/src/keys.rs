//! `sigil rotate` and `sigil keys ...`: signing keys, their rotation and emergency revocation.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;
use sigil_broker::clock::rfc3339;
use sigil_proto::v1 as pb;

use crate::Conn;

/// `sigil rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// `jwt`, `x509` or `root`.
    pub kind: String,
    /// Finish at once instead of publishing the next key first (verifiers may meet the new
    /// key before their next bundle refresh; watch streams carry it immediately).
    #[arg(long)]
    pub now: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// List signing keys and their rotation state.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Emergency: withdraw a JWT key or intermediate; a new one takes over at once and
    /// everything the old one signed stops verifying.
    Revoke {
        /// Key id (or a CA's key identifier).
        key_id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil rotate`.
pub(crate) async fn rotate(a: RotateArgs) -> Result<()> {
    let mut c = a.conn.connect()?;
    let r = c
        .rotate(pb::RotateRequest {
            kind: a.kind,
            now: a.now,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    print_keys(&r, false);
    Ok(())
}

/// `sigil keys ...`.
pub(crate) async fn keys(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::List { json, conn } => {
            let r = conn
                .connect()?
                .list_keys(pb::ListKeysRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_keys(&r, json);
        }
        KeysCmd::Revoke {
            key_id,
            reason,
            conn,
        } => {
            let r = conn
                .connect()?
                .revoke_key(pb::RevokeKeyRequest { key_id, reason })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_keys(&r, false);
        }
    }
    Ok(())
}

fn print_keys(k: &pb::ListKeysResponse, as_json: bool) {
    if as_json {
        let v: Vec<_> = k
            .keys
            .iter()
            .map(|k| json!({"id": k.id, "kind": k.kind, "state": k.state, "created_at": k.created_at, "not_after": k.not_after, "activated_at": k.activated_at, "retire_at": k.retire_at, "ski": k.ski}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"keys": v, "bundle_sequence": k.bundle_sequence}))
                .unwrap_or_default()
        );
        return;
    }
    println!(
        "{:<16} {:<9} {:<44} {:<21} RETIRES",
        "KIND", "STATE", "ID", "CREATED"
    );
    for k in &k.keys {
        let retire = if k.retire_at > 0 {
            rfc3339(k.retire_at)
        } else {
            "-".into()
        };
        println!(
            "{:<16} {:<9} {:<44} {:<21} {retire}",
            k.kind,
            k.state,
            k.id,
            rfc3339(k.created_at)
        );
    }
    println!("bundle sequence: {}", k.bundle_sequence);
}
