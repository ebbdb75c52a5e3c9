//! Broker settings: `DATA_DIR/sigil.toml`, then `SIGIL_*` environment variables and flags
//! (applied by the CLI). Durations are written as `90s`, `10m`, `1h`, `90d`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Name of the config file inside the data dir.
pub const CONFIG_FILE: &str = "sigil.toml";
/// Default master key file inside the data dir (used when `SIGIL_MASTER_KEY` is unset).
pub const MASTER_KEY_FILE: &str = "master.key";
/// The trust bundle to hand to workloads.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// Where `sigil serve` writes the URL it is listening on.
pub const BROKER_URL_FILE: &str = "broker.url";
/// Directory of the first operator credential.
pub const ADMIN_DIR: &str = "admin";

/// Why the config could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The cause (part of the message, not a separate `source`, so it is said once).
        cause: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

/// Everything `sigil serve` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Data directory (not stored in the file; it is where the file lives).
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// The trust domain; informational (the store is authoritative).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// gRPC (TLS) listen address.
    pub listen: SocketAddr,
    /// HTTP listen address (health, metrics, bundle, OIDC discovery, CRLs); `None` (written
    /// `"off"`) turns it off.
    #[serde(with = "addr_or_off")]
    pub http_listen: Option<SocketAddr>,
    /// Serve the HTTP listener over TLS (relying parties fetch OIDC discovery only over
    /// https). With no `http_tls_cert_file`, it presents the broker's own certificate (the one
    /// the gRPC listener has, for `server_names`; verify it with `bundle.pem`). `sigil init`
    /// turns this on; a config file without the key keeps plain HTTP (as before it existed).
    #[serde(default)]
    pub http_tls: bool,
    /// PEM certificate chain for the HTTP listener instead of the broker's own (e.g. one from
    /// the web PKI, for cloud web-identity federation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_tls_cert_file: Option<PathBuf>,
    /// PEM private key for `http_tls_cert_file` (mode 0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_tls_key_file: Option<PathBuf>,
    /// DNS names in the broker's own server certificate (loopback IPs are always added).
    pub server_names: Vec<String>,
    /// The `iss` of every JWT-SVID and the issuer of OIDC discovery: the public https URL
    /// relying parties reach the HTTP listener at (e.g. `https://sigil.example.org`). Unset:
    /// `https://<first server name>:<HTTP port>` (no port for 443). Never taken from a request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// Accept an `http://` `jwt_issuer` (development only: relying parties such as cloud
    /// web-identity federation refuse one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub jwt_issuer_allow_http: bool,
    /// Where the store is: unset for the embedded store (`DATA_DIR/sigil.redb`), or a
    /// PostgreSQL URL (`postgres://user:password@host:5432/sigil?sslmode=require`) that every
    /// replica shares. `--store` and `SIGIL_STORE` override it; keep a URL with a password in
    /// `SIGIL_STORE` (from a secret) rather than here. Never printed with its password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreUrl>,
    /// CA certificates (PEM) to verify the PostgreSQL server's TLS certificate with (default:
    /// the public web roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_ca_file: Option<PathBuf>,
    /// Master key file; default `DATA_DIR/master.key`. `SIGIL_MASTER_KEY` takes precedence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_key_file: Option<PathBuf>,
    /// Issuance defaults and limits.
    pub issuance: Issuance,
    /// Request limits.
    pub limits: Limits,
    /// Key rotation and revocation housekeeping.
    pub rotation: Rotation,
    /// Governance: report thresholds, behaviour baselines and what an anomaly does.
    pub governance: Governance,
    /// The Unix socket for local workloads: `unix` attestation by peer credentials, the
    /// SPIFFE Workload API and the Sigil Broker API. Unset: no socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_socket: Option<PathBuf>,
    /// Permissions of the socket file. Workloads are told apart by their peer credentials, not
    /// by who may connect, so every local user may connect by default (like SPIRE's agent
    /// socket); narrow it (e.g. "0660" with a group) to hide the broker from other users.
    /// Written as an octal string ("0666") or a TOML octal integer (0o666).
    #[serde(with = "mode")]
    pub workload_socket_mode: u32,
    /// Trusted OIDC issuers (`[[oidc]]`): Kubernetes, GitHub Actions, GitLab CI, any provider.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub oidc: Vec<OidcIssuer>,
    /// Gate 3 (Cedar request policy) and admin roles.
    pub policy: Policy,
    /// Token exchange for delegation (agents acting for workloads).
    pub exchange: Exchange,
    /// The audit log's growth: aggregation of repeated failures, retention.
    pub audit: Audit,
}

/// A store URL as configured; `Debug` hides any password in it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match crate::store::PgConfig::new(&self.0, None) {
            Ok(pg) => write!(f, "{:?}", pg.describe()),
            Err(_) => f.write_str("\"<not a store URL>\""),
        }
    }
}

