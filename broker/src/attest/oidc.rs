//! OIDC attestation: a JWT from a configured issuer (Kubernetes projected service-account
//! tokens, GitHub Actions and GitLab CI ID tokens, any OIDC provider) proves a workload; its
//! claims become selectors.
//!
//! The signature is checked with the issuer's JWKS (a file, or HTTPS with caching and a
//! rate-limited refetch when a token names an unknown key) by `jsonwebtoken`; the claims are
//! checked here, against the broker's clock, so each refusal can say exactly what was wrong:
//! `alg` none or HMAC, an algorithm outside the issuer's allow-list, a key whose type or curve
//! does not fit the header's `alg`, an unknown issuer, wrong audience, expired, not yet valid,
//! `exp`/`nbf`/`iat` that are not numbers.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use sigil_pki::SecretString;

use super::{AttestError, Attested, Method, Reason};
use crate::config::{OidcIssuer, OidcPreset};
use crate::model::Selector;
use crate::registry::Registry;

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Most selectors derived from one token's claims.
const MAX_CLAIM_SELECTORS: usize = 128;

pub use crate::config::oidc_algorithm as parse_alg;

// Reason codes: `malformed`, `alg_refused`, `alg_not_allowed`, `unknown_issuer`,
// `unknown_key`, `key_mismatch`, `bad_signature`, `expired`, `not_yet_valid`,
// `wrong_audience`, `bad_claim`, `jwks_unavailable`.
pub use super::Rejection;
use super::reject;

/// Attests with an OIDC token: `verifier` checks it against its issuer; its claims are the
/// selectors an identity in `registry` must match (`spiffe_id` names one when several do).
pub async fn attest(
    verifier: &OidcVerifier,
    registry: &Registry,
    token: &SecretString,
    spiffe_id: Option<&str>,
    now: i64,
) -> Result<Attested, AttestError> {
    if verifier.is_empty() {
        return Err(AttestError::Failed {
            method: Method::Oidc,
            reason: Reason::NotConfigured,
            actor: "oidc".into(),
            identity_id: None,
            detail: "no OIDC issuer is configured".into(),
            public: Some("this broker trusts no OIDC issuer ([[oidc]] in sigil.toml)".into()),
        });
    }
    let v = verifier
        .verify(token.expose_secret(), now)
        .await
        .map_err(|r| AttestError::Failed {
            method: Method::Oidc,
            reason: r.reason,
            actor: "oidc".into(),
            identity_id: None,
            detail: r.message.clone(),
            public: Some(format!("the OIDC token was refused: {}", r.message)),
        })?;
    let actor = format!("oidc:{}:{}", v.issuer_name, v.sub);
    let identity = super::select(registry, Method::Oidc, &v.selectors, spiffe_id, &actor)?;
    Ok(Attested {
        identity,
        method: Method::Oidc,
        actor,
        consume_join_token: None,
        presented_generation: None,
        evidence_issued_at: v.iat,
        evidence_seq: None,
        selectors: v.selectors,
    })
}

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedOidc {
    /// The configured issuer's name.
    pub issuer_name: String,
    /// `iss`.
    pub iss: String,
    /// `sub`.
    pub sub: String,
    /// `iat`, when present.
    pub iat: Option<i64>,
    /// `exp`.
    pub exp: i64,
    /// Selectors derived from the claims.
    pub selectors: BTreeSet<Selector>,
}

/// Every configured issuer, by `iss`.
#[derive(Debug, Default)]
pub struct OidcVerifier {
    issuers: HashMap<String, Arc<IssuerState>>,
}

#[derive(Debug)]
struct IssuerState {
    cfg: OidcIssuer,
    algorithms: Vec<Algorithm>,
    http: Option<HttpClient>,
    cache: tokio::sync::Mutex<KeyCache>,
}

