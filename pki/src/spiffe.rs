//! SPIFFE IDs and trust domains, parsed per the SPIFFE ID specification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>).
//!
//! The only way to get a [`SpiffeId`] or a [`TrustDomain`] is through parsing, so a value of
//! either type is always valid.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest SPIFFE ID accepted, in bytes (the spec's URI limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID or trust domain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The value is empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// Longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is {0} bytes; the limit is 2048")]
    TooLong(usize),
    /// Does not start with `spiffe://`.
    #[error("scheme is missing or invalid: a SPIFFE ID starts with \"spiffe://\"")]
    BadScheme,
    /// Nothing between the scheme and the path.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// Longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is {0} bytes; the limit is 255")]
    TrustDomainTooLong(usize),
    /// A character outside `[a-z0-9._-]` in the trust domain (this also refuses ports,
    /// user info, upper case and percent-encoding).
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes and underscores (found {0:?})"
    )]
    BadTrustDomainChar(char),
    /// `//` in the path.
    #[error("path cannot contain empty segments")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path cannot contain dot segments")]
    DotSegment,
    /// The path ends with `/`.
    #[error("path cannot have a trailing slash")]
    TrailingSlash,
    /// A character outside `[a-zA-Z0-9._-]` in a path segment (this also refuses queries,
    /// fragments and percent-encoding).
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes and underscores (found {0:?})"
    )]
    BadPathChar(char),
}

/// A SPIFFE trust domain name, e.g. `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself, `spiffe://<td>`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME}{}", self.0),
            td_len: self.0.len(),
        }
    }

    /// A SPIFFE ID in this trust domain with the given path (which must start with `/`).
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        format!("{SCHEME}{}{path}", self.0).parse()
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    /// Accepts a bare name (`example.org`) or the trust domain's SPIFFE ID (`spiffe://example.org`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(":/") {
            let id: SpiffeId = s.parse()?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::BadTrustDomainChar('/'));
            }
            return Ok(id.trust_domain());
        }
        check_trust_domain(s)?;
        Ok(TrustDomain(s.to_owned()))
    }
}

/// A SPIFFE ID, e.g. `spiffe://example.org/ns/payments/sa/api`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_len: usize,
}

impl SpiffeId {
    /// The whole ID as a URI string.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The trust domain part, borrowed.
    pub fn trust_domain_str(&self) -> &str {
        &self.uri[SCHEME.len()..SCHEME.len() + self.td_len]
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[SCHEME.len() + self.td_len..]
    }

    /// True when this ID is in `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::BadScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td)?;
        if !path.is_empty() {
            // `path` starts with '/', so the first split item is the empty string before it.
            let mut segments = path.split('/').skip(1).peekable();
            while let Some(seg) = segments.next() {
                if seg.is_empty() {
                    return Err(if segments.peek().is_none() {
                        SpiffeIdError::TrailingSlash
                    } else {
                        SpiffeIdError::EmptySegment
                    });
                }
                if seg == "." || seg == ".." {
                    return Err(SpiffeIdError::DotSegment);
                }
                if let Some(c) = seg
                    .chars()
                    .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
                {
                    return Err(SpiffeIdError::BadPathChar(c));
                }
            }
        }
        Ok(SpiffeId {
            uri: s.to_owned(),
            td_len: td.len(),
        })
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> SpiffeIdError {
        match s.parse::<SpiffeId>() {
            Ok(id) => panic!("{s:?} was accepted as {id}"),
            Err(e) => e,
        }
    }

    #[test]
    fn accepts_the_specs_valid_examples() {
        for s in [
            "spiffe://trust-domain-name/path",
            "spiffe://example.org",
            "spiffe://example.org/ns/prod/sa/api",
            "spiffe://staging.example.com/payments/mysql",
            "spiffe://k8s-west.example.com/ns/staging/sa/default",
            "spiffe://example.org/a_b/C-D/e.f",
            "spiffe://1.2.3.4/x",
        ] {
            let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
        }
        let id: SpiffeId = "spiffe://example.org/ns/prod".parse().unwrap();
        assert_eq!(id.trust_domain_str(), "example.org");
        assert_eq!(id.path(), "/ns/prod");
        assert!(id.is_member_of(&"example.org".parse().unwrap()));
        assert!(!id.is_member_of(&"example.com".parse().unwrap()));
    }