/// How the audit log stays bounded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Audit {
    /// Identical refusals (same source, method or gate, and reason) within this interval are
    /// written once; the next entry counts the rest. `0s` writes every refusal.
    #[serde(with = "dur")]
    pub aggregate_interval: Duration,
    /// Entries older than this are removed, leaving a checkpoint the chain verifies from.
    #[serde(with = "dur")]
    pub retention: Duration,
    /// Where removed entries are first exported as JSON lines (one file per prune); unset:
    /// removed without export.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_dir: Option<PathBuf>,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            aggregate_interval: Duration::from_secs(60),
            retention: Duration::from_secs(400 * 86400),
            export_dir: None,
        }
    }
}

/// A trusted OIDC issuer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuer {
    /// A short name for logs, audit entries and metrics (`prod-cluster`, `github`).
    pub name: String,
    /// `kubernetes`, `github`, `gitlab` or `generic`: which extra selectors to derive
    /// (`k8s:ns:...`, `github:repository:...`, `gitlab:project_path:...`) and defaults.
    #[serde(default)]
    pub preset: OidcPreset,
    /// The exact `iss` of accepted tokens. Defaults for `github`
    /// (<https://token.actions.githubusercontent.com>) and `gitlab` (<https://gitlab.com>).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one. Required: a token minted for
    /// another service must not attest here.
    pub audiences: Vec<String>,
    /// The issuer's JWKS from a file (re-read when a token names an unknown key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// The issuer's JWKS over HTTPS (cached; refetched on an unknown `kid`, at most once per
    /// `jwks_min_refresh`). Defaults for `github` and `gitlab`. With neither `jwks_file` nor
    /// `jwks_url`, the JWKS is found by OpenID Connect discovery: the `jwks_uri` of
    /// `{issuer}/.well-known/openid-configuration`, whose `issuer` must equal ours exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// PEM CA certificates to trust for `jwks_url` instead of the public web PKI (e.g. a
    /// cluster's CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Accepted signature algorithms. HMAC and `none` are never accepted.
    #[serde(default = "default_oidc_algorithms")]
    pub algorithms: Vec<String>,
    /// Tolerance for `exp`, `nbf` and `iat`.
    #[serde(default = "default_skew", with = "dur")]
    pub clock_skew: Duration,
    /// How long a fetched JWKS is used before it is fetched again.
    #[serde(default = "default_jwks_cache", with = "dur")]
    pub jwks_cache: Duration,
    /// At most one refetch per this interval when tokens name unknown keys.
    #[serde(default = "default_jwks_min_refresh", with = "dur")]
    pub jwks_min_refresh: Duration,
}

fn default_oidc_algorithms() -> Vec<String> {
    [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ]
    .map(String::from)
    .to_vec()
}
fn default_skew() -> Duration {
    Duration::from_secs(60)
}
fn default_jwks_cache() -> Duration {
    Duration::from_secs(300)
}
fn default_jwks_min_refresh() -> Duration {
    Duration::from_secs(30)
}

/// Which claims an OIDC issuer's tokens carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OidcPreset {
    /// Only `oidc:iss:`, `oidc:sub:` and `oidc:claim:` selectors.
    #[default]
    Generic,
    /// Kubernetes projected service-account tokens: `k8s:ns:`, `k8s:sa:`, `k8s:pod-name:`,
    /// `k8s:pod-uid:`, `k8s:node-name:`.
    Kubernetes,
    /// GitHub Actions ID tokens: `github:repository:`, `github:ref:`, `github:workflow:`,
    /// `github:environment:`, ...
    Github,
    /// GitLab CI ID tokens: `gitlab:project_path:`, `gitlab:ref:`, `gitlab:environment:`, ...
    Gitlab,
}

impl OidcIssuer {
    /// The issuer with its preset's defaults filled in.
    pub fn resolved(&self) -> OidcIssuer {
        let mut r = self.clone();
        match self.preset {
            OidcPreset::Github => {
                if r.issuer.is_empty() {
                    r.issuer = "https://token.actions.githubusercontent.com".into();
                }
                if r.jwks_file.is_none() && r.jwks_url.is_none() {
                    r.jwks_url = Some(format!("{}/.well-known/jwks", r.issuer));
                }
            }
            OidcPreset::Gitlab => {
                if r.issuer.is_empty() {
                    r.issuer = "https://gitlab.com".into();
                }
                if r.jwks_file.is_none() && r.jwks_url.is_none() {
                    r.jwks_url = Some(format!("{}/oauth/discovery/keys", r.issuer));
                }
            }
            OidcPreset::Kubernetes | OidcPreset::Generic => {}
        }
        r
    }

    /// Where the OpenID Connect discovery document is, when the JWKS is to be discovered
    /// (neither `jwks_file` nor `jwks_url` given, after preset defaults).
    pub fn discovery_url(&self) -> Option<String> {
        let r = self.resolved();
        (r.jwks_file.is_none() && r.jwks_url.is_none()).then(|| {
            format!(
                "{}/.well-known/openid-configuration",
                r.issuer.trim_end_matches('/')
            )
        })
    }

    fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "oidc issuer name {n:?} must be letters, digits, '-', '_' or '.'"
            ));
        }
        let r = self.resolved();
        if r.issuer.is_empty() {
            return Err(format!("oidc issuer {n:?}: `issuer` is required"));
        }
        if r.audiences.is_empty() || r.audiences.iter().any(String::is_empty) {
            return Err(format!(
                "oidc issuer {n:?}: `audiences` must list the audiences tokens for Sigil carry"
            ));
        }
        match (&r.jwks_file, &r.jwks_url) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "oidc issuer {n:?}: give `jwks_file` or `jwks_url`, not both"
                ));
            }
            (None, None) => {
                if !r.issuer.starts_with("https://") {
                    return Err(format!(
                        "oidc issuer {n:?}: give `jwks_file` or `jwks_url`; keys can only be discovered from an https:// issuer (not {:?})",
                        r.issuer
                    ));
                }
            }
            (None, Some(u)) => {
                if !u.starts_with("https://") {
                    return Err(format!(
                        "oidc issuer {n:?}: jwks_url {u:?} must be https://"
                    ));
                }
            }
            (Some(_), None) => {}
        }
        if r.algorithms.is_empty() {
            return Err(format!("oidc issuer {n:?}: `algorithms` is empty"));
        }
        for a in &r.algorithms {
            if a.eq_ignore_ascii_case("none") || a.to_ascii_uppercase().starts_with("HS") {
                return Err(format!(
                    "oidc issuer {n:?}: algorithm {a} is refused (none and HMAC cannot prove a workload)"
                ));
            }
            if oidc_algorithm(a).is_none() {
                return Err(format!(
                    "oidc issuer {n:?}: unknown algorithm {a:?} (RS256, PS256, ES256, ES384, EdDSA, ...)"
                ));
            }
        }
        if r.clock_skew > Duration::from_secs(300) {
            return Err(format!("oidc issuer {n:?}: clock_skew must be at most 5m"));
        }
        Ok(())
    }
}

/// The algorithm named `name`, if `jsonwebtoken` supports it and it is asymmetric.
pub fn oidc_algorithm(name: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm;
    let a: Algorithm = name.parse().ok()?;
    match a {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
        other => Some(other),
    }
}

/// Gate 3 and admin roles.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// A `.cedar` file or a directory of them; unset: only the built-in policies. Relative
    /// paths are relative to the data dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `permit`: the built-in policy permits whatever gates 1 and 2 allowed, so your policies
    /// only need `forbid` rules. `deny`: nothing is minted unless one of your policies permits it.
    pub default: PolicyDefault,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            path: None,
            default: PolicyDefault::Permit,
        }
    }
}

/// The built-in request policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyDefault {
    /// Permit what gates 1 and 2 allowed.
    Permit,
    /// Permit nothing by default.
    Deny,
}

/// Token exchange settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Exchange {
    /// Longest actor chain in an exchanged token (`act` nesting).
    pub max_depth: usize,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange { max_depth: 3 }
    }
}

/// What an anomaly does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAnomaly {
    /// Record it (audit entry, metric, report finding).
    Alert,
    /// Record it and suspend the identity until an operator resumes it.
    Suspend,
}

/// Governance thresholds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Governance {
    /// An identity (or an entitlement) unused this long is reported.
    #[serde(with = "dur")]
    pub unused_after: Duration,
    /// Identities expiring within this are reported.
    #[serde(with = "dur")]
    pub expiring_within: Duration,
    /// Identities whose max TTL is above this are reported.
    #[serde(with = "dur")]
    pub max_ttl_policy: Duration,
    /// What an anomaly does, unless the identity's `on_anomaly` label says otherwise.
    pub on_anomaly: OnAnomaly,
    /// A baseline exists once an identity has been issued this many credentials...
    pub baseline_min_issued: u64,
    /// ...over at least this long.
    #[serde(with = "dur")]
    pub baseline_learning: Duration,
    /// An hour with this many times the identity's usual hourly rate is a spike...
    pub rate_spike_factor: f64,
    /// ...and at least this many issuances.
    pub rate_spike_floor: u64,
}

impl Default for Governance {
    fn default() -> Self {
        Governance {
            unused_after: Duration::from_secs(30 * 86400),
            expiring_within: Duration::from_secs(14 * 86400),
            max_ttl_policy: Duration::from_secs(24 * 3600),
            on_anomaly: OnAnomaly::Alert,
            baseline_min_issued: 20,
            baseline_learning: Duration::from_secs(3600),
            rate_spike_factor: 10.0,
            rate_spike_floor: 100,
        }
    }
}

