//! JWT-SVIDs: ES256 signing and strict verification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/JWT-SVID.md>).
//!
//! Minted tokens carry exactly the header `alg`, `kid`, `typ` and the claims `sub`, `aud`,
//! `exp`, `iat`, `jti`, plus `scope` (space-separated, when any) and `sigil_gen` (the identity
//! generation, so a generation bump revokes every older token).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::Serialize;
use serde_json::Value;

use crate::{EcKey, PkiError, SpiffeId, TrustDomain};

/// Longest token accepted for verification.
pub const MAX_JWT_LEN: usize = 8 * 1024;
/// The only algorithm Sigil signs with.
pub const ALG: &str = "ES256";

/// Why a JWT-SVID did not verify. Messages never include the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Too long.
    #[error("token is {0} bytes; the limit is 8192")]
    TooLong(usize),
    /// Not three base64url parts of JSON.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// `alg` other than ES256 (this refuses `none`, HMAC and algorithm confusion).
    #[error("token algorithm {0:?} is not accepted (only ES256)")]
    BadAlgorithm(String),
    /// A `typ` that is not JWT/JOSE.
    #[error("token type {0:?} is not accepted")]
    BadType(String),
    /// A `crit` header: nothing here understands extensions.
    #[error("token has a critical header extension")]
    CriticalHeader,
    /// A header member other than `alg`, `kid` and `typ`.
    #[error(
        "token header member {0:?} is not allowed (a JWT-SVID header has only alg, kid and typ)"
    )]
    UnexpectedHeader(String),
    /// A JSON object with the same member twice (parsers disagree on which one counts).
    #[error("token {part} has the member {name:?} more than once")]
    DuplicateMember {
        /// `header` or `payload`.
        part: &'static str,
        /// The repeated member.
        name: String,
    },
    /// An ECDSA signature in high-S form: valid ECDSA, but not the one canonical encoding.
    #[error("token signature is not in canonical (low-S) form")]
    NonCanonicalSignature,
    /// No `kid` in the header.
    #[error("token has no key id (kid)")]
    MissingKid,
    /// `kid` not in the bundle.
    #[error("token key id {0:?} is not in the trust bundle")]
    UnknownKey(String),
    /// Signature check failed.
    #[error("token signature does not verify")]
    BadSignature,
    /// A required claim is absent.
    #[error("token claim {0:?} is missing")]
    MissingClaim(&'static str),
    /// A claim has the wrong JSON type.
    #[error("token claim {0:?} has the wrong type: {1}")]
    WrongClaimType(&'static str, &'static str),
    /// `sub` is not a SPIFFE ID (or is in another trust domain).
    #[error("token subject is not a SPIFFE ID of this trust domain: {0}")]
    BadSubject(String),
    /// Past `exp` (beyond the allowed skew).
    #[error("token expired at {expired_at} (unix), now {now}")]
    Expired {
        /// `exp`.
        expired_at: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// Before `nbf` (beyond the allowed skew).
    #[error("token is not valid before {0} (unix)")]
    NotYetValid(i64),
    /// The expected audience is not in `aud`.
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
}

/// Claims of a JWT-SVID as minted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidClaims {
    /// Issuer URL (`iss`), when the broker is configured with one (for OIDC federation).
    pub iss: Option<String>,
    /// The SPIFFE ID.
    pub sub: SpiffeId,
    /// Audiences; at least one.
    pub aud: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issue time, Unix seconds.
    pub iat: i64,
    /// Unique token id.
    pub jti: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Identity generation at mint time.
    pub generation: u64,
    /// Delegation (RFC 8693 `act`): who acts on behalf of `sub`, most recent actor first.
    /// Empty for a workload's own token.
    pub actors: Vec<SpiffeId>,
    /// For an exchanged token: the `jti`s of the tokens it was derived from, its direct parent
    /// first (claim `sigil_parents`). Verifiers treat the token as revoked when any of them is,
    /// so revoking a leaked token also disables everything exchanged from it, offline.
    pub parents: Vec<String>,
}

