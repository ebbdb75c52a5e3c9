//! Sigil's store on PostgreSQL, for several broker replicas sharing one database.
//!
//! Layout, in the order a change flows through it:
//! - [`PgConfig`]: the URL (its password never printed) and the CA to verify the server with.
//! - [`schema`]: versioned migrations, refused when the database is newer than this build.
//! - [`PostgresBackend`]: the `Backend` the shared group-committing writer drives. Each batch
//!   is one transaction that first locks the single `sigil_head` row: that serialises every
//!   replica's writers, so the audit chain stays one chain, preconditions (a join token used
//!   once, an identity's revision) are decided against what every replica committed, and the
//!   batch's ops take the next position of a gap-free commit log (`sigil_log`), announced with
//!   `NOTIFY` at commit. Every replica `LISTEN`s, reads the log after the last position it
//!   applied, and feeds its commit observer — the same one a redb commit feeds — in log
//!   order. A slow safety check compares positions in case a notification was lost; nothing
//!   polls on the hot path.
//! - Leadership: the replica holding a session advisory lock (on its `LISTEN` connection) runs
//!   the schedules; when it dies, the lock goes with its connection and another takes it within
//!   a second.
//! - [`local`]: a private PostgreSQL server for tests and the bench.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use sigil_store_core::audit::{Anchor, AuditEntry, ChainHead, Checkpoint};
use sigil_store_core::backend::codec::{
    corrupt, decode as from_json, encode as to_json, unavailable,
};
use sigil_store_core::backend::{Backend, ChainEnd, Loaded, Needs, Txn, Write};
use sigil_store_core::model::{
    ApprovalRecord, IdentityRecord, JoinTokenRecord, KeyRecord, LedgerRecord, OwnerRecord,
    RevocationRecord, UsageRecord,
};
use sigil_store_core::seal::Sealer;
use sigil_store_core::{Op, SCHEMA_VERSION, StoreError, StoreMeta, StoreReads};
use tokio_postgres::types::ToSql;

pub mod local;
pub mod schema;

/// The channel commits are announced on.
/// Starts a write transaction that is durable when COMMIT returns, whatever the server,
/// database or role set: `synchronous_commit = off` (which would acknowledge a credential
/// whose ledger record a crash could still lose) is raised to `on` for this transaction only,
/// while stronger settings (`remote_apply`, `remote_write` with a synchronous standby) and
/// `local` are kept. One message, one round trip: the simple-query protocol sends both.
const BEGIN_DURABLE: &str = "BEGIN; SELECT set_config('synchronous_commit', 'on', true) \
     WHERE current_setting('synchronous_commit') = 'off'";

const CHANNEL: &str = "sigil_log";
/// The advisory lock the schedule leader holds (an arbitrary constant: "sigl").
const LEADER_LOCK: i64 = 0x7369_676c;
/// How often a follower compares log positions in case a notification was lost.
const SAFETY_CHECK: Duration = Duration::from_secs(30);
/// Most log entries read at once while catching up.
const LOG_PAGE: i64 = 2000;
/// Log entries kept for replicas that fall behind (at least; and at least a day's worth).
const LOG_KEEP: i64 = 100_000;