/// Times are the broker clock's Unix seconds, so tests can drive them.
#[derive(Default)]
struct KeyCache {
    keys: Vec<CachedKey>,
    fetched_at: Option<i64>,
    last_attempt: Option<i64>,
    last_error: Option<String>,
    fetches: u64,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("keys", &self.keys.len())
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct CachedKey {
    kid: Option<String>,
    jwk: Jwk,
    key: DecodingKey,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<hyper::body::Bytes>,
>;

impl OidcVerifier {
    /// Builds the verifier from the configured issuers (already validated). Reads CA files
    /// now, so a bad one is a start-up error.
    pub fn new(issuers: &[OidcIssuer]) -> anyhow::Result<Self> {
        let mut map = HashMap::new();
        for raw in issuers {
            let cfg = raw.resolved();
            let algorithms = cfg.algorithms.iter().filter_map(|a| parse_alg(a)).collect();
            let http = if cfg.jwks_url.is_some() || cfg.discovery_url().is_some() {
                Some(http_client(cfg.ca_file.as_ref())?)
            } else {
                None
            };
            map.insert(
                cfg.issuer.clone(),
                Arc::new(IssuerState {
                    cfg,
                    algorithms,
                    http,
                    cache: tokio::sync::Mutex::new(KeyCache::default()),
                }),
            );
        }
        Ok(OidcVerifier { issuers: map })
    }

    /// How many times issuer `name`'s JWKS has been fetched (for metrics and tests).
    pub async fn fetches(&self, name: &str) -> u64 {
        for i in self.issuers.values() {
            if i.cfg.name == name {
                return i.cache.lock().await.fetches;
            }
        }
        0
    }

    /// True when no issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verifies `token` at `now` (Unix seconds).
    pub async fn verify(&self, token: &str, now: i64) -> Result<VerifiedOidc, Rejection> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(reject(
                Reason::Malformed,
                format!("the token is longer than {MAX_TOKEN_LEN} bytes"),
            ));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(reject(
                Reason::Malformed,
                "not a JWT (expected three dot-separated parts)",
            ));
        };
        let header = decode_part(h, "header")?;
        let alg_name = match header.get("alg") {
            Some(Value::String(a)) => a.clone(),
            _ => return Err(reject(Reason::Malformed, "the header has no alg")),
        };
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(reject(
                Reason::AlgRefused,
                "alg \"none\" is refused: an unsigned token proves nothing",
            ));
        }
        if alg_name.to_ascii_uppercase().starts_with("HS") {
            return Err(reject(
                Reason::AlgRefused,
                format!("alg {alg_name:?} is refused: HMAC tokens cannot prove a workload"),
            ));
        }
        let claims = decode_part(p, "payload")?;
        let iss = match claims.get("iss") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(reject(Reason::BadClaim, "iss must be a string")),
            None => return Err(reject(Reason::BadClaim, "the token has no iss")),
        };
        let Some(issuer) = self.issuers.get(&iss) else {
            return Err(reject(
                Reason::UnknownIssuer,
                format!(
                    "issuer {iss:?} is not trusted by this broker (see [[oidc]] in sigil.toml)"
                ),
            ));
        };
        let name = &issuer.cfg.name;
        let alg = parse_alg(&alg_name)
            .filter(|a| issuer.algorithms.contains(a))
            .ok_or_else(|| {
                reject(
                    Reason::AlgNotAllowed,
                    format!(
                        "alg {alg_name:?} is not allowed for issuer {name} (allowed: {})",
                        issuer.cfg.algorithms.join(", ")
                    ),
                )
            })?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(reject(Reason::Malformed, "kid must be a string")),
        };
        let key = issuer.key_for(kid.as_deref(), alg, now).await?;
        check_key_fits(&key.jwk, alg)?;

        // Signature only: the claims are checked below against the broker's clock.
        let mut v = Validation::new(alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        if let Err(e) = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v) {
            use jsonwebtoken::errors::ErrorKind;
            return Err(match e.kind() {
                ErrorKind::InvalidSignature => reject(
                    Reason::BadSignature,
                    format!("the signature does not verify with issuer {name}'s key"),
                ),
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => reject(
                    Reason::KeyMismatch,
                    format!("the key does not fit alg {alg_name}"),
                ),
                _ => reject(
                    Reason::Malformed,
                    format!("the token could not be checked: {e}"),
                ),
            });
        }
        check_claims(issuer, &claims, now)
    }
}