/// Most actors a token may name; a longer `act` chain is refused.
pub const MAX_ACTORS: usize = 10;

/// RFC 8693 nested actor claim: `{"sub": actor, "act": {"sub": earlier actor, ...}}`.
#[derive(Serialize)]
struct Act<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    act: Option<Box<Act<'a>>>,
}

fn act_claim(actors: &[SpiffeId]) -> Option<Box<Act<'_>>> {
    actors.split_first().map(|(first, rest)| {
        Box::new(Act {
            sub: first.as_str(),
            act: act_claim(rest),
        })
    })
}

fn parse_act(v: Option<&Value>) -> Result<Vec<SpiffeId>, JwtError> {
    let mut out = Vec::new();
    let mut cur = v;
    while let Some(node) = cur {
        let Value::Object(m) = node else {
            return Err(JwtError::WrongClaimType("act", "must be an object"));
        };
        let sub = match m.get("sub") {
            Some(Value::String(s)) => s
                .parse::<SpiffeId>()
                .map_err(|e| JwtError::BadSubject(format!("act.sub: {e}")))?,
            _ => {
                return Err(JwtError::WrongClaimType(
                    "act",
                    "each actor needs a string sub",
                ));
            }
        };
        out.push(sub);
        if out.len() > MAX_ACTORS {
            return Err(JwtError::WrongClaimType(
                "act",
                "the actor chain is too long",
            ));
        }
        cur = m.get("act");
    }
    Ok(out)
}

#[derive(Serialize)]
struct WireClaims<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    sub: &'a str,
    aud: Aud<'a>,
    exp: i64,
    iat: i64,
    jti: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    sigil_gen: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    act: Option<Box<Act<'a>>>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    sigil_parents: &'a [String],
}

#[derive(Serialize)]
#[serde(untagged)]
enum Aud<'a> {
    One(&'a str),
    Many(&'a [String]),
}

/// Signs JWT-SVIDs with one key. The encoded header is computed once.
pub struct JwtSigner {
    key: EcKey,
    header_b64: String,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.key.kid())
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// A signer for `key`; `kid` is the key's RFC 7638 thumbprint.
    pub fn new(key: EcKey) -> Self {
        let header = format!(r#"{{"alg":"{ALG}","kid":"{}","typ":"JWT"}}"#, key.kid());
        JwtSigner {
            header_b64: B64URL.encode(header),
            key,
        }
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        self.key.kid()
    }

    /// The signing key.
    pub fn key(&self) -> &EcKey {
        &self.key
    }

    /// A compact JWS for `claims`.
    pub fn sign(&self, claims: &JwtSvidClaims) -> Result<String, PkiError> {
        if claims.aud.is_empty() {
            return Err(PkiError::Internal("a JWT-SVID needs at least one audience"));
        }
        let wire = WireClaims {
            iss: claims.iss.as_deref(),
            sub: claims.sub.as_str(),
            aud: if claims.aud.len() == 1 {
                Aud::One(&claims.aud[0])
            } else {
                Aud::Many(&claims.aud)
            },
            exp: claims.exp,
            iat: claims.iat,
            jti: &claims.jti,
            scope: (!claims.scopes.is_empty()).then(|| claims.scopes.join(" ")),
            sigil_gen: claims.generation,
            act: act_claim(&claims.actors),
            sigil_parents: &claims.parents,
        };
        let payload =
            serde_json::to_vec(&wire).map_err(|_| PkiError::Internal("claims encoding"))?;
        let mut token = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 90);
        token.push_str(&self.header_b64);
        token.push('.');
        B64URL.encode_string(&payload, &mut token);
        let sig = self.key.sign_es256(token.as_bytes())?;
        token.push('.');
        B64URL.encode_string(&sig, &mut token);
        Ok(token)
    }
}

/// JWT verification keys by `kid` (P-256 public points).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtKeys {
    keys: HashMap<String, Vec<u8>>,
}