/// Key rotation schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rotation {
    /// How long a JWT key signs before the next one takes over.
    #[serde(with = "dur")]
    pub jwt_key_lifetime: Duration,
    /// Validity of a new signing intermediate.
    #[serde(with = "dur")]
    pub x509_ca_ttl: Duration,
    /// How long an intermediate signs before the next one takes over (at most half its TTL,
    /// so nothing it signed can outlive it).
    #[serde(with = "dur")]
    pub x509_ca_rotate_after: Duration,
    /// How long the next key is published before it signs, so verifiers have it first
    /// (at least the bundle refresh hint, 5m).
    #[serde(with = "dur")]
    pub prepare: Duration,
    /// How often the schedule is checked and expired revocations are pruned.
    #[serde(with = "dur")]
    pub check_interval: Duration,
    /// Ledger records of credentials issued longer ago than this are dropped (garbage
    /// collection, in small batches in the background). At least issuance.max_ttl_ceiling, so
    /// only expired credentials go. The audit log keeps every issuance regardless.
    #[serde(with = "dur")]
    pub ledger_retention: Duration,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            jwt_key_lifetime: Duration::from_secs(7 * 86400),
            x509_ca_ttl: Duration::from_secs(30 * 86400),
            x509_ca_rotate_after: Duration::from_secs(15 * 86400),
            prepare: Duration::from_secs(600),
            check_interval: Duration::from_secs(30),
            ledger_retention: Duration::from_secs(30 * 86400),
        }
    }
}

/// Issuance defaults and ceilings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Issuance {
    /// X.509-SVID lifetime when the request names none.
    #[serde(with = "dur")]
    pub default_x509_ttl: Duration,
    /// JWT-SVID lifetime when the request names none.
    #[serde(with = "dur")]
    pub default_jwt_ttl: Duration,
    /// An identity's `max_ttl` when the operator gives none.
    #[serde(with = "dur")]
    pub default_max_ttl: Duration,
    /// The highest `max_ttl` an operator may grant an identity.
    #[serde(with = "dur")]
    pub max_ttl_ceiling: Duration,
    /// Join token lifetime when none is asked for.
    #[serde(with = "dur")]
    pub join_token_ttl: Duration,
    /// Longest join token lifetime.
    #[serde(with = "dur")]
    pub max_join_token_ttl: Duration,
    /// Identity lifetime when none is given (identities must be recertified after this).
    #[serde(with = "dur")]
    pub identity_lifetime: Duration,
    /// notBefore back-dating for clock skew (at most 30 s).
    #[serde(with = "dur")]
    pub backdate: Duration,
    /// Lifetime of the broker's own TLS certificate (renewed at half-life).
    #[serde(with = "dur")]
    pub server_cert_ttl: Duration,
}

impl Default for Issuance {
    fn default() -> Self {
        Issuance {
            default_x509_ttl: Duration::from_secs(3600),
            default_jwt_ttl: Duration::from_secs(300),
            default_max_ttl: Duration::from_secs(3600),
            max_ttl_ceiling: Duration::from_secs(7 * 86400),
            join_token_ttl: Duration::from_secs(600),
            max_join_token_ttl: Duration::from_secs(86400),
            identity_lifetime: Duration::from_secs(90 * 86400),
            backdate: Duration::from_secs(30),
            server_cert_ttl: Duration::from_secs(86400),
        }
    }
}