/// Where the database is.
#[derive(Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/db?sslmode=...` (the password is never printed).
    url: String,
    /// CA certificates (PEM) to verify the server's TLS certificate with; default: the
    /// public web roots.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &self.describe())
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl PgConfig {
    /// A database URL (`postgres://` or `postgresql://`); checked here, so a bad one is
    /// refused before anything connects. The error never repeats the password.
    pub fn new(url: &str, ca_file: Option<PathBuf>) -> Result<Self, StoreError> {
        let cfg = PgConfig {
            url: url.to_owned(),
            ca_file,
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::Open(format!(
                "{}: a PostgreSQL store URL starts with postgres://",
                cfg.describe()
            )));
        }
        tokio_postgres::Config::from_str(url).map_err(|e| {
            StoreError::Open(format!(
                "{}: not a valid PostgreSQL URL: {e}",
                cfg.describe()
            ))
        })?;
        Ok(cfg)
    }

    /// Whether the URL carries a password (then it belongs in a secret, not a config file).
    pub fn has_password(&self) -> bool {
        tokio_postgres::Config::from_str(&self.url).is_ok_and(|c| c.get_password().is_some())
    }

    /// The URL without its password, for messages and logs.
    pub fn describe(&self) -> String {
        redact(&self.url)
    }

    /// The URL, password included: for handing to another process, never for printing.
    pub fn expose_url(&self) -> &str {
        &self.url
    }

    fn pg(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut c = tokio_postgres::Config::from_str(&self.url)
            .map_err(|e| StoreError::Open(format!("{}: {e}", self.describe())))?;
        if c.get_application_name().is_none() {
            c.application_name("sigil");
        }
        if c.get_connect_timeout().is_none() {
            c.connect_timeout(Duration::from_secs(5));
        }
        // A dead peer or a cut network is noticed within about 11 s (5 s idle, then three
        // probes 2 s apart), not at the kernel's default of minutes to hours.
        c.keepalives_idle(Duration::from_secs(5));
        c.keepalives_interval(Duration::from_secs(2));
        c.keepalives_retries(3);
        // The same bound while a query waits for its answer (keepalives do not run then).
        if c.get_tcp_user_timeout().is_none() {
            c.tcp_user_timeout(Duration::from_secs(15));
        }
        Ok(c)
    }

    fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    StoreError::Open(format!("store CA file {}: {e}", path.display()))
                })?;
                let certs = sigil_pki::certs_from_pem(&pem).map_err(|e| {
                    StoreError::Open(format!("store CA file {}: {e}", path.display()))
                })?;
                for c in certs {
                    roots.add(c).map_err(|e| {
                        StoreError::Open(format!("store CA file {}: {e}", path.display()))
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Open(format!("TLS to PostgreSQL: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(cfg))
    }

    fn pool(&self, size: usize) -> Result<Pool, StoreError> {
        let mgr = Manager::from_config(
            self.pg()?,
            self.tls()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(mgr)
            .max_size(size)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Open(format!("{}: {e}", self.describe())))
    }

    /// A connection driven by a task on the current runtime.
    async fn client(&self) -> Result<tokio_postgres::Client, StoreError> {
        let (client, conn) = self
            .pg()?
            .connect(self.tls()?)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.describe())))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// `url` with any password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let host = host.split('?').next().unwrap_or(host);
    match auth {
        Some(a) => {
            let user = a.split(':').next().unwrap_or("");
            if a.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        None => format!("{scheme}://{host}"),
    }
}

fn credential_key(
    kind: sigil_store_core::model::CredentialKind,
    id: &str,
) -> Result<Vec<u8>, StoreError> {
    sigil_store_core::model::credential_key(kind, id)
        .ok_or_else(|| unavailable(format!("a record has a malformed credential id {id:?}")))
}

/// Metadata rows.
const META_INFO: &str = "store_meta";
const META_KEY_CHECK: &str = "key_check";
const META_CHECKPOINT: &str = "audit_checkpoint";
const META_ANCHOR: &str = "audit_anchor";

pub use sigil_store_core::FaultSwitch;

/// The `LISTEN` connection: notifications of commits, and the advisory lock of the leader.
struct Listener {
    client: tokio_postgres::Client,
    notes: tokio::sync::mpsc::UnboundedReceiver<u64>,
    leader: bool,
}

/// The PostgreSQL backend.
pub struct PostgresBackend {
    cfg: PgConfig,
    /// Reads on the broker's runtime.
    reads: Pool,
    /// The writer's connections, made on the writer's runtime.
    writes: Pool,
    listener: tokio::sync::Mutex<Option<Listener>>,
    #[cfg(feature = "faults")]
    faults: Option<FaultSwitch>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("database", &self.cfg.describe())
            .finish_non_exhaustive()
    }
}

impl PostgresBackend {
    /// Creates the schema and a new, empty store with `meta`, sealed under `sealer`'s key.
    /// Refuses a database that already holds a Sigil store.
    pub async fn create(
        cfg: &PgConfig,
        sealer: &Sealer,
        meta: StoreMeta,
    ) -> Result<(), StoreError> {
        let client = cfg.client().await.map_err(open_error)?;
        schema::migrate(&client, cfg).await?;
        let check = sealer.key_check();
        let inserted = client
            .execute(
                "INSERT INTO sigil_meta (name, value) VALUES ($1, $2), ($3, $4) ON CONFLICT (name) DO NOTHING",
                &[&META_INFO, &to_json(&meta), &META_KEY_CHECK, &check],
            )
            .await
            .map_err(unavailable)?;
        if inserted == 0 {
            return Err(StoreError::Incompatible(format!(
                "{} already holds a Sigil store (made by an earlier `sigil init`); nothing was changed. Start replicas with `sigil serve --store URL` and the same master key",
                cfg.describe()
            )));
        }
        Ok(())
    }

    /// Opens an existing store: its schema must be this build's, its key check must open with
    /// `sealer`'s master key, and its record format must be this build's.
    pub async fn open(cfg: &PgConfig, sealer: &Sealer) -> Result<Self, StoreError> {
        check_master_key(cfg, sealer).await?;
        Ok(PostgresBackend {
            cfg: cfg.clone(),
            reads: cfg.pool(16)?,
            writes: cfg.pool(4)?,
            listener: tokio::sync::Mutex::new(None),
            #[cfg(feature = "faults")]
            faults: None,
        })
    }

    /// [`PostgresBackend::open`], with commits failing on demand.
    #[cfg(feature = "faults")]
    pub async fn open_with_faults(
        cfg: &PgConfig,
        sealer: &Sealer,
        faults: Option<FaultSwitch>,
    ) -> Result<Self, StoreError> {
        let mut b = Self::open(cfg, sealer).await?;
        b.faults = faults;
        Ok(b)
    }

    async fn read(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.reads
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.cfg.describe())))
    }

    async fn write(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.writes
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.cfg.describe())))
    }

    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let c = self.read().await?;
        let st = c.prepare_cached(sql).await.map_err(unavailable)?;
        c.query(&st, params).await.map_err(unavailable)
    }

    async fn records<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        self.rows(sql, params)
            .await?
            .iter()
            .map(|r| from_json(what, r.get::<_, &[u8]>(0)))
            .collect()
    }

    async fn listen(&self) -> Result<Listener, StoreError> {
        let (client, mut conn) = self
            .cfg
            .pg()?
            .connect(self.cfg.tls()?)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.cfg.describe())))?;
        let (tx, notes) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if let Ok(pos) = n.payload().parse::<u64>()
                            && tx.send(pos).is_err()
                        {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            // Dropping `tx` tells the follower the feed is gone.
        });
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(unavailable)?;
        Ok(Listener {
            client,
            notes,
            leader: false,
        })
    }
}

fn open_error(e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(r) => StoreError::Open(r),
        other => other,
    }
}