fn decode_part(part: &str, what: &str) -> Result<Map<String, Value>, Rejection> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| reject(Reason::Malformed, format!("the {what} is not base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(reject(
            Reason::Malformed,
            format!("the {what} is not a JSON object"),
        )),
    }
}

/// A JWK that says which algorithm it is for, or whose type or curve does not fit `alg`, is
/// refused (RFC 7517: `alg` and `kty`/`crv` constrain the key's use).
fn check_key_fits(jwk: &Jwk, alg: Algorithm) -> Result<(), Rejection> {
    if let Some(ka) = jwk.common.key_algorithm {
        let same = format!("{ka:?}") == format!("{alg:?}");
        if !same {
            return Err(reject(
                Reason::KeyMismatch,
                format!("the header says alg {alg:?} but the key is for {ka:?}"),
            ));
        }
    }
    let fits = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), a) => matches!(
            a,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA) => true,
        _ => false,
    };
    if fits {
        Ok(())
    } else {
        Err(reject(
            Reason::KeyMismatch,
            format!("the header says alg {alg:?} but the key's type or curve does not fit it"),
        ))
    }
}

fn numeric(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, Rejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| reject(Reason::BadClaim, format!("{name} is not a usable number"))),
        Some(other) => Err(reject(
            Reason::BadClaim,
            format!(
                "{name} must be a JSON number (seconds since the epoch), not {}",
                json_type(other)
            ),
        )),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_claims(
    issuer: &IssuerState,
    claims: &Map<String, Value>,
    now: i64,
) -> Result<VerifiedOidc, Rejection> {
    let cfg = &issuer.cfg;
    let skew = cfg.clock_skew.as_secs() as i64;
    let exp = numeric(claims, "exp")?
        .ok_or_else(|| reject(Reason::BadClaim, "the token has no exp; tokens must expire"))?;
    let nbf = numeric(claims, "nbf")?;
    let iat = numeric(claims, "iat")?;
    if now >= exp + skew {
        return Err(reject(
            Reason::Expired,
            format!(
                "the token expired at {} (now {})",
                crate::clock::rfc3339(exp),
                crate::clock::rfc3339(now)
            ),
        ));
    }
    if let Some(nbf) = nbf
        && now + skew < nbf
    {
        return Err(reject(
            Reason::NotYetValid,
            format!(
                "the token is not valid before {}",
                crate::clock::rfc3339(nbf)
            ),
        ));
    }
    if let Some(iat) = iat
        && now + skew < iat
    {
        return Err(reject(
            Reason::NotYetValid,
            format!(
                "the token claims to be issued in the future ({})",
                crate::clock::rfc3339(iat)
            ),
        ));
    }
    let aud: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(v)) => v.iter().filter_map(Value::as_str).collect(),
        Some(_) => {
            return Err(reject(
                Reason::BadClaim,
                "aud must be a string or an array of strings",
            ));
        }
        None => vec![],
    };
    if !aud
        .iter()
        .any(|a| cfg.audiences.iter().any(|want| want == a))
    {
        return Err(reject(
            Reason::WrongAudience,
            format!(
                "the token's audience {aud:?} is not one this broker accepts for issuer {} ({})",
                cfg.name,
                cfg.audiences.join(", ")
            ),
        ));
    }
    let sub = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(reject(Reason::BadClaim, "the token has no sub")),
    };
    let iss = cfg.issuer.clone();
    Ok(VerifiedOidc {
        issuer_name: cfg.name.clone(),
        selectors: selectors(cfg.preset, &iss, &sub, claims),
        iss,
        sub,
        iat,
        exp,
    })
}