/// Request limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest gRPC request message, bytes.
    pub max_request_bytes: usize,
    /// Server-side deadline of every request.
    #[serde(with = "dur")]
    pub request_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// TLS handshake deadline.
    #[serde(with = "dur")]
    pub handshake_timeout: Duration,
    /// Most JWT-SVIDs in one Attest call.
    pub max_jwts_per_request: usize,
    /// Most audiences (or scopes) in one JWT-SVID.
    pub max_audiences: usize,
    /// Most DNS names in one X.509-SVID.
    pub max_dns_names: usize,
    /// Most `Watch` streams open at once for one client (one certificate, or one process on
    /// the Unix socket); an SDK needs one.
    pub max_watch_streams_per_client: usize,
    /// Most calls in flight at once for one client — one workload instance: its client
    /// certificate, its process on the Unix socket, or its source address when it presents no
    /// credential — across all its connections: a unary call counts until it is answered, a
    /// stream until it ends. Replicas sharing an identity each have their own. 0 turns it off.
    pub max_streams_per_client: usize,
    /// Changes waiting for the store writer; beyond that, a request that would write is
    /// refused at once with `Unavailable` rather than queued (counted in
    /// `sigil_store_shed_total`).
    pub store_queue: usize,
    /// Calls per second (and burst) from one source address that presents no credential
    /// (attestation, bundle fetches, a `Watch` without a certificate); 0 turns it off.
    pub unauthenticated_per_second: u32,
    /// Burst of unauthenticated calls from one source address.
    pub unauthenticated_burst: u32,
    /// Calls per second from one identity (its client certificate's SPIFFE ID, or one uid on
    /// the Unix socket); 0 turns it off.
    pub authenticated_per_second: u32,
    /// Burst of calls from one identity.
    pub authenticated_burst: u32,
    /// HTTP requests per second from one source address (health checks are never limited);
    /// 0 turns it off.
    pub http_per_second: u32,
    /// Burst of HTTP requests from one source address.
    pub http_burst: u32,
    /// Open connections on the gRPC (TLS) listener.
    pub max_connections: usize,
    /// Open connections from one source address, on the gRPC and the HTTP listener each.
    pub max_connections_per_address: usize,
    /// Open connections on the HTTP listener.
    pub max_http_connections: usize,
    /// Open connections on the Unix socket.
    pub max_unix_connections: usize,
    /// Open connections on the Unix socket from one uid.
    pub max_unix_connections_per_uid: usize,
    /// How long an HTTP connection may wait for a request's headers, idle or not.
    #[serde(with = "dur")]
    pub http_header_timeout: Duration,
    /// On shutdown, how long in-flight calls get before every connection is closed.
    #[serde(with = "dur")]
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(10),
            max_concurrent_streams: 512,
            handshake_timeout: Duration::from_secs(10),
            max_jwts_per_request: 8,
            max_audiences: 16,
            max_dns_names: 32,
            max_watch_streams_per_client: 64,
            max_streams_per_client: 1024,
            store_queue: 16_384,
            unauthenticated_per_second: 50,
            unauthenticated_burst: 200,
            authenticated_per_second: 500,
            authenticated_burst: 2000,
            http_per_second: 100,
            http_burst: 400,
            max_connections: 4096,
            max_connections_per_address: 256,
            max_http_connections: 512,
            max_unix_connections: 1024,
            max_unix_connections_per_uid: 256,
            http_header_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("."),
            trust_domain: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            http_tls: true,
            http_tls_cert_file: None,
            http_tls_key_file: None,
            server_names: vec!["localhost".into()],
            jwt_issuer: None,
            jwt_issuer_allow_http: false,
            store: None,
            store_ca_file: None,
            master_key_file: None,
            issuance: Issuance::default(),
            limits: Limits::default(),
            rotation: Rotation::default(),
            governance: Governance::default(),
            workload_socket: None,
            workload_socket_mode: 0o666,
            oidc: Vec::new(),
            policy: Policy::default(),
            exchange: Exchange::default(),
            audit: Audit::default(),
        }
    }
}