/// Checks that the database holds a store this build reads, made under `sealer`'s master key,
/// without writing anything.
pub async fn check_master_key(cfg: &PgConfig, sealer: &Sealer) -> Result<(), StoreError> {
    let client = cfg.client().await.map_err(open_error)?;
    schema::check(&client, cfg).await?;
    let rows = client
        .query(
            "SELECT name, value FROM sigil_meta WHERE name = ANY($1)",
            &[&vec![META_INFO, META_KEY_CHECK]],
        )
        .await
        .map_err(unavailable)?;
    let mut meta = None;
    let mut check = None;
    for r in &rows {
        match r.get::<_, &str>(0) {
            META_INFO => meta = Some(from_json::<StoreMeta>("store_meta", r.get(1))?),
            _ => check = Some(r.get::<_, Vec<u8>>(1)),
        }
    }
    let (Some(meta), Some(check)) = (meta, check) else {
        return Err(StoreError::Incompatible(format!(
            "{} has Sigil's tables but no store in them (an interrupted `sigil init`?): run `sigil init --store URL` again",
            cfg.describe()
        )));
    };
    if meta.schema_version != SCHEMA_VERSION {
        return Err(StoreError::Incompatible(format!(
            "{} holds records of schema version {}, this build reads schema version {SCHEMA_VERSION}",
            cfg.describe(),
            meta.schema_version
        )));
    }
    if !sealer.opens_key_check(&check) {
        return Err(StoreError::Incompatible(format!(
            "the master key does not match the store at {}: use the key it was created with (SIGIL_MASTER_KEY or master_key_file); nothing was changed",
            cfg.describe()
        )));
    }
    Ok(())
}

/// One batch's transaction: a pooled connection inside `BEGIN`, with the head row locked.
struct PgTxn<'a> {
    #[cfg_attr(not(feature = "faults"), allow(dead_code))]
    backend: &'a PostgresBackend,
    client: Option<deadpool_postgres::Object>,
    head: ChainHead,
    log_seq: u64,
    /// The log position this batch takes, if it logs.
    logged: Option<u64>,
    done: bool,
}

#[async_trait(?Send)]
impl Backend for PostgresBackend {
    async fn begin(&self) -> Result<Box<dyn Txn + '_>, StoreError> {
        #[cfg(feature = "faults")]
        if self.faults.as_ref().is_some_and(FaultSwitch::failing) {
            return Err(StoreError::Unavailable(
                "injected: the database is unreachable".into(),
            ));
        }
        let client = self.write().await?;
        client
            .batch_execute(BEGIN_DURABLE)
            .await
            .map_err(unavailable)?;
        Ok(Box::new(PgTxn {
            backend: self,
            client: Some(client),
            head: ChainHead::default(),
            log_seq: 0,
            logged: None,
            done: false,
        }))
    }

    fn shut_down(&self) {
        self.reads.close();
        self.writes.close();
    }

    async fn chain_end(&self) -> Result<ChainEnd, StoreError> {
        let mut c = self.write().await?;
        let t = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(unavailable)?;
        let anchor = t
            .query_opt(
                "SELECT value FROM sigil_meta WHERE name = $1",
                &[&META_ANCHOR],
            )
            .await
            .map_err(unavailable)?
            .map(|r| from_json::<Anchor>("meta/audit_anchor", r.get(0)))
            .transpose()?;
        let last = t
            .query_opt(
                "SELECT seq, entry FROM sigil_audit ORDER BY seq DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(unavailable)?;
        t.commit().await.map_err(unavailable)?;
        Ok(match last {
            Some(r) => ChainEnd {
                anchor,
                seq: r.get::<_, i64>(0) as u64,
                last: Some(r.get(1)),
            },
            None => ChainEnd {
                anchor,
                seq: 0,
                last: None,
            },
        })
    }

    fn shared(&self) -> bool {
        true
    }

    async fn log_position(&self) -> Result<u64, StoreError> {
        let c = self.write().await?;
        let r = c
            .query_one("SELECT log_seq FROM sigil_head WHERE id = 1", &[])
            .await
            .map_err(unavailable)?;
        Ok(r.get::<_, i64>(0) as u64)
    }

    async fn changes_after(&self, after: u64) -> Result<Vec<(u64, Vec<Op>)>, StoreError> {
        let c = self.write().await?;
        let st = c
            .prepare_cached("SELECT seq, ops FROM sigil_log WHERE seq > $1 ORDER BY seq LIMIT $2")
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        let mut from = after as i64;
        loop {
            let rows = c
                .query(&st, &[&from, &LOG_PAGE])
                .await
                .map_err(unavailable)?;
            let n = rows.len();
            for r in rows {
                let seq = r.get::<_, i64>(0);
                if seq != from + 1 {
                    return Err(StoreError::Behind(format!(
                        "the next change this replica needs is {} but the log starts at {seq}",
                        from + 1
                    )));
                }
                let ops: Vec<Op> = from_json(&format!("sigil_log[{seq}]"), r.get(1))?;
                out.push((seq as u64, ops));
                from = seq;
            }
            if (n as i64) < LOG_PAGE {
                break;
            }
        }
        Ok(out)
    }

    async fn next_change(&self) -> Result<u64, StoreError> {
        let mut guard = self.listener.lock().await;
        let Some(l) = guard.as_mut() else {
            // (Re)connect, then report where the log stands: the caller catches up from its
            // last position before it is ready again.
            let l = self.listen().await?;
            let pos = l
                .client
                .query_one("SELECT log_seq FROM sigil_head WHERE id = 1", &[])
                .await
                .map_err(unavailable)?
                .get::<_, i64>(0) as u64;
            *guard = Some(l);
            return Ok(pos);
        };
        match tokio::time::timeout(SAFETY_CHECK, l.notes.recv()).await {
            Ok(Some(mut pos)) => {
                while let Ok(p) = l.notes.try_recv() {
                    pos = pos.max(p);
                }
                Ok(pos)
            }
            Ok(None) => {
                *guard = None;
                Err(StoreError::Unavailable(
                    "the connection that listens for commits was lost".into(),
                ))
            }
            // The slow safety check: a notification lost on the way is caught here.
            Err(_) => match l
                .client
                .query_one("SELECT log_seq FROM sigil_head WHERE id = 1", &[])
                .await
            {
                Ok(r) => Ok(r.get::<_, i64>(0) as u64),
                Err(e) => {
                    *guard = None;
                    Err(unavailable(e))
                }
            },
        }
    }

    async fn lead(&self) -> bool {
        let mut guard = self.listener.lock().await;
        let Some(l) = guard.as_mut() else {
            return false;
        };
        if l.client.is_closed() {
            *guard = None;
            return false;
        }
        if !l.leader {
            l.leader = l
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                .await
                .is_ok_and(|r| r.get::<_, bool>(0));
        }
        if l.leader {
            // The leader keeps the log to what lagging replicas may still need.
            let _ = l
                .client
                .execute(
                    "DELETE FROM sigil_log WHERE seq <= (SELECT log_seq FROM sigil_head WHERE id = 1) - $1 AND at < now() - interval '1 day'",
                    &[&LOG_KEEP],
                )
                .await;
        }
        l.leader
    }
}

