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
    /// Show the keys and what the rotation would do, without doing it.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// List signing keys and their rotation state.
    List {
        /// Only keys of this kind: jwt, x509 (signing intermediates) or root.
        #[arg(long, value_parser = ["jwt", "x509", "root"])]
        kind: Option<String>,
        /// Only keys in this state (e.g. current, next, previous).
        #[arg(long)]
        state: Option<String>,
        /// Print only the key ids, one per line (for scripts).
        #[arg(long, short, conflicts_with = "json")]
        quiet: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Emergency: withdraw a JWT key or intermediate; a new one takes over at once and
    /// everything the old one signed stops verifying.
    Revoke {
        /// Key id (or a CA's key identifier). Ids are base64url, so one may start with `-`.
        #[arg(allow_hyphen_values = true)]
        key_id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        /// Show the key and what revoking it would do, without doing it.
        #[arg(long)]
        dry_run: bool,
        /// Do it without asking (revoking a key cannot be undone).
        #[arg(long)]
        yes: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil rotate`.
pub(crate) async fn rotate(a: RotateArgs) -> Result<()> {
    let mut c = a.conn.connect()?;
    if !["jwt", "x509", "root"].contains(&a.kind.as_str()) {
        anyhow::bail!("rotate {:?}: the kinds are jwt, x509 and root", a.kind);
    }
    if a.dry_run {
        let keys = c
            .list_keys(pb::ListKeysRequest {})
            .await
            .map_err(sigil_sdk::SdkError::from)?
            .into_inner();
        let kind = kind_name(&a.kind);
        let mine: Vec<&pb::Key> = keys.keys.iter().filter(|k| k.kind.contains(kind)).collect();
        let plan = if a.now {
            format!(
                "a new {} key would be made current at once; the current one would move to previous (still published until what it signed expires)",
                a.kind
            )
        } else if mine.iter().any(|k| k.state == "next") {
            format!(
                "a next {} key is already published; the schedule makes it current after the prepare period",
                a.kind
            )
        } else {
            format!(
                "a next {} key would be published now (verifiers see it first) and become current after the prepare period",
                a.kind
            )
        };
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"dry_run": true, "kind": a.kind, "plan": plan, "keys": keys_json(&keys)})
                )?
            );
        } else {
            println!("DRY RUN: nothing was changed. {plan}.");
            print_keys(&keys, false);
        }
        return Ok(());
    }
    let r = c
        .rotate(pb::RotateRequest {
            kind: a.kind,
            now: a.now,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    print_keys(&r, a.json);
    Ok(())
}

/// `sigil keys ...`.
pub(crate) async fn keys(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::List {
            kind,
            state,
            quiet,
            json,
            conn,
        } => {
            let mut r = conn
                .connect()?
                .list_keys(pb::ListKeysRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            r.keys.retain(|k| {
                kind.as_deref()
                    .is_none_or(|want| k.kind.contains(kind_name(want)))
                    && state.as_deref().is_none_or(|want| k.state == want)
            });
            if quiet {
                for k in &r.keys {
                    println!("{}", k.id);
                }
            } else {
                print_keys(&r, json);
            }
        }
        KeysCmd::Revoke {
            key_id,
            reason,
            dry_run,
            yes,
            json,
            conn,
        } => {
            let mut c = conn.connect()?;
            let keys = c
                .list_keys(pb::ListKeysRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            let Some(k) = keys
                .keys
                .iter()
                .find(|k| k.id == key_id || (!k.ski.is_empty() && k.ski == key_id))
            else {
                anyhow::bail!("no key {key_id:?} (see `sigil keys list`)");
            };
            let what = format!(
                "revoking {} key {} ({}): a new one takes over at once and everything it signed stops verifying",
                k.kind, k.id, k.state
            );
            if dry_run {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &json!({"dry_run": true, "would": what, "key": key_json(k)})
                        )?
                    );
                } else {
                    println!("DRY RUN: nothing was changed. Would be {what}.");
                }
                return Ok(());
            }
            crate::output::confirm(yes, &format!("Key revocation ({what})"), &k.id)?;
            let r = c
                .revoke_key(pb::RevokeKeyRequest { key_id, reason })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_keys(&r, json);
        }
    }
    Ok(())
}

/// How a kind given on the command line (jwt, x509, root) shows in a key's `kind`.
fn kind_name(kind: &str) -> &str {
    if kind == "x509" { "intermediate" } else { kind }
}

fn key_json(k: &pb::Key) -> serde_json::Value {
    json!({"id": k.id, "kind": k.kind, "state": k.state, "created_at": k.created_at, "not_after": k.not_after, "activated_at": k.activated_at, "retire_at": k.retire_at, "ski": k.ski})
}

fn keys_json(k: &pb::ListKeysResponse) -> serde_json::Value {
    json!({"keys": k.keys.iter().map(key_json).collect::<Vec<_>>(), "bundle_sequence": k.bundle_sequence})
}

fn print_keys(k: &pb::ListKeysResponse, as_json: bool) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&keys_json(k)).unwrap_or_default()
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