impl Config {
    /// Reads `DATA_DIR/sigil.toml` (defaults when absent).
    pub fn load(data_dir: &Path) -> Result<Config, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path.display().to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(cause) => {
                return Err(ConfigError::Io {
                    path: path.display().to_string(),
                    cause,
                });
            }
        };
        cfg.data_dir = data_dir.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the config from `file`, which must exist, for a broker whose data dir is
    /// `data_dir` (`sigil serve --config`): the config can then live apart from the data,
    /// e.g. in a Kubernetes ConfigMap, with the master key in a Secret (`master_key_file`).
    /// Relative paths in it are still relative to the data dir.
    pub fn load_file(file: &Path, data_dir: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|cause| ConfigError::Io {
            path: file.display().to_string(),
            cause,
        })?;
        let mut cfg = Self::parse(&text, &file.display().to_string())?;
        cfg.data_dir = data_dir.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    /// The TOML text of this config.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store()?;
        let i = &self.issuance;
        if i.backdate > sigil_pki::ca::MAX_BACKDATE {
            return Err(ConfigError::Invalid(
                "issuance.backdate must be at most 30s".into(),
            ));
        }
        if i.default_max_ttl > i.max_ttl_ceiling {
            return Err(ConfigError::Invalid(
                "issuance.default_max_ttl is above issuance.max_ttl_ceiling".into(),
            ));
        }
        if i.join_token_ttl > i.max_join_token_ttl {
            return Err(ConfigError::Invalid(
                "issuance.join_token_ttl is above issuance.max_join_token_ttl".into(),
            ));
        }
        for (name, d) in [
            ("default_x509_ttl", i.default_x509_ttl),
            ("default_jwt_ttl", i.default_jwt_ttl),
            ("server_cert_ttl", i.server_cert_ttl),
        ] {
            if d < Duration::from_secs(1) {
                return Err(ConfigError::Invalid(format!(
                    "issuance.{name} must be at least 1s"
                )));
            }
        }
        let r = &self.rotation;
        if r.x509_ca_rotate_after * 2 > r.x509_ca_ttl {
            return Err(ConfigError::Invalid(
                "rotation.x509_ca_rotate_after must be at most half of rotation.x509_ca_ttl".into(),
            ));
        }
        if r.ledger_retention < i.max_ttl_ceiling {
            return Err(ConfigError::Invalid(
                "rotation.ledger_retention must be at least issuance.max_ttl_ceiling (only expired credentials may be forgotten)".into(),
            ));
        }
        if r.check_interval < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                "rotation.check_interval must be at least 100ms".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut issuers = std::collections::BTreeSet::new();
        for o in &self.oidc {
            o.validate().map_err(ConfigError::Invalid)?;
            if !names.insert(o.name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "oidc issuer name {:?} is used twice",
                    o.name
                )));
            }
            if !issuers.insert(o.resolved().issuer) {
                return Err(ConfigError::Invalid(format!(
                    "oidc issuer {:?}: another [[oidc]] entry has the same issuer",
                    o.name
                )));
            }
        }
        if self.workload_socket_mode > 0o777 {
            return Err(ConfigError::Invalid(
                "workload_socket_mode must be a permission mode like 0o666".into(),
            ));
        }
        if !(1..=10).contains(&self.exchange.max_depth) {
            return Err(ConfigError::Invalid(
                "exchange.max_depth must be between 1 and 10".into(),
            ));
        }
        if let Some(i) = &self.jwt_issuer {
            check_issuer_url(i, self.jwt_issuer_allow_http).map_err(ConfigError::Invalid)?;
        }
        if self.server_names.is_empty() || self.server_names.iter().any(String::is_empty) {
            return Err(ConfigError::Invalid(
                "server_names must list at least one DNS name (the broker's certificate names it)"
                    .into(),
            ));
        }
        if let Some(bad) = self.server_names.iter().find(|n| !is_dns_name(n)) {
            return Err(ConfigError::Invalid(format!(
                "server_names: {bad:?} is not a DNS name (letters, digits and '-' in labels separated by '.')"
            )));
        }
        match (&self.http_tls_cert_file, &self.http_tls_key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "give http_tls_cert_file and http_tls_key_file together".into(),
                ));
            }
            (Some(_), Some(_)) if !self.http_tls => {
                return Err(ConfigError::Invalid(
                    "http_tls_cert_file is set but http_tls is off; set http_tls = true".into(),
                ));
            }
            _ => {}
        }
        if self.limits.max_watch_streams_per_client == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_watch_streams_per_client must be at least 1".into(),
            ));
        }
        if self.limits.store_queue == 0 {
            return Err(ConfigError::Invalid(
                "limits.store_queue must be at least 1".into(),
            ));
        }
        if self.limits.max_request_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_request_bytes must be at least 1024".into(),
            ));
        }
        Ok(())
    }

    /// The issuer of JWT-SVIDs and OIDC discovery, given where the HTTP listener is bound:
    /// `jwt_issuer` if set, else `https://<first server name>[:<HTTP port>]`.
    pub fn jwt_issuer_for(&self, http: Option<SocketAddr>) -> String {
        if let Some(i) = &self.jwt_issuer {
            return i.trim_end_matches('/').to_owned();
        }
        let host = self
            .server_names
            .first()
            .map_or("localhost", String::as_str);
        match http.map(|a| a.port()) {
            Some(443) | None => format!("https://{host}"),
            Some(p) => format!("https://{host}:{p}"),
        }
    }

    /// Where the store is: the configured PostgreSQL database, or the embedded store in the
    /// data dir.
    pub fn store(&self) -> Result<crate::store::StoreConfig, ConfigError> {
        match &self.store {
            None => Ok(crate::store::StoreConfig::in_data_dir(&self.data_dir)),
            Some(url) => crate::store::StoreConfig::postgres(&url.0, self.store_ca_file.clone())
                .map_err(|e| ConfigError::Invalid(format!("store: {e}"))),
        }
    }

    /// The master key file (when the key does not come from the environment).
    pub fn master_key_path(&self) -> PathBuf {
        self.master_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(MASTER_KEY_FILE))
    }
}

/// Checks an issuer URL: https (or http when allowed), a host, no query or fragment (OpenID
/// Connect Discovery §3 and RFC 8414: the issuer is compared byte for byte).
fn check_issuer_url(issuer: &str, allow_http: bool) -> Result<(), String> {
    let rest = if let Some(r) = issuer.strip_prefix("https://") {
        r
    } else if let Some(r) = issuer.strip_prefix("http://") {
        if !allow_http {
            return Err(format!(
                "jwt_issuer {issuer:?} is not https: relying parties (cloud web-identity federation, Vault's jwt auth, most JWT libraries) only trust an https issuer. Use the https URL of the HTTP listener (http_tls = true) or of a proxy in front of it; for development only, set jwt_issuer_allow_http = true"
            ));
        }
        r
    } else {
        return Err(format!(
            "jwt_issuer {issuer:?} must be an https:// URL (e.g. \"https://sigil.example.org\")"
        ));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains('@') {
        return Err(format!("jwt_issuer {issuer:?} names no host"));
    }
    if issuer.contains('?') || issuer.contains('#') {
        return Err(format!(
            "jwt_issuer {issuer:?} must not have a query or fragment"
        ));
    }
    Ok(())
}

/// serde for an optional listen address: `"off"` is none.
pub mod addr_or_off {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the address, or `"off"`.
    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.serialize_str(&a.to_string()),
            None => s.serialize_str("off"),
        }
    }

    /// Reads an address or `"off"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let t = String::deserialize(d)?;
        if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        t.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "{t:?} is not an address; write e.g. \"127.0.0.1:8080\" or \"off\""
            ))
        })
    }
}