#[async_trait(?Send)]
impl Txn for PgTxn<'_> {
    async fn load(&mut self, needs: &Needs) -> Result<Loaded, StoreError> {
        let c = self.client()?;
        // Every replica's batch starts here, one at a time: the chain, the log and every
        // precondition are decided against everything committed before.
        let head = c
            .query_one(
                "SELECT audit_seq, audit_hash, log_seq FROM sigil_head WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(unavailable)?;
        let chain = ChainHead {
            seq: head.get::<_, i64>(0) as u64,
            hash: head.get(1),
        };
        let log_seq = head.get::<_, i64>(2) as u64;
        let mut out = Loaded {
            head: chain.clone(),
            log_seq,
            ..Loaded::default()
        };
        let ids: Vec<&str> = needs
            .identities
            .iter()
            .chain(needs.revisions.iter())
            .map(String::as_str)
            .collect();
        let spiffe: Vec<&str> = needs.spiffe_ids.iter().map(String::as_str).collect();
        let tokens: Vec<&str> = needs.join_tokens.iter().map(String::as_str).collect();
        let usage: Vec<&str> = needs.usage.iter().map(String::as_str).collect();
        let audit: Vec<i64> = needs.audit.iter().map(|s| *s as i64).collect();
        let (a, b, t, u, au) = futures_util::future::try_join5(
            query_if(
                c,
                !ids.is_empty(),
                "SELECT id, revision, record FROM sigil_identities WHERE id = ANY($1)",
                &ids,
            ),
            query_if(
                c,
                !spiffe.is_empty(),
                "SELECT spiffe_id, id FROM sigil_identities WHERE spiffe_id = ANY($1)",
                &spiffe,
            ),
            query_if(
                c,
                !tokens.is_empty(),
                "SELECT hash, record FROM sigil_join_tokens WHERE hash = ANY($1)",
                &tokens,
            ),
            query_if(
                c,
                !usage.is_empty(),
                "SELECT identity_id, record FROM sigil_usage WHERE identity_id = ANY($1)",
                &usage,
            ),
            query_if(
                c,
                !audit.is_empty(),
                "SELECT seq, entry FROM sigil_audit WHERE seq = ANY($1)",
                &audit,
            ),
        )
        .await?;
        for r in a {
            let id: String = r.get(0);
            if needs.revisions.contains(&id) {
                out.revisions.insert(id.clone(), r.get::<_, i64>(1) as u64);
            }
            if needs.identities.contains(&id) {
                let rec: IdentityRecord = from_json(&format!("sigil_identities[{id}]"), r.get(2))?;
                out.identities.insert(id, rec);
            }
        }
        for r in b {
            out.spiffe_ids.insert(r.get(0), r.get(1));
        }
        for r in t {
            let hash: String = r.get(0);
            let rec: JoinTokenRecord = from_json(&format!("sigil_join_tokens[{hash}]"), r.get(1))?;
            out.join_tokens.insert(hash, rec);
        }
        for r in u {
            let id: String = r.get(0);
            let rec: UsageRecord = from_json(&format!("sigil_usage[{id}]"), r.get(1))?;
            out.usage.insert(id, rec);
        }
        for r in au {
            let seq = r.get::<_, i64>(0) as u64;
            let e: AuditEntry = from_json(&format!("sigil_audit[{seq}]"), r.get(1))?;
            out.audit_hashes.insert(seq, e.hash);
        }
        self.head = chain;
        self.log_seq = log_seq;
        Ok(out)
    }

    async fn write(&mut self, writes: &[Write<'_>]) -> Result<(), StoreError> {
        let c = self.client()?;
        let mut head = self.head.clone();
        let mut logged = self.logged;
        let mut ledger: (Vec<Vec<u8>>, Vec<&str>, Vec<Vec<u8>>) = Default::default();
        let mut audit: (Vec<i64>, Vec<&[u8]>) = Default::default();
        // Statements in order; sent together (pipelined) and run in that order.
        let mut stmts: Vec<(&'static str, Vec<Box<dyn ToSql + Sync + Send + '_>>)> = Vec::new();
        for w in writes {
            match w {
                Write::PutIdentity { record, .. } => stmts.push((
                    "INSERT INTO sigil_identities (id, spiffe_id, revision, record) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (id) DO UPDATE SET spiffe_id = EXCLUDED.spiffe_id, revision = EXCLUDED.revision, record = EXCLUDED.record",
                    vec![
                        Box::new(record.id.as_str()),
                        Box::new(record.spiffe_id.to_string()),
                        Box::new(record.revision as i64),
                        Box::new(to_json(*record)),
                    ],
                )),
                Write::PutJoinToken(rec) => stmts.push((
                    "INSERT INTO sigil_join_tokens (hash, record) VALUES ($1, $2) ON CONFLICT (hash) DO UPDATE SET record = EXCLUDED.record",
                    vec![Box::new(rec.hash.as_str()), Box::new(to_json(rec.as_ref()))],
                )),
                Write::PutKey(rec) => stmts.push((
                    "INSERT INTO sigil_keys (id, record) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                    vec![Box::new(rec.id.as_str()), Box::new(to_json(*rec))],
                )),
                Write::AppendLedger(rec) => {
                    ledger.0.push(credential_key(rec.kind, &rec.credential_id)?);
                    ledger.1.push(rec.identity_id.as_str());
                    ledger.2.push(to_json(*rec));
                }
                Write::PutRevocation(rec) => stmts.push((
                    "INSERT INTO sigil_revocations (expires_at, id, record) VALUES ($1, $2, $3) \
                     ON CONFLICT (expires_at, id) DO UPDATE SET record = EXCLUDED.record",
                    vec![
                        Box::new(rec.expires_at.max(0)),
                        Box::new(credential_key(rec.kind, &rec.credential_id)?),
                        Box::new(to_json(*rec)),
                    ],
                )),
                Write::PruneRevocations { expired_before } => stmts.push((
                    "DELETE FROM sigil_revocations WHERE expires_at < $1",
                    vec![Box::new((*expired_before).max(0))],
                )),
                Write::PruneLedger {
                    issued_before,
                    limit,
                } => {
                    // Ledger ids start with the issue time in big-endian nanoseconds.
                    let end = ((*issued_before).max(0) as u64)
                        .saturating_mul(1_000_000_000)
                        .to_be_bytes()
                        .to_vec();
                    stmts.push((
                        "DELETE FROM sigil_ledger WHERE id IN (SELECT id FROM sigil_ledger WHERE id < $1 ORDER BY id LIMIT $2)",
                        vec![Box::new(end), Box::new(*limit as i64)],
                    ));
                }
                Write::PutOwner(rec) => stmts.push((
                    "INSERT INTO sigil_owners (name, record) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
                    vec![Box::new(rec.name.as_str()), Box::new(to_json(*rec))],
                )),
                Write::PutApproval(rec) => stmts.push((
                    "INSERT INTO sigil_approvals (id, record) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                    vec![Box::new(rec.id.as_str()), Box::new(to_json(*rec))],
                )),
                Write::PutUsage { identity_id, usage } => stmts.push((
                    "INSERT INTO sigil_usage (identity_id, record) VALUES ($1, $2) ON CONFLICT (identity_id) DO UPDATE SET record = EXCLUDED.record",
                    vec![Box::new(identity_id.as_str()), Box::new(to_json(usage))],
                )),
                Write::PruneAudit(cp) => {
                    stmts.push((
                        "DELETE FROM sigil_audit WHERE seq <= $1",
                        vec![Box::new(cp.seq as i64)],
                    ));
                    stmts.push((
                        "INSERT INTO sigil_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                        vec![Box::new(META_CHECKPOINT), Box::new(to_json(*cp))],
                    ));
                }
                Write::PutAnchor(a) => stmts.push((
                    "INSERT INTO sigil_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                    vec![Box::new(META_ANCHOR), Box::new(to_json(a))],
                )),
                Write::AppendAudit { seq, hash, bytes } => {
                    audit.0.push(*seq as i64);
                    audit.1.push(bytes.as_slice());
                    head = ChainHead {
                        seq: *seq,
                        hash: hash.clone(),
                    };
                }
                Write::Log(ops) => {
                    let pos = self.log_seq + 1;
                    logged = Some(pos);
                    stmts.push((
                        "INSERT INTO sigil_log (seq, ops) VALUES ($1, $2)",
                        vec![Box::new(pos as i64), Box::new(to_json(ops))],
                    ));
                }
                _ => {
                    return Err(StoreError::Unavailable(
                        "a write this backend does not know".into(),
                    ));
                }
            }
        }
        if !ledger.0.is_empty() {
            stmts.push((
                "INSERT INTO sigil_ledger (id, identity_id, record) SELECT * FROM UNNEST($1::bytea[], $2::text[], $3::bytea[])",
                vec![Box::new(ledger.0), Box::new(ledger.1), Box::new(ledger.2)],
            ));
        }
        if !audit.0.is_empty() {
            stmts.push((
                "INSERT INTO sigil_audit (seq, entry) SELECT * FROM UNNEST($1::bigint[], $2::bytea[])",
                vec![Box::new(audit.0), Box::new(audit.1)],
            ));
        }
        let futures = stmts.iter().map(|(sql, params)| async move {
            let st = c.prepare_cached(sql).await.map_err(unavailable)?;
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
            c.execute(&st, &refs).await.map_err(unavailable)
        });
        futures_util::future::try_join_all(futures).await?;
        self.head = head;
        self.logged = logged;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        #[cfg(feature = "faults")]
        if self
            .backend
            .faults
            .as_ref()
            .is_some_and(FaultSwitch::failing)
        {
            return Err(StoreError::Unavailable(
                "injected: the database is unreachable".into(),
            ));
        }
        let log = self.logged.unwrap_or(self.log_seq) as i64;
        let (seq, hash) = (self.head.seq as i64, self.head.hash.clone());
        let c = self.client()?;
        let params: [&(dyn ToSql + Sync); 3] = [&seq, &hash, &log];
        let update = c.execute(
            "UPDATE sigil_head SET audit_seq = $1, audit_hash = $2, log_seq = $3 WHERE id = 1",
            &params,
        );
        // Delivered to every listener when (and only if) the transaction commits.
        let notify = async {
            if self.logged.is_some() {
                c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &log.to_string()])
                    .await
                    .map(|_| ())
            } else {
                Ok(())
            }
        };
        let (u, n) = futures_util::future::join(update, notify).await;
        u.map_err(unavailable)?;
        n.map_err(unavailable)?;
        // BEGIN_DURABLE turned synchronous_commit on for this transaction if the server,
        // database or role had it off: COMMIT returns once the transaction is durable.
        c.batch_execute("COMMIT").await.map_err(unavailable)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for PgTxn<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Some(obj) = self.client.take()
        {
            // An abandoned or failed transaction must not go back to the pool open: the
            // connection is discarded instead (its session ends, rolling back).
            drop(deadpool_postgres::Object::take(obj));
        }
    }
}