    #[test]
    fn refuses_what_the_spec_forbids_naming_the_reason() {
        assert_eq!(err(""), SpiffeIdError::Empty);
        assert_eq!(err("http://example.org/a"), SpiffeIdError::BadScheme);
        assert_eq!(err("SPIFFE://example.org/a"), SpiffeIdError::BadScheme);
        assert_eq!(err("spiffe:/example.org"), SpiffeIdError::BadScheme);
        assert_eq!(err("spiffe:///path"), SpiffeIdError::MissingTrustDomain);
        assert_eq!(err("spiffe://"), SpiffeIdError::MissingTrustDomain);
        assert_eq!(
            err("spiffe://Example.org/a"),
            SpiffeIdError::BadTrustDomainChar('E')
        );
        assert_eq!(
            err("spiffe://example.org:8080/a"),
            SpiffeIdError::BadTrustDomainChar(':')
        );
        assert_eq!(
            err("spiffe://user@example.org/a"),
            SpiffeIdError::BadTrustDomainChar('@')
        );
        assert_eq!(
            err("spiffe://exa%41mple.org/a"),
            SpiffeIdError::BadTrustDomainChar('%')
        );
        assert_eq!(
            err("spiffe://example.org/a/%41"),
            SpiffeIdError::BadPathChar('%')
        );
        assert_eq!(
            err("spiffe://example.org/a?x=1"),
            SpiffeIdError::BadPathChar('?')
        );
        assert_eq!(
            err("spiffe://example.org/a#frag"),
            SpiffeIdError::BadPathChar('#')
        );
        assert_eq!(
            err("spiffe://example.org?x=1"),
            SpiffeIdError::BadTrustDomainChar('?')
        );
        assert_eq!(
            err("spiffe://example.org#x"),
            SpiffeIdError::BadTrustDomainChar('#')
        );
        assert_eq!(
            err("spiffe://example.org/a b"),
            SpiffeIdError::BadPathChar(' ')
        );
        assert_eq!(err("spiffe://example.org//a"), SpiffeIdError::EmptySegment);
        assert_eq!(
            err("spiffe://example.org/a//b"),
            SpiffeIdError::EmptySegment
        );
        assert_eq!(err("spiffe://example.org/"), SpiffeIdError::TrailingSlash);
        assert_eq!(err("spiffe://example.org/a/"), SpiffeIdError::TrailingSlash);
        assert_eq!(err("spiffe://example.org/./a"), SpiffeIdError::DotSegment);
        assert_eq!(err("spiffe://example.org/a/.."), SpiffeIdError::DotSegment);
        assert_eq!(
            err("spiffe://example.org/ä"),
            SpiffeIdError::BadPathChar('ä')
        );
    }

    #[test]
    fn enforces_length_limits() {
        let td = "a".repeat(255);
        assert!(format!("spiffe://{td}/x").parse::<SpiffeId>().is_ok());
        let td = "a".repeat(256);
        assert_eq!(
            err(&format!("spiffe://{td}/x")),
            SpiffeIdError::TrustDomainTooLong(256)
        );
        let path = "/".to_owned() + &"b".repeat(2048 - "spiffe://e.org/".len());
        let ok = format!("spiffe://e.org{path}");
        assert_eq!(ok.len(), 2048);
        assert!(ok.parse::<SpiffeId>().is_ok());
        assert_eq!(err(&format!("{ok}c")), SpiffeIdError::TooLong(2049));
    }

    #[test]
    fn trust_domains_parse_bare_or_as_an_id() {
        let td: TrustDomain = "example.org".parse().unwrap();
        assert_eq!(td.as_str(), "example.org");
        let td2: TrustDomain = "spiffe://example.org".parse().unwrap();
        assert_eq!(td, td2);
        assert!("spiffe://example.org/path".parse::<TrustDomain>().is_err());
        assert!("Example.org".parse::<TrustDomain>().is_err());
        assert!("".parse::<TrustDomain>().is_err());
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert_eq!(td.id_with_path("/a/b").unwrap().path(), "/a/b");
        assert!(td.id_with_path("/a/").is_err());
    }

    #[test]
    fn serde_round_trip_validates() {
        let id: SpiffeId = "spiffe://example.org/x".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://example.org/x\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org/x/\"").is_err());
    }
}
