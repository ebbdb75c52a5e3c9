//! The database schema, in versioned migrations. `sigil init --store URL` and `sigil migrate
//! --store URL` run them (one at a time, under an advisory lock, each in its own transaction);
//! `sigil serve` only checks the version: an older database is refused until migrated, a newer
//! one (made by a newer sigil) is refused outright.

use sigil_store_core::StoreError;

use crate::{PgConfig, unavailable};

/// The schema version this build reads and writes.
pub const VERSION: i64 = 1;

/// Serialises migrations between processes (an arbitrary constant: "sigm").
const MIGRATION_LOCK: i64 = 0x7369_676d;

/// Migration `n` takes the schema from version `n - 1` to `n`.
const MIGRATIONS: &[&str] = &[
    // 1: the store.
    r"
    CREATE TABLE sigil_meta (name text PRIMARY KEY, value bytea NOT NULL);
    -- The one row every committing transaction locks first: the audit chain's head and the
    -- commit log's position.
    CREATE TABLE sigil_head (
        id int PRIMARY KEY CHECK (id = 1),
        audit_seq bigint NOT NULL,
        audit_hash text NOT NULL,
        log_seq bigint NOT NULL
    );
    INSERT INTO sigil_head VALUES (1, 0, repeat('0', 64), 0);
    CREATE TABLE sigil_identities (
        id text PRIMARY KEY,
        spiffe_id text NOT NULL,
        revision bigint NOT NULL,
        record bytea NOT NULL,
        CONSTRAINT sigil_identities_spiffe_id UNIQUE (spiffe_id) DEFERRABLE INITIALLY DEFERRED
    );
    CREATE TABLE sigil_join_tokens (hash text PRIMARY KEY, record bytea NOT NULL);
    CREATE TABLE sigil_keys (id text PRIMARY KEY, record bytea NOT NULL);
    -- id: the credential's serial or jti bytes, which start with the issue time (big-endian
    -- nanoseconds), so id order is issue order.
    CREATE TABLE sigil_ledger (id bytea PRIMARY KEY, identity_id text NOT NULL, record bytea NOT NULL);
    CREATE INDEX sigil_ledger_identity ON sigil_ledger (identity_id, id);
    CREATE TABLE sigil_revocations (
        expires_at bigint NOT NULL,
        id bytea NOT NULL,
        record bytea NOT NULL,
        PRIMARY KEY (expires_at, id)
    );
    CREATE TABLE sigil_usage (identity_id text PRIMARY KEY, record bytea NOT NULL);
    CREATE TABLE sigil_owners (name text PRIMARY KEY, record bytea NOT NULL);
    CREATE TABLE sigil_approvals (id text PRIMARY KEY, record bytea NOT NULL);
    CREATE TABLE sigil_audit (seq bigint PRIMARY KEY, entry bytea NOT NULL);
    -- The commit log replicas follow: one row per committed batch with ops, positions 1, 2,
    -- 3, ... with no gaps (taken under the head row's lock, not from a sequence).
    CREATE TABLE sigil_log (seq bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), ops bytea NOT NULL);
    ",
];

/// The schema version the database is at (0: no Sigil schema).
pub async fn version(client: &tokio_postgres::Client) -> Result<i64, StoreError> {
    let exists = client
        .query_one("SELECT to_regclass('sigil_schema') IS NOT NULL", &[])
        .await
        .map_err(unavailable)?
        .get::<_, bool>(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_opt("SELECT version FROM sigil_schema WHERE id = 1", &[])
        .await
        .map_err(unavailable)?
        .map_or(0, |r| r.get::<_, i64>(0)))
}

/// Refuses a database whose schema is not this build's, saying what to do.
pub async fn check(client: &tokio_postgres::Client, cfg: &PgConfig) -> Result<(), StoreError> {
    match version(client).await? {
        VERSION => Ok(()),
        0 => Err(StoreError::Incompatible(format!(
            "{} holds no Sigil store: run `sigil init --store URL` first",
            cfg.describe()
        ))),
        v if v > VERSION => Err(StoreError::Incompatible(format!(
            "the database {} has schema version {v}, newer than this build's {VERSION} (a newer sigil migrated it): run that version of sigil",
            cfg.describe()
        ))),
        v => Err(StoreError::Incompatible(format!(
            "the database {} has schema version {v}, older than this build's {VERSION}: run `sigil migrate --to URL` once, then start the replicas",
            cfg.describe()
        ))),
    }
}

/// Brings the schema to [`VERSION`], one migration per transaction, under an advisory lock so
/// two processes do not migrate at once. Refuses a newer database. Returns the version it
/// found.
pub async fn migrate(client: &tokio_postgres::Client, cfg: &PgConfig) -> Result<i64, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(unavailable)?;
    let result = migrate_locked(client, cfg).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn migrate_locked(
    client: &tokio_postgres::Client,
    cfg: &PgConfig,
) -> Result<i64, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS sigil_schema (id int PRIMARY KEY CHECK (id = 1), version bigint NOT NULL)",
        )
        .await
        .map_err(unavailable)?;
    let found = version(client).await?;
    if found > VERSION {
        return Err(StoreError::Incompatible(format!(
            "the database {} has schema version {found}, newer than this build's {VERSION}: run the newer sigil",
            cfg.describe()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = i as i64 + 1;
        let step = format!(
            "BEGIN; {sql}; INSERT INTO sigil_schema (id, version) VALUES (1, {to}) ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version; COMMIT;"
        );
        if let Err(e) = client.batch_execute(&step).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(StoreError::Unavailable(format!(
                "migrating {} to schema version {to}: {e}",
                cfg.describe()
            )));
        }
        tracing::info!(database = %cfg.describe(), version = to, "schema migrated");
    }
    Ok(found)
}