fn push(out: &mut BTreeSet<Selector>, kind: &str, value: &str) {
    if out.len() >= MAX_CLAIM_SELECTORS {
        return;
    }
    if let Ok(s) = format!("{kind}:{value}").parse::<Selector>() {
        out.insert(s);
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Flattens claims into `oidc:claim:PATH:VALUE` (nested objects joined with `/`, each element
/// of an array of scalars on its own).
fn flatten(out: &mut BTreeSet<Selector>, prefix: &str, v: &Value, depth: usize) {
    match v {
        Value::Object(m) if depth < 3 => {
            for (k, v) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}/{k}")
                };
                flatten(out, &path, v, depth + 1);
            }
        }
        Value::Array(items) => {
            for i in items {
                if let Some(s) = scalar(i) {
                    push(out, "oidc", &format!("claim:{prefix}:{s}"));
                }
            }
        }
        other => {
            if let Some(s) = scalar(other) {
                push(out, "oidc", &format!("claim:{prefix}:{s}"));
            }
        }
    }
}

/// The selectors a verified token yields.
pub fn selectors(
    preset: OidcPreset,
    iss: &str,
    sub: &str,
    claims: &Map<String, Value>,
) -> BTreeSet<Selector> {
    let mut out = BTreeSet::new();
    push(&mut out, "oidc", &format!("iss:{iss}"));
    push(&mut out, "oidc", &format!("sub:{sub}"));
    let get = |path: &[&str]| -> Option<String> {
        let mut cur = claims.get(path[0])?;
        for p in &path[1..] {
            cur = cur.get(p)?;
        }
        scalar(cur)
    };
    match preset {
        OidcPreset::Kubernetes => {
            for (kind, path) in [
                ("ns", &["kubernetes.io", "namespace"][..]),
                ("sa", &["kubernetes.io", "serviceaccount", "name"]),
                ("sa-uid", &["kubernetes.io", "serviceaccount", "uid"]),
                ("pod-name", &["kubernetes.io", "pod", "name"]),
                ("pod-uid", &["kubernetes.io", "pod", "uid"]),
                ("node-name", &["kubernetes.io", "node", "name"]),
            ] {
                if let Some(v) = get(path) {
                    push(&mut out, "k8s", &format!("{kind}:{v}"));
                }
            }
        }
        OidcPreset::Github => {
            for c in [
                "repository",
                "repository_id",
                "repository_owner",
                "repository_owner_id",
                "repository_visibility",
                "ref",
                "ref_type",
                "workflow",
                "workflow_ref",
                "job_workflow_ref",
                "environment",
                "event_name",
                "actor",
                "runner_environment",
            ] {
                if let Some(v) = get(&[c]) {
                    push(&mut out, "github", &format!("{c}:{v}"));
                }
            }
        }
        OidcPreset::Gitlab => {
            for c in [
                "project_path",
                "project_id",
                "namespace_path",
                "namespace_id",
                "ref",
                "ref_type",
                "ref_protected",
                "environment",
                "environment_protected",
                "pipeline_source",
                "user_login",
                "ci_config_ref_uri",
            ] {
                if let Some(v) = get(&[c]) {
                    push(&mut out, "gitlab", &format!("{c}:{v}"));
                }
            }
        }
        OidcPreset::Generic => {}
    }
    for (k, v) in claims {
        if matches!(
            k.as_str(),
            "iss" | "sub" | "aud" | "exp" | "nbf" | "iat" | "jti"
        ) {
            continue;
        }
        flatten(&mut out, k, v, 1);
    }
    out
}