impl PgTxn<'_> {
    fn client(&self) -> Result<&deadpool_postgres::Object, StoreError> {
        self.client
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the transaction is over".into()))
    }
}

/// Runs `sql` with one array parameter when `run`, else returns no rows.
async fn query_if<T: ToSql + Sync>(
    c: &deadpool_postgres::Object,
    run: bool,
    sql: &str,
    param: &T,
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    if !run {
        return Ok(Vec::new());
    }
    let st = c.prepare_cached(sql).await.map_err(unavailable)?;
    c.query(&st, &[param]).await.map_err(unavailable)
}

#[async_trait]
impl StoreReads for PostgresBackend {
    async fn meta(&self) -> Result<StoreMeta, StoreError> {
        let rows = self
            .rows(
                "SELECT value FROM sigil_meta WHERE name = $1",
                &[&META_INFO],
            )
            .await?;
        let r = rows
            .first()
            .ok_or_else(|| corrupt("sigil_meta", "store_meta is missing"))?;
        from_json("store_meta", r.get(0))
    }

    async fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        self.records(
            "SELECT record FROM sigil_identities ORDER BY id",
            &[],
            "identity",
        )
        .await
    }

    async fn join_token(&self, hash: &str) -> Result<Option<JoinTokenRecord>, StoreError> {
        Ok(self
            .records(
                "SELECT record FROM sigil_join_tokens WHERE hash = $1",
                &[&hash],
                "join token",
            )
            .await?
            .pop())
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.records("SELECT record FROM sigil_keys ORDER BY id", &[], "key")
            .await
    }

    async fn ledger_record(
        &self,
        credential_id: &[u8],
    ) -> Result<Option<LedgerRecord>, StoreError> {
        Ok(self
            .records(
                "SELECT record FROM sigil_ledger WHERE id = $1",
                &[&credential_id],
                "ledger record",
            )
            .await?
            .pop())
    }

    async fn ledger_len(&self) -> Result<u64, StoreError> {
        let rows = self.rows("SELECT count(*) FROM sigil_ledger", &[]).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    async fn ledger_since(
        &self,
        since: i64,
        identity_id: Option<String>,
    ) -> Result<Vec<LedgerRecord>, StoreError> {
        // Ledger ids start with the issue time in big-endian nanoseconds.
        let start = (since.max(0) as u64)
            .saturating_mul(1_000_000_000)
            .to_be_bytes()
            .to_vec();
        match identity_id {
            Some(id) => {
                self.records(
                    "SELECT record FROM sigil_ledger WHERE id >= $1 AND identity_id = $2 ORDER BY id",
                    &[&start, &id],
                    "ledger record",
                )
                .await
            }
            None => {
                self.records(
                    "SELECT record FROM sigil_ledger WHERE id >= $1 ORDER BY id",
                    &[&start],
                    "ledger record",
                )
                .await
            }
        }
    }

    async fn revocations(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        self.records(
            "SELECT record FROM sigil_revocations ORDER BY expires_at, id",
            &[],
            "revocation",
        )
        .await
    }

    async fn usage(&self) -> Result<Vec<UsageRecord>, StoreError> {
        self.records(
            "SELECT record FROM sigil_usage ORDER BY identity_id",
            &[],
            "usage",
        )
        .await
    }

    async fn owners(&self) -> Result<Vec<OwnerRecord>, StoreError> {
        self.records(
            "SELECT record FROM sigil_owners ORDER BY name",
            &[],
            "owner",
        )
        .await
    }

    async fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
        self.records(
            "SELECT record FROM sigil_approvals ORDER BY id",
            &[],
            "approval",
        )
        .await
    }

    async fn ledger_count_before(
        &self,
        issued_before: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let end = ((issued_before).max(0) as u64)
            .saturating_mul(1_000_000_000)
            .to_be_bytes()
            .to_vec();
        let rows = self
            .rows(
                "SELECT count(*) FROM (SELECT 1 FROM sigil_ledger WHERE id < $1 LIMIT $2) AS t",
                &[&end, &(limit as i64)],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as usize))
    }

    async fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        self.records(
            "SELECT record FROM sigil_join_tokens ORDER BY hash",
            &[],
            "join token",
        )
        .await
    }

    async fn audit_head(&self) -> Result<u64, StoreError> {
        let rows = self
            .rows("SELECT COALESCE(max(seq), 0) FROM sigil_audit", &[])
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    async fn audit_entries(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(self
            .rows(
                "SELECT seq, entry FROM sigil_audit WHERE seq >= $1 ORDER BY seq LIMIT $2",
                &[&(from_seq as i64), &limit],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1)))
            .collect())
    }

    async fn audit_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.records(
            "SELECT value FROM sigil_meta WHERE name = $1",
            &[&META_CHECKPOINT],
            "meta/audit_checkpoint",
        )
        .await
        .map(|mut v| v.pop())
    }

    async fn audit_anchor(&self) -> Result<Option<Anchor>, StoreError> {
        self.records(
            "SELECT value FROM sigil_meta WHERE name = $1",
            &[&META_ANCHOR],
            "meta/audit_anchor",
        )
        .await
        .map(|mut v| v.pop())
    }

    async fn export(
        &self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<sigil_store_core::dump::Summary, StoreError> {
        export(&self.cfg, out).await
    }
}