/// serde for file modes: written `"0666"`, read from that or a TOML integer (`0o666`).
pub mod mode {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `m` as an octal string.
    pub fn serialize<S: Serializer>(m: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{m:04o}"))
    }

    /// Reads `"0660"`, `"0o660"` or an integer.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(i) => Ok(i),
            Raw::Text(t) => {
                let digits = t.trim().trim_start_matches("0o");
                u32::from_str_radix(digits, 8).map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{t:?} is not an octal file mode; write e.g. \"0660\""
                    ))
                })
            }
        }
    }
}

/// serde for durations as humantime text (`10m`, `1h 30m`).
pub mod dur {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `d` as text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    /// `d` in its largest whole unit: `90d`, `36h`, `10m`, `45s` (humantime's own format
    /// counts 30.44-day months, which nobody writes).
    pub fn format(d: Duration) -> String {
        if d.subsec_nanos() != 0 {
            return format!("{}ms", d.as_millis());
        }
        let s = d.as_secs();
        match s {
            0 => "0s".into(),
            s if s % 86400 == 0 => format!("{}d", s / 86400),
            s if s % 3600 == 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }

    /// Reads text such as `10m`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}); write e.g. 90s, 10m, 1h"
            ))
        })
    }
}

/// A DNS name as certificates carry it: labels of letters, digits and '-', not starting or
/// ending with '-', separated by '.'.
fn is_dns_name(n: &str) -> bool {
    n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_fills_defaults() {
        let c = Config::default();
        let text = c.to_toml();
        let back = Config::parse(&text, "t").unwrap();
        assert_eq!(back.listen, c.listen);
        assert_eq!(back.issuance.join_token_ttl, Duration::from_secs(600));
        assert!(text.contains("identity_lifetime = \"90d\""), "{text}");
        assert_eq!(dur::format(Duration::from_secs(5400)), "90m");
        assert_eq!(dur::format(Duration::from_millis(200)), "200ms");
        assert_eq!(dur::format(Duration::from_millis(1500)), "1500ms");
        let partial = Config::parse(
            "listen = \"127.0.0.1:9000\"\n[issuance]\ndefault_jwt_ttl = \"2m\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(partial.issuance.default_jwt_ttl, Duration::from_secs(120));
        assert_eq!(partial.issuance.default_x509_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn an_http_listener_turned_off_stays_off_and_modes_are_octal() {
        let mut c = Config {
            http_listen: None,
            workload_socket_mode: 0o660,
            ..Config::default()
        };
        let text = c.to_toml();
        assert!(text.contains("http_listen = \"off\""), "{text}");
        assert!(text.contains("workload_socket_mode = \"0660\""), "{text}");
        let back = Config::parse(&text, "t").unwrap();
        assert_eq!(back.http_listen, None, "not the default 8080");
        assert_eq!(back.workload_socket_mode, 0o660);
        c.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 9090)));
        assert_eq!(
            Config::parse(&c.to_toml(), "t").unwrap().http_listen,
            c.http_listen
        );
        let m = Config::parse("workload_socket_mode = 0o600\n", "t").unwrap();
        assert_eq!(m.workload_socket_mode, 0o600);
        assert!(Config::parse("workload_socket_mode = \"rw\"\n", "t").is_err());
    }

    #[test]
    fn the_issuer_is_https_and_derived_from_configuration() {
        let c = Config::default();
        assert!(c.http_tls, "new data dirs serve the HTTP listener over TLS");
        let http = SocketAddr::from(([127, 0, 0, 1], 8080));
        assert_eq!(c.jwt_issuer_for(Some(http)), "https://localhost:8080");
        assert_eq!(
            c.jwt_issuer_for(Some(SocketAddr::from(([0, 0, 0, 0], 443)))),
            "https://localhost"
        );
        let set = Config {
            jwt_issuer: Some("https://sigil.example.org/".into()),
            ..Config::default()
        };
        assert_eq!(set.jwt_issuer_for(Some(http)), "https://sigil.example.org");
        for (bad, why) in [
            ("http://sigil.example.org", "is not https"),
            ("sigil.example.org", "must be an https:// URL"),
            ("https://", "names no host"),
            ("https://sigil.example.org#x", "query or fragment"),
        ] {
            let c = Config {
                jwt_issuer: Some(bad.into()),
                ..Config::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // A config file from before http_tls existed keeps plain HTTP.
        assert!(
            !Config::parse("listen = \"127.0.0.1:9000\"\n", "t")
                .unwrap()
                .http_tls
        );
    }

    #[test]
    fn the_example_in_deploy_parses_and_validates() {
        let text = include_str!("../../deploy/sigil.toml");
        let c = Config::parse(text, "deploy/sigil.toml").unwrap();
        c.validate().unwrap();
        assert_eq!(c.server_names, vec!["localhost", "sigil.internal"]);
    }

    /// deploy/sigil.toml is the configuration reference: every setting the broker reads is
    /// in it (set, or commented out with its default), so the reference cannot drift.
    /// The `sigil.toml` inside the Kubernetes ConfigMap (a YAML block scalar) is a config the
    /// broker accepts, so the manifests cannot drift from the config types.
    #[test]
    fn the_kubernetes_configmap_holds_a_valid_config() {
        let yaml = include_str!("../../deploy/kubernetes/broker/20-configmap.yaml");
        let mut lines = yaml
            .lines()
            .skip_while(|l| l.trim() != "sigil.toml: |")
            .skip(1);
        let first = lines
            .clone()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        let indent = first.len() - first.trim_start().len();
        assert!(indent > 0, "a sigil.toml block in the ConfigMap");
        let text: String = lines
            .by_ref()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
            .map(|l| format!("{}\n", l.get(indent..).unwrap_or_default()))
            .collect();
        let cfg = Config::parse(&text, "deploy/kubernetes/broker/20-configmap.yaml")
            .unwrap_or_else(|e| panic!("{e}"));
        cfg.validate().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !cfg.oidc.is_empty(),
            "the ConfigMap configures the cluster's issuer"
        );
    }

    /// Every setting (`key` or `[section] key`) that `named(section, key)` says a document
    /// leaves out.
    fn settings_not(named: impl Fn(Option<&str>, &str) -> bool) -> Vec<String> {
        let defaults: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
        let mut missing = Vec::new();
        for (k, v) in &defaults {
            match v {
                toml::Value::Table(t) => missing.extend(
                    t.keys()
                        .filter(|sk| !named(Some(k), sk))
                        .map(|sk| format!("[{k}] {sk}")),
                ),
                _ if !named(None, k) => missing.push(k.clone()),
                _ => {}
            }
        }
        // Settings without a default value (not serialized) are listed by hand.
        for k in [
            "store",
            "store_ca_file",
            "jwt_issuer",
            "master_key_file",
            "workload_socket",
        ] {
            if !named(None, k) {
                missing.push(k.to_owned());
            }
        }
        missing
    }

    #[test]
    fn the_reference_in_deploy_names_every_setting() {
        let text = include_str!("../../deploy/sigil.toml");
        let mentioned = |section: Option<&str>, key: &str| {
            // Within its section: from the header to the next one.
            let body = match section {
                None => text.split("\n[").next().unwrap_or_default(),
                Some(s) => text
                    .split(&format!("[{s}]\n"))
                    .nth(1)
                    .map(|rest| rest.split("\n[").next().unwrap_or_default())
                    .unwrap_or_default(),
            };
            body.lines().any(|l| {
                let l = l.trim_start().trim_start_matches('#').trim_start();
                l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        };
        let missing = settings_not(mentioned);
        assert!(
            missing.is_empty(),
            "deploy/sigil.toml does not mention: {missing:?}"
        );
    }

    #[test]
    fn the_operations_guide_names_every_setting() {
        let doc = include_str!("../../docs/OPERATIONS.md");
        let settings = doc
            .split("### Settings")
            .nth(1)
            .and_then(|s| s.split("\n### ").next())
            .expect("docs/OPERATIONS.md has a Settings section");
        // `a_per_second` / `_burst` on one row names a_burst too.
        let named = |section: Option<&str>, key: &str| {
            settings.contains(&format!("`{key}`"))
                || section.is_some_and(|s| settings.contains(&format!("`[{s}] {key}`")))
                || key.strip_suffix("_burst").is_some_and(|stem| {
                    settings.lines().any(|l| {
                        l.contains(&format!("`{stem}_per_second`")) && l.contains("`_burst`")
                    })
                })
        };
        let missing = settings_not(named);
        assert!(
            missing.is_empty(),
            "docs/OPERATIONS.md's settings tables do not name: {missing:?}"
        );
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let e = Config::parse("listen = \"127.0.0.1:9000\"\nbogus = 1\n", "sigil.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sigil.toml") && e.contains("bogus") && e.contains("line 2"),
            "{e}"
        );
        let e = Config::parse("[issuance]\ndefault_jwt_ttl = \"soon\"\n", "sigil.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a duration"), "{e}");
        let mut c = Config::default();
        c.issuance.backdate = Duration::from_secs(60);
        assert!(c.validate().unwrap_err().to_string().contains("backdate"));
    }
}