impl IssuerState {
    async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        now: i64,
    ) -> Result<CachedKey, Rejection> {
        let mut cache = self.cache.lock().await;
        let since = |t: Option<i64>| t.map_or(u64::MAX, |t| (now - t).max(0) as u64);
        // At most one fetch per jwks_min_refresh, whatever the reason, so neither a down
        // issuer nor junk tokens naming unknown keys make us hammer it.
        let may_fetch = since(cache.last_attempt) >= self.cfg.jwks_min_refresh.as_secs();
        let due = since(cache.fetched_at) >= self.cfg.jwks_cache.as_secs();
        if due && may_fetch {
            self.refresh(&mut cache, now).await;
        }
        if let Some(k) = find(&cache.keys, kid, alg) {
            return Ok(k);
        }
        // A key we do not know: the issuer may have rotated.
        if !due && may_fetch {
            self.refresh(&mut cache, now).await;
            if let Some(k) = find(&cache.keys, kid, alg) {
                return Ok(k);
            }
        }
        if cache.keys.is_empty() {
            return Err(reject(
                Reason::JwksUnavailable,
                format!(
                    "issuer {}'s keys are unavailable: {}",
                    self.cfg.name,
                    cache.last_error.as_deref().unwrap_or("empty key set")
                ),
            ));
        }
        Err(reject(
            Reason::UnknownKey,
            match kid {
                Some(k) => format!("issuer {} has no key {k:?}", self.cfg.name),
                None => format!(
                    "the token names no kid and issuer {} has no single key for it",
                    self.cfg.name
                ),
            },
        ))
    }

    async fn refresh(&self, cache: &mut KeyCache, now: i64) {
        cache.last_attempt = Some(now);
        cache.fetches += 1;
        match self.fetch().await {
            Ok(keys) => {
                tracing::debug!(issuer = %self.cfg.name, keys = keys.len(), "JWKS loaded");
                cache.keys = keys;
                cache.fetched_at = Some(now);
                cache.last_error = None;
            }
            Err(e) => {
                // Keep serving the keys we have; the issuer may be briefly down.
                tracing::warn!(issuer = %self.cfg.name, error = %e, "could not load JWKS");
                cache.last_error = Some(e);
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<CachedKey>, String> {
        let bytes = match (&self.cfg.jwks_file, &self.cfg.jwks_url, &self.http) {
            (Some(path), _, _) => read_file(path.clone()).await?,
            (None, Some(url), Some(http)) => fetch_url(http, url).await?,
            (None, None, Some(http)) => {
                let url = self.discover(http).await?;
                fetch_url(http, &url).await?
            }
            _ => return Err("no JWKS source".into()),
        };
        parse_jwks(&bytes)
    }

    /// OpenID Connect Discovery 1.0, section 4: the issuer's `jwks_uri`, from a document whose
    /// `issuer` is exactly ours (else anyone able to serve that path could name the keys).
    async fn discover(&self, http: &HttpClient) -> Result<String, String> {
        let url = self
            .cfg
            .discovery_url()
            .ok_or("no discovery URL for this issuer")?;
        let doc: Value = serde_json::from_slice(&fetch_url(http, &url).await?)
            .map_err(|e| format!("{url}: not JSON: {e}"))?;
        match doc.get("issuer").and_then(Value::as_str) {
            Some(i) if i == self.cfg.issuer => {}
            Some(i) => {
                return Err(format!(
                    "{url}: the discovery document is for issuer {i:?}, not {:?}",
                    self.cfg.issuer
                ));
            }
            None => return Err(format!("{url}: the discovery document has no \"issuer\"")),
        }
        match doc.get("jwks_uri").and_then(Value::as_str) {
            Some(u) if u.starts_with("https://") => Ok(u.to_owned()),
            Some(u) => Err(format!("{url}: jwks_uri {u:?} is not https://")),
            None => Err(format!("{url}: the discovery document has no \"jwks_uri\"")),
        }
    }
}

fn find(keys: &[CachedKey], kid: Option<&str>, alg: Algorithm) -> Option<CachedKey> {
    match kid {
        Some(k) => keys.iter().find(|c| c.kid.as_deref() == Some(k)).cloned(),
        None => {
            // Without a kid, only an unambiguous key will do.
            let fitting: Vec<_> = keys
                .iter()
                .filter(|c| check_key_fits(&c.jwk, alg).is_ok())
                .collect();
            match fitting.as_slice() {
                [one] => Some((*one).clone()),
                _ => None,
            }
        }
    }
}

async fn read_file(path: PathBuf) -> Result<Vec<u8>, String> {
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_JWKS_BYTES as u64 {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    tokio::fs::read(&path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))
}

async fn fetch_url(http: &HttpClient, url: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt as _;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let req = hyper::Request::get(uri)
        .header("accept", "application/json")
        .header("user-agent", concat!("sigil/", env!("CARGO_PKG_VERSION")))
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .map_err(|_| format!("{url}: timed out"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES);
    let bytes = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .map_err(|_| format!("{url}: timed out reading the body"))?
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    Ok(bytes.to_vec())
}

/// Parses a JWKS; keys that cannot verify signatures (HMAC secrets, encryption keys,
/// unknown types) are skipped rather than failing the whole set.
fn parse_jwks(bytes: &[u8]) -> Result<Vec<CachedKey>, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let Some(Value::Array(keys)) = doc.get("keys") else {
        return Err("JWKS has no \"keys\" array".into());
    };
    let mut out = Vec::new();
    for k in keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(k.clone()) else {
            continue;
        };
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            continue;
        }
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
        {
            continue;
        }
        if matches!(
            jwk.common.key_algorithm,
            Some(KeyAlgorithm::HS256 | KeyAlgorithm::HS384 | KeyAlgorithm::HS512)
        ) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        out.push(CachedKey {
            kid: jwk.common.key_id.clone(),
            jwk,
            key,
        });
    }
    if out.is_empty() {
        return Err("JWKS has no usable signature keys".into());
    }
    Ok(out)
}