impl JwtKeys {
    /// Adds a key.
    pub fn insert(&mut self, kid: impl Into<String>, public_point: Vec<u8>) {
        self.keys.insert(kid.into(), public_point);
    }

    /// The key for `kid`.
    pub fn get(&self, kid: &str) -> Option<&[u8]> {
        self.keys.get(kid).map(Vec::as_slice)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What a verifier expects.
#[derive(Debug, Clone)]
pub struct VerifyOptions<'a> {
    /// The verifier's clock.
    pub now: SystemTime,
    /// Allowed clock skew for `exp` and `nbf`.
    pub skew: Duration,
    /// When set, `aud` must contain it.
    pub audience: Option<&'a str>,
    /// When set, `sub` must be in it.
    pub trust_domain: Option<&'a TrustDomain>,
}

/// A token that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    /// The key that signed it.
    pub kid: String,
    /// The claims, with `iat`/`jti`/`generation` defaulted when absent (0, "", 0).
    pub claims: JwtSvidClaims,
}

/// Decodes one base64url part as a JSON object, refusing a member repeated at any depth.
/// `part` is `header` or `payload`, `what` the message for anything else malformed.
fn decode_json(
    b64: &str,
    part: &'static str,
    what: &'static str,
) -> Result<serde_json::Map<String, Value>, JwtError> {
    let bytes = B64URL.decode(b64).map_err(|_| JwtError::Malformed(what))?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let parsed = serde::Deserialize::deserialize(&mut de).and_then(|v: strict::Strict| {
        de.end()?;
        Ok(v.0)
    });
    match parsed {
        Ok(Value::Object(m)) => Ok(m),
        Err(e) if strict::is_duplicate(&e) => Err(JwtError::DuplicateMember {
            part,
            name: strict::duplicate_name(&e),
        }),
        _ => Err(JwtError::Malformed(what)),
    }
}

/// JSON values whose objects have unique member names: RFC 7515 §5.2 lets a JWS reject
/// duplicate members, and accepting them would let two parsers read different claims from
/// one signed token.
mod strict {
    use std::fmt;

    use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};

    const DUPLICATE: &str = "duplicate member ";
    const MAX_NAME: usize = 64;

    /// A JSON value, parsed strictly.
    pub(super) struct Strict(pub(super) Value);

    impl<'de> de::Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(StrictVisitor).map(Strict)
        }
    }

    pub(super) fn is_duplicate(e: &serde_json::Error) -> bool {
        e.to_string().starts_with(DUPLICATE)
    }

    /// The repeated member's name, as reported (bounded: it came from the token).
    pub(super) fn duplicate_name(e: &serde_json::Error) -> String {
        let text = e.to_string();
        let rest = text.strip_prefix(DUPLICATE).unwrap_or_default();
        // serde_json appends " at line L column C".
        let name = rest.rsplit_once(" at line ").map_or(rest, |(n, _)| n);
        name.chars().take(MAX_NAME).collect()
    }

    struct StrictVisitor;

    impl<'de> Visitor<'de> for StrictVisitor {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
            Number::from_f64(v)
                .map(Value::Number)
                .ok_or_else(|| E::custom("a number that JSON cannot hold"))
        }
        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }
        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut out = Vec::new();
            while let Some(Strict(v)) = seq.next_element()? {
                out.push(v);
            }
            Ok(Value::Array(out))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some(name) = map.next_key::<String>()? {
                if out.contains_key(&name) {
                    return Err(de::Error::custom(format!("{DUPLICATE}{name}")));
                }
                let Strict(v) = map.next_value()?;
                out.insert(name, v);
            }
            Ok(Value::Object(out))
        }
    }
}

/// Header members a JWT-SVID may carry (SPIFFE JWT-SVID §2: `alg`, `kid`, `typ`).
const HEADER_MEMBERS: [&str; 3] = ["alg", "kid", "typ"];