/// Writes every record of one snapshot (a repeatable-read transaction, while replicas go on
/// committing) as a backup, on a connection of its own.
pub async fn export(
    cfg: &PgConfig,
    out: Box<dyn std::io::Write + Send>,
) -> Result<sigil_store_core::dump::Summary, StoreError> {
    use sigil_store_core::dump::{DumpWriter, Record};
    let mut client = cfg.client().await?;
    let t = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(unavailable)?;
    let meta_rows = t
        .query("SELECT name, value FROM sigil_meta", &[])
        .await
        .map_err(unavailable)?;
    let meta: HashMap<String, Vec<u8>> = meta_rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
        .collect();
    let info: StoreMeta = from_json(
        "store_meta",
        meta.get(META_INFO)
            .ok_or_else(|| corrupt("sigil_meta", "store_meta is missing"))?,
    )?;
    let check = meta
        .get(META_KEY_CHECK)
        .ok_or_else(|| corrupt("sigil_meta", "key_check is missing"))?;
    let checkpoint = meta
        .get(META_CHECKPOINT)
        .map(|b| from_json::<Checkpoint>("meta/audit_checkpoint", b))
        .transpose()?;
    let anchor = meta
        .get(META_ANCHOR)
        .map(|b| from_json::<Anchor>("meta/audit_anchor", b))
        .transpose()?;
    let mut w = DumpWriter::new(out, info, check, checkpoint, anchor)?;
    macro_rules! each {
        ($sql:expr, $ty:ty, $wrap:expr) => {{
            let rows = t.query($sql, &[]).await.map_err(unavailable)?;
            for r in rows {
                let rec: $ty = from_json($sql, r.get(0))?;
                w.record($wrap(rec))?;
            }
        }};
    }
    each!(
        "SELECT record FROM sigil_identities ORDER BY id",
        IdentityRecord,
        Record::Identity
    );
    each!(
        "SELECT record FROM sigil_join_tokens ORDER BY hash",
        JoinTokenRecord,
        Record::JoinToken
    );
    each!(
        "SELECT record FROM sigil_keys ORDER BY id",
        KeyRecord,
        Record::Key
    );
    each!(
        "SELECT record FROM sigil_ledger ORDER BY id",
        LedgerRecord,
        Record::Ledger
    );
    each!(
        "SELECT record FROM sigil_revocations ORDER BY expires_at, id",
        RevocationRecord,
        Record::Revocation
    );
    each!(
        "SELECT record FROM sigil_usage ORDER BY identity_id",
        UsageRecord,
        Record::Usage
    );
    each!(
        "SELECT record FROM sigil_owners ORDER BY name",
        OwnerRecord,
        Record::Owner
    );
    each!(
        "SELECT record FROM sigil_approvals ORDER BY id",
        ApprovalRecord,
        Record::Approval
    );
    let rows = t
        .query("SELECT seq, entry FROM sigil_audit ORDER BY seq", &[])
        .await
        .map_err(unavailable)?;
    for r in rows {
        let seq = r.get::<_, i64>(0) as u64;
        let entry = String::from_utf8(r.get::<_, Vec<u8>>(1))
            .map_err(|e| corrupt(&format!("sigil_audit[{seq}]"), e))?;
        w.record(Record::Audit { seq, entry })?;
    }
    t.commit().await.map_err(unavailable)?;
    w.finish()
}