fn http_client(ca_file: Option<&PathBuf>) -> anyhow::Result<HttpClient> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let mut n = 0;
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                roots
                    .add(c.with_context(|| format!("{}: bad PEM", path.display()))?)
                    .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
                n += 1;
            }
            anyhow::ensure!(n > 0, "{}: no certificates", path.display());
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_claims_become_k8s_and_oidc_selectors() {
        let claims: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "iss": "https://k8s.example", "sub": "system:serviceaccount:pay:api",
            "aud": ["sigil"], "exp": 1, "iat": 0,
            "kubernetes.io": {"namespace": "pay", "serviceaccount": {"name": "api", "uid": "u1"},
                              "pod": {"name": "api-7d9", "uid": "p1"}}
        }))
        .unwrap();
        let s: Vec<String> = selectors(
            OidcPreset::Kubernetes,
            "https://k8s.example",
            "system:serviceaccount:pay:api",
            &claims,
        )
        .into_iter()
        .map(|s| s.to_string())
        .collect();
        for want in [
            "oidc:iss:https://k8s.example",
            "oidc:sub:system:serviceaccount:pay:api",
            "k8s:ns:pay",
            "k8s:sa:api",
            "k8s:pod-name:api-7d9",
            "oidc:claim:kubernetes.io/namespace:pay",
            "oidc:claim:kubernetes.io/serviceaccount/name:api",
        ] {
            assert!(s.iter().any(|x| x == want), "{want} in {s:?}");
        }
        assert!(!s.iter().any(|x| x.contains(":exp:") || x.contains(":aud:")));
    }

    #[test]
    fn jwks_parsing_skips_secrets_and_unusable_keys() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-256", "kid": "ec", "use": "sig",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "weird"}
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("ec"));
        assert!(parse_jwks(br#"{"keys": [{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
        assert!(parse_jwks(b"[]").is_err());
    }

    #[test]
    fn hmac_and_none_are_never_algorithms() {
        assert!(parse_alg("HS256").is_none());
        assert!(parse_alg("none").is_none());
        assert_eq!(parse_alg("ES256"), Some(Algorithm::ES256));
    }
}