fn numeric(
    claims: &serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.floor() as i64))
            .map(Some)
            .ok_or(JwtError::WrongClaimType(name, "not a usable number")),
        Some(_) => Err(JwtError::WrongClaimType(name, "must be a JSON number")),
    }
}

/// Verifies a JWT-SVID: ES256 only, key by `kid`, `sub` a SPIFFE ID, `aud` and `exp` required
/// (numbers), `exp`/`nbf` checked with bounded skew, optional audience and trust domain.
pub fn verify(
    token: &str,
    keys: &JwtKeys,
    opts: &VerifyOptions<'_>,
) -> Result<VerifiedJwt, JwtError> {
    if token.len() > MAX_JWT_LEN {
        return Err(JwtError::TooLong(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let header = decode_json(h, "header", "header is not base64url JSON")?;
    match header.get("alg") {
        Some(Value::String(a)) if a == ALG => {}
        Some(Value::String(a)) => return Err(JwtError::BadAlgorithm(a.clone())),
        _ => return Err(JwtError::BadAlgorithm(String::new())),
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(other) => return Err(JwtError::BadType(other.to_string())),
    }
    if header.contains_key("crit") {
        return Err(JwtError::CriticalHeader);
    }
    if let Some(other) = header
        .keys()
        .find(|k| !HEADER_MEMBERS.contains(&k.as_str()))
    {
        return Err(JwtError::UnexpectedHeader(other.chars().take(64).collect()));
    }
    let kid = match header.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.clone(),
        _ => return Err(JwtError::MissingKid),
    };
    let point = keys
        .get(&kid)
        .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
    let sig = B64URL
        .decode(s)
        .map_err(|_| JwtError::Malformed("signature is not base64url"))?;
    let signed = &token[..h.len() + 1 + p.len()];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| JwtError::BadSignature)?;
    // A verified fixed-size signature is 64 bytes: r then s.
    if !crate::key::is_low_s(&sig[32..]) {
        return Err(JwtError::NonCanonicalSignature);
    }

    let claims = decode_json(p, "payload", "payload is not base64url JSON")?;
    let sub = match claims.get("sub") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(JwtError::WrongClaimType("sub", "must be a string")),
        None => return Err(JwtError::MissingClaim("sub")),
    };
    let sub: SpiffeId = sub
        .parse()
        .map_err(|e: crate::SpiffeIdError| JwtError::BadSubject(e.to_string()))?;
    if let Some(td) = opts.trust_domain
        && !sub.is_member_of(td)
    {
        return Err(JwtError::BadSubject(format!("{sub} is not in {td}")));
    }
    let aud: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or(JwtError::WrongClaimType(
                "aud",
                "must be a string or an array of strings",
            ))?,
        Some(_) => {
            return Err(JwtError::WrongClaimType(
                "aud",
                "must be a string or an array of strings",
            ));
        }
        None => return Err(JwtError::MissingClaim("aud")),
    };
    let exp = numeric(&claims, "exp")?.ok_or(JwtError::MissingClaim("exp"))?;
    let nbf = numeric(&claims, "nbf")?;
    let iat = numeric(&claims, "iat")?.unwrap_or(0);
    let now = opts
        .now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let skew = opts.skew.as_secs() as i64;
    if now >= exp + skew {
        return Err(JwtError::Expired {
            expired_at: exp,
            now,
        });
    }
    if let Some(nbf) = nbf
        && now + skew < nbf
    {
        return Err(JwtError::NotYetValid(nbf));
    }
    if let Some(want) = opts.audience
        && !aud.iter().any(|a| a == want)
    {
        return Err(JwtError::WrongAudience(want.to_owned()));
    }
    let jti = match claims.get("jti") {
        None => String::new(),
        Some(Value::String(j)) => j.clone(),
        Some(_) => return Err(JwtError::WrongClaimType("jti", "must be a string")),
    };
    let scopes = match claims.get("scope") {
        None => Vec::new(),
        Some(Value::String(s)) => s
            .split(' ')
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(_) => {
            return Err(JwtError::WrongClaimType(
                "scope",
                "must be a space-separated string",
            ));
        }
    };
    let generation = match claims.get("sigil_gen") {
        None => 0,
        Some(Value::Number(n)) => n.as_u64().ok_or(JwtError::WrongClaimType(
            "sigil_gen",
            "must be a whole number",
        ))?,
        Some(_) => {
            return Err(JwtError::WrongClaimType(
                "sigil_gen",
                "must be a whole number",
            ));
        }
    };
    let iss = match claims.get("iss") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(JwtError::WrongClaimType("iss", "must be a string")),
    };
    let actors = parse_act(claims.get("act"))?;
    let parents = match claims.get("sigil_parents") {
        None => Vec::new(),
        Some(Value::Array(items)) if items.len() <= MAX_ACTORS => items
            .iter()
            .map(|i| i.as_str().filter(|j| !j.is_empty()).map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(JwtError::WrongClaimType(
                "sigil_parents",
                "must be an array of non-empty token ids",
            ))?,
        Some(Value::Array(_)) => {
            return Err(JwtError::WrongClaimType(
                "sigil_parents",
                "names more parent tokens than the delegation depth allows",
            ));
        }
        Some(_) => {
            return Err(JwtError::WrongClaimType(
                "sigil_parents",
                "must be an array of non-empty token ids",
            ));
        }
    };
    if let Some(td) = opts.trust_domain
        && let Some(a) = actors.iter().find(|a| !a.is_member_of(td))
    {
        return Err(JwtError::BadSubject(format!("actor {a} is not in {td}")));
    }
    Ok(VerifiedJwt {
        kid,
        claims: JwtSvidClaims {
            iss,
            sub,
            aud,
            exp,
            iat,
            jti,
            scopes,
            generation,
            actors,
            parents,
        },
    })
}