/// Reads the whole audit chain, its checkpoint and anchor in one snapshot, without writing
/// (for `sigil audit verify --offline` against the database).
pub async fn read_audit(
    cfg: &PgConfig,
) -> Result<sigil_store_core::audit::StoredChain, StoreError> {
    let mut client = cfg.client().await.map_err(open_error)?;
    let t = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(unavailable)?;
    let meta = |name: &'static str| {
        let t = &t;
        async move {
            t.query_opt("SELECT value FROM sigil_meta WHERE name = $1", &[&name])
                .await
                .map_err(unavailable)
        }
    };
    let checkpoint = meta(META_CHECKPOINT)
        .await?
        .map(|r| from_json::<Checkpoint>("meta/audit_checkpoint", r.get(0)))
        .transpose()?;
    let anchor = meta(META_ANCHOR)
        .await?
        .map(|r| from_json::<Anchor>("meta/audit_anchor", r.get(0)))
        .transpose()?;
    let entries = t
        .query("SELECT seq, entry FROM sigil_audit ORDER BY seq", &[])
        .await
        .map_err(unavailable)?
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1)))
        .collect();
    t.commit().await.map_err(unavailable)?;
    Ok(sigil_store_core::audit::StoredChain {
        checkpoint,
        anchor,
        entries,
    })
}