/// A JSON object.
pub type JsonObject = serde_json::Map<String, Value>;

/// Reads the header and claims of a token without checking anything. For diagnostics and for
/// finding which key to check with; never trust the result.
pub fn peek_unverified(token: &str) -> Result<(JsonObject, JsonObject), JwtError> {
    if token.len() > MAX_JWT_LEN {
        return Err(JwtError::TooLong(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p)) = (parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    Ok((
        decode_json(h, "header", "header is not base64url JSON")?,
        decode_json(p, "payload", "payload is not base64url JSON")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn claims(exp_in: i64) -> JwtSvidClaims {
        let t = 1_800_000_000;
        JwtSvidClaims {
            iss: Some("https://sigil.example.org".into()),
            sub: "spiffe://example.org/app".parse().unwrap(),
            aud: vec!["db".into()],
            exp: t + exp_in,
            iat: t,
            jti: "abc".into(),
            scopes: vec!["read".into(), "write".into()],
            generation: 3,
            actors: Vec::new(),
            parents: Vec::new(),
        }
    }

    fn setup() -> (JwtSigner, JwtKeys) {
        let signer = JwtSigner::new(EcKey::generate().unwrap());
        let mut keys = JwtKeys::default();
        keys.insert(signer.kid(), signer.key().public_point().to_vec());
        (signer, keys)
    }

    fn opts<'a>(aud: Option<&'a str>) -> VerifyOptions<'a> {
        VerifyOptions {
            now: now(),
            skew: Duration::from_secs(30),
            audience: aud,
            trust_domain: None,
        }
    }

    /// Builds and signs a token with arbitrary header and claims JSON.
    fn raw_token(signer: &JwtSigner, header: &str, payload: &str) -> String {
        let mut t = format!("{}.{}", B64URL.encode(header), B64URL.encode(payload));
        let sig = signer.key().sign_es256(t.as_bytes()).unwrap();
        t.push('.');
        t.push_str(&B64URL.encode(sig));
        t
    }

    #[test]
    fn parent_token_ids_round_trip_and_malformed_ones_are_refused() {
        let (signer, keys) = setup();
        let mut c = claims(300);
        let plain = signer.sign(&c).unwrap();
        assert!(
            peek_unverified(&plain)
                .unwrap()
                .1
                .get("sigil_parents")
                .is_none(),
            "a workload's own token names no parents"
        );
        c.parents = vec!["p1".into(), "p0".into()];
        let token = signer.sign(&c).unwrap();
        assert_eq!(
            peek_unverified(&token).unwrap().1["sigil_parents"],
            serde_json::json!(["p1", "p0"])
        );
        assert_eq!(verify(&token, &keys, &opts(Some("db"))).unwrap().claims, c);
        let header = r#"{"alg":"ES256","typ":"JWT","kid":"KID"}"#.replace("KID", signer.kid());
        let too_many = serde_json::to_string(&vec!["p"; MAX_ACTORS + 1]).unwrap();
        for bad in [r#""p1""#, "[1]", r#"[""]"#, too_many.as_str()] {
            let payload = format!(
                r#"{{"sub":"spiffe://example.org/app","aud":"db","exp":1800000300,"sigil_parents":{bad}}}"#
            );
            let t = raw_token(&signer, &header, &payload);
            assert!(
                matches!(
                    verify(&t, &keys, &opts(Some("db"))),
                    Err(JwtError::WrongClaimType("sigil_parents", _))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_actor_chain_nests_as_rfc_8693_act_and_round_trips() {
        let (signer, keys) = setup();
        let mut c = claims(300);
        c.actors = vec![
            "spiffe://example.org/agent/summarizer".parse().unwrap(),
            "spiffe://example.org/agent/planner".parse().unwrap(),
        ];
        let token = signer.sign(&c).unwrap();
        let (_, p) = peek_unverified(&token).unwrap();
        assert_eq!(
            p["act"],
            serde_json::json!({"sub": "spiffe://example.org/agent/summarizer",
                "act": {"sub": "spiffe://example.org/agent/planner"}})
        );
        assert_eq!(verify(&token, &keys, &opts(Some("db"))).unwrap().claims, c);
        let td: TrustDomain = "other.org".parse().unwrap();
        let mut o = opts(Some("db"));
        o.trust_domain = Some(&td);
        assert!(verify(&token, &keys, &o).is_err());
    }

    #[test]
    fn round_trip_keeps_every_claim() {
        let (signer, keys) = setup();
        let token = signer.sign(&claims(300)).unwrap();
        let v = verify(&token, &keys, &opts(Some("db"))).unwrap();
        assert_eq!(v.claims, claims(300));
        assert_eq!(v.kid, signer.kid());
        let (h, _) = peek_unverified(&token).unwrap();
        let mut names: Vec<_> = h.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["alg", "kid", "typ"]);
    }

    #[test]
    fn expiry_and_audience_are_enforced() {
        let (signer, keys) = setup();
        let t = signer.sign(&claims(-31)).unwrap();
        assert!(matches!(
            verify(&t, &keys, &opts(None)),
            Err(JwtError::Expired { .. })
        ));
        // Within the skew still passes.
        let t = signer.sign(&claims(-10)).unwrap();
        assert!(verify(&t, &keys, &opts(None)).is_ok());
        let t = signer.sign(&claims(60)).unwrap();
        assert_eq!(
            verify(&t, &keys, &opts(Some("web"))),
            Err(JwtError::WrongAudience("web".into()))
        );
    }

    #[test]
    fn forged_or_foreign_tokens_fail() {
        let (signer, keys) = setup();
        let (other, _) = setup();
        let foreign = other.sign(&claims(60)).unwrap();
        assert!(matches!(
            verify(&foreign, &keys, &opts(None)),
            Err(JwtError::UnknownKey(_))
        ));
        // Same kid, different key: signature check fails.
        let forged = raw_token(
            &other,
            &format!(r#"{{"alg":"ES256","kid":"{}"}}"#, signer.kid()),
            r#"{"sub":"spiffe://example.org/app","aud":"db","exp":1800000060}"#,
        );
        assert_eq!(
            verify(&forged, &keys, &opts(None)),
            Err(JwtError::BadSignature)
        );
        // Payload swapped after signing.
        let good = signer.sign(&claims(60)).unwrap();
        let mut parts: Vec<&str> = good.split('.').collect();
        let evil =
            B64URL.encode(r#"{"sub":"spiffe://example.org/admin","aud":"db","exp":1800000060}"#);
        parts[1] = &evil;
        assert_eq!(
            verify(&parts.join("."), &keys, &opts(None)),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn algorithm_is_pinned() {
        let (signer, keys) = setup();
        for alg in ["none", "HS256", "RS256", "ES384", "EdDSA"] {
            let t = raw_token(
                &signer,
                &format!(r#"{{"alg":"{alg}","kid":"{}"}}"#, signer.kid()),
                r#"{"sub":"spiffe://example.org/a","aud":"x","exp":1800000060}"#,
            );
            assert_eq!(
                verify(&t, &keys, &opts(None)),
                Err(JwtError::BadAlgorithm(alg.into())),
                "{alg}"
            );
        }
        let t = format!(
            "{}.{}.",
            B64URL.encode(r#"{"alg":"none"}"#),
            B64URL.encode(r#"{"sub":"spiffe://example.org/a","aud":"x","exp":1800000060}"#)
        );
        assert_eq!(
            verify(&t, &keys, &opts(None)),
            Err(JwtError::BadAlgorithm("none".into()))
        );
    }

    #[test]
    fn claims_must_have_the_right_types() {
        let (signer, keys) = setup();
        let h = format!(r#"{{"alg":"ES256","kid":"{}"}}"#, signer.kid());
        let cases = [
            (
                r#"{"sub":"spiffe://example.org/a","aud":"x","exp":"1800000060"}"#,
                JwtError::WrongClaimType("exp", "must be a JSON number"),
            ),
            (
                r#"{"sub":"spiffe://example.org/a","aud":"x"}"#,
                JwtError::MissingClaim("exp"),
            ),
            (
                r#"{"sub":"spiffe://example.org/a","exp":1800000060}"#,
                JwtError::MissingClaim("aud"),
            ),
            (
                r#"{"sub":"spiffe://example.org/a","aud":[],"exp":1800000060}"#,
                JwtError::WrongClaimType("aud", "must be a string or an array of strings"),
            ),
            (
                r#"{"aud":"x","exp":1800000060}"#,
                JwtError::MissingClaim("sub"),
            ),
            (
                r#"{"sub":"spiffe://example.org/a","aud":"x","exp":1800000060,"nbf":"0"}"#,
                JwtError::WrongClaimType("nbf", "must be a JSON number"),
            ),
            (
                r#"{"sub":"spiffe://example.org/a","aud":"x","exp":1800000060,"nbf":1800000100}"#,
                JwtError::NotYetValid(1800000100),
            ),
        ];
        for (payload, want) in cases {
            assert_eq!(
                verify(&raw_token(&signer, &h, payload), &keys, &opts(None)),
                Err(want),
                "{payload}"
            );
        }
        assert!(matches!(
            verify(
                &raw_token(
                    &signer,
                    &h,
                    r#"{"sub":"https://x/a","aud":"x","exp":1800000060}"#
                ),
                &keys,
                &opts(None)
            ),
            Err(JwtError::BadSubject(_))
        ));
        let td: TrustDomain = "other.org".parse().unwrap();
        let o = VerifyOptions {
            trust_domain: Some(&td),
            ..opts(None)
        };
        assert!(matches!(
            verify(&signer.sign(&claims(60)).unwrap(), &keys, &o),
            Err(JwtError::BadSubject(_))
        ));
    }

    #[test]
    fn only_alg_kid_and_typ_may_be_in_the_header() {
        let (signer, keys) = setup();
        let payload = r#"{"sub":"spiffe://example.org/a","aud":"x","exp":1800000060}"#;
        let ok = format!(r#"{{"alg":"ES256","kid":"{}","typ":"JWT"}}"#, signer.kid());
        assert!(verify(&raw_token(&signer, &ok, payload), &keys, &opts(None)).is_ok());
        for extra in [
            r#""jku":"https://evil""#,
            r#""x5u":"https://evil""#,
            r#""cty":"JWT""#,
            r#""zip":"DEF""#,
        ] {
            let h = format!(r#"{{"alg":"ES256","kid":"{}",{extra}}}"#, signer.kid());
            assert!(
                matches!(
                    verify(&raw_token(&signer, &h, payload), &keys, &opts(None)),
                    Err(JwtError::UnexpectedHeader(_))
                ),
                "{extra}"
            );
        }
    }

    #[test]
    fn a_member_repeated_anywhere_is_refused() {
        let (signer, keys) = setup();
        let h = format!(r#"{{"alg":"ES256","kid":"{}"}}"#, signer.kid());
        let payload = r#"{"sub":"spiffe://example.org/a","sub":"spiffe://example.org/admin","aud":"x","exp":1800000060}"#;
        assert_eq!(
            verify(&raw_token(&signer, &h, payload), &keys, &opts(None)),
            Err(JwtError::DuplicateMember {
                part: "payload",
                name: "sub".into()
            })
        );
        let nested = r#"{"sub":"spiffe://example.org/a","aud":"x","exp":1800000060,"act":{"sub":"spiffe://example.org/b","sub":"spiffe://example.org/c"}}"#;
        assert!(matches!(
            verify(&raw_token(&signer, &h, nested), &keys, &opts(None)),
            Err(JwtError::DuplicateMember { .. })
        ));
        let dup_header = format!(
            r#"{{"alg":"ES256","kid":"{}","alg":"ES256"}}"#,
            signer.kid()
        );
        assert_eq!(
            verify(
                &raw_token(
                    &signer,
                    &dup_header,
                    r#"{"sub":"spiffe://example.org/a","aud":"x","exp":1800000060}"#
                ),
                &keys,
                &opts(None)
            ),
            Err(JwtError::DuplicateMember {
                part: "header",
                name: "alg".into()
            })
        );
        // A hostile name is bounded in the message.
        let long = "n".repeat(500);
        let p = format!(
            r#"{{"sub":"spiffe://example.org/a","aud":"x","exp":1800000060,"{long}":1,"{long}":2}}"#
        );
        let Err(JwtError::DuplicateMember { name, .. }) =
            verify(&raw_token(&signer, &h, &p), &keys, &opts(None))
        else {
            panic!("refused");
        };
        assert_eq!(name.len(), 64);
    }

    #[test]
    fn a_high_s_signature_is_refused_though_ecdsa_accepts_it() {
        let (signer, keys) = setup();
        let token = signer.sign(&claims(300)).unwrap();
        assert!(verify(&token, &keys, &opts(Some("db"))).is_ok());
        let (signed, sig_b64) = token.rsplit_once('.').unwrap();
        let mut sig = B64URL.decode(sig_b64).unwrap();
        let twin = crate::key::negate_mod_n(&sig[32..]);
        sig[32..].copy_from_slice(&twin);
        let malleated = format!("{signed}.{}", B64URL.encode(&sig));
        assert_ne!(malleated, token);
        assert_eq!(
            verify(&malleated, &keys, &opts(Some("db"))),
            Err(JwtError::NonCanonicalSignature)
        );
    }

    #[test]
    fn malformed_tokens_get_named_errors() {
        let (_, keys) = setup();
        assert!(matches!(
            verify("a.b", &keys, &opts(None)),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            verify("a.b.c.d", &keys, &opts(None)),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            verify("!!.b.c", &keys, &opts(None)),
            Err(JwtError::Malformed(_))
        ));
        assert_eq!(
            verify(&"a".repeat(9000), &keys, &opts(None)),
            Err(JwtError::TooLong(9000))
        );
    }
}