/// Makes a new store in the empty database from the backup file `backup` (checked in full
/// first, then written in one transaction): `sigil restore` and `sigil migrate` into
/// PostgreSQL. Refuses a database that already holds a store.
pub async fn restore(
    cfg: &PgConfig,
    sealer: &Sealer,
    backup: &std::path::Path,
) -> Result<sigil_store_core::dump::Summary, StoreError> {
    let (header, _) = sigil_store_core::dump::check(backup, sealer)?;
    PostgresBackend::create(cfg, sealer, header.meta).await?;
    let backend = PostgresBackend::open(cfg, sealer).await?;
    let result = sigil_store_core::dump::import(&backend, sealer, backup).await;
    if result.is_err() {
        // Leave the database as it was found: empty of Sigil's records.
        if let Ok(c) = cfg.client().await {
            let _ = c.execute("DELETE FROM sigil_meta", &[]).await;
        }
    }
    backend.shut_down();
    result
}

/// [`restore`] on a thread of its own with its own runtime (the import's transaction is not
/// `Send`), for callers anywhere.
pub fn restore_blocking(
    cfg: &PgConfig,
    sealer: &Sealer,
    backup: &std::path::Path,
) -> Result<sigil_store_core::dump::Summary, StoreError> {
    block_on_own_thread(|| restore(cfg, sealer, backup))
}

/// Runs the future `f` makes on a new thread with a current-thread runtime, and waits.
pub fn block_on_own_thread<T, F, Fut>(f: F) -> Result<T, StoreError>
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Unavailable(format!("runtime: {e}")))?;
            rt.block_on(f())
        })
        .join()
        .map_err(|_| StoreError::Unavailable("a store task panicked".into()))?
    })
}

/// Tools for tests that change a store's records behind its back.
pub mod testing {
    use super::*;

    /// Rewrites the record format version in the store's metadata.
    pub async fn set_schema_version(cfg: &PgConfig, version: u64) -> Result<(), StoreError> {
        let c = cfg.client().await?;
        let r = c
            .query_one(
                "SELECT value FROM sigil_meta WHERE name = $1",
                &[&META_INFO],
            )
            .await
            .map_err(unavailable)?;
        let mut meta: StoreMeta = from_json("store_meta", r.get(0))?;
        meta.schema_version = version;
        c.execute(
            "UPDATE sigil_meta SET value = $2 WHERE name = $1",
            &[&META_INFO, &to_json(&meta)],
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes the last `audit` entries and `ledger` rows, as someone with write access to the
    /// database but not the master key could.
    pub async fn truncate_tail(cfg: &PgConfig, audit: i64, ledger: i64) -> Result<(), StoreError> {
        let c = cfg.client().await?;
        c.execute(
            "DELETE FROM sigil_audit WHERE seq IN (SELECT seq FROM sigil_audit ORDER BY seq DESC LIMIT $1)",
            &[&audit],
        )
        .await
        .map_err(unavailable)?;
        c.execute(
            "DELETE FROM sigil_ledger WHERE id IN (SELECT id FROM sigil_ledger ORDER BY id DESC LIMIT $1)",
            &[&ledger],
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}

/// Brings the database's schema to this build's version (see [`schema`]); returns the version
/// it found.
pub async fn migrate(cfg: &PgConfig) -> Result<i64, StoreError> {
    let client = cfg.client().await.map_err(open_error)?;
    schema::migrate(&client, cfg).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_password_is_never_in_debug_messages_or_errors() {
        let cfg = PgConfig::new(
            "postgres://sigil:s3cr%40t@db.internal:5432/sigil?sslmode=require&password=other",
            None,
        )
        .unwrap();
        let shown = format!("{cfg:?} {}", cfg.describe());
        assert!(
            !shown.contains("s3cr") && !shown.contains("other"),
            "{shown}"
        );
        assert!(
            shown.contains("postgres://sigil:***@db.internal:5432/sigil"),
            "{shown}"
        );
        // A password with an @ in it, and a URL that does not parse: still not repeated.
        let cfg = PgConfig::new("postgres://u:p@ss@db/sigil", None).unwrap();
        assert_eq!(cfg.describe(), "postgres://u:***@db/sigil");
        let err = PgConfig::new("postgres://u:s3cret@db:notaport/sigil", None)
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("s3cret") && err.contains("not a valid PostgreSQL URL"),
            "{err}"
        );
        let err = PgConfig::new("mysql://u:s3cret@db/sigil", None)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    async fn setting(c: &tokio_postgres::Client) -> String {
        let row = c.query_one("SHOW synchronous_commit", &[]).await.unwrap();
        row.get(0)
    }

    #[tokio::test]
    async fn write_transactions_are_durable_even_where_the_database_turned_synchronous_commit_off()
    {
        let pg = match local::LocalPostgres::start() {
            Ok(pg) => pg,
            Err(e) => {
                assert!(
                    std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
                    "needs PostgreSQL, and SIGIL_TEST_REQUIRE_ALL is set: {e}"
                );
                eprintln!("\n!!! SKIPPED the synchronous_commit test: {e} !!!\n");
                return;
            }
        };
        pg.create_database("lazy").unwrap();
        let cfg = PgConfig::new(&pg.url("lazy"), None).unwrap();
        for (database_says, commit_uses) in [
            ("off", "on"),
            ("remote_apply", "remote_apply"),
            ("local", "local"),
        ] {
            let admin = cfg.client().await.unwrap();
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE lazy SET synchronous_commit = {database_says}"
                ))
                .await
                .unwrap();
            // A new session sees the database's setting…
            let c = cfg.client().await.unwrap();
            assert_eq!(setting(&c).await, database_says);
            // …and a Sigil write transaction commits with a durable one.
            c.batch_execute(BEGIN_DURABLE).await.unwrap();
            assert_eq!(
                setting(&c).await,
                commit_uses,
                "database says {database_says}"
            );
            c.batch_execute("ROLLBACK").await.unwrap();
            // Only for that transaction: the session is left as it was.
            assert_eq!(setting(&c).await, database_says);
        }
    }
}
