//! [`WorkloadClient`]: attest, then fetch and renew credentials over mutual TLS. For
//! credentials that renew themselves, wrap it in a [`crate::Source`].

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls_pki_types::CertificateDer;
use sigil_pki::{EcKey, SecretString, SpiffeBundle, SpiffeId, TrustDomain};
use sigil_proto::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::transport::{self, ClientCertSlot};
use crate::trust::TrustState;
use crate::{Credentials, ErrorKind, Grant, JwtSvid, SdkError, TrustBundle, X509Svid};

type BrokerClient =
    pb::broker_client::BrokerClient<InterceptedService<crate::failover::Failover, ActAs>>;

/// On the broker's Unix socket the kernel vouches for the calling process on every call, and a
/// process may match several identities: this names the one whose SVID the client holds
/// (metadata `sigil-spiffe-id`). Over TLS the client certificate says it and this is empty.
#[derive(Clone, Default)]
struct ActAs(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for ActAs {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("sigil-spiffe-id", v.clone());
        }
        Ok(req)
    }
}

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://host:port`; several replicas separated by commas
    /// (`https://a:8443,https://b:8443`), or a name that resolves to several addresses: calls
    /// move to the next one when the current one is gone or unavailable.
    pub broker_url: String,
    /// PEM roots to trust at first (the `bundle.pem` an operator handed out); the broker's
    /// bundle replaces them once received.
    pub trust_bundle_pem: Vec<u8>,
    /// Per-call deadline.
    pub timeout: Duration,
    /// The time renewal schedules and certificate checks read: the system's, except in tests.
    pub clock: Arc<dyn crate::clock::Clock>,
}

impl ClientConfig {
    /// A config with a 10 s deadline.
    pub fn new(broker_url: impl Into<String>, trust_bundle_pem: impl Into<Vec<u8>>) -> Self {
        ClientConfig {
            broker_url: broker_url.into(),
            trust_bundle_pem: trust_bundle_pem.into(),
            timeout: Duration::from_secs(10),
            clock: Arc::new(crate::clock::SystemClock),
        }
    }

    /// The same config reading time from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.clock = clock;
        self
    }
}

/// Evidence a workload presents.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Evidence {
    /// A one-time join token.
    JoinToken(SecretString),
    /// A JWT from an OIDC issuer the broker trusts (a Kubernetes projected service-account
    /// token, a GitHub Actions or GitLab CI ID token).
    Oidc(SecretString),
    /// The caller's Unix peer credentials; only over the broker's Unix socket
    /// (`unix:///run/sigil/workload.sock`).
    Unix,
}

/// A JWT-SVID wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct JwtRequest {
    /// Audiences (at least one).
    pub audiences: Vec<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Lifetime; `None` for the broker's default.
    pub ttl: Option<Duration>,
}

impl JwtRequest {
    /// A request for one audience.
    pub fn audience(aud: impl Into<String>) -> Self {
        JwtRequest {
            audiences: vec![aud.into()],
            ..Default::default()
        }
    }
}

/// What to ask for when attesting and renewing.
#[derive(Debug, Clone, Default)]
pub struct SvidOptions {
    /// X.509-SVID lifetime; `None` for the broker's default.
    pub ttl: Option<Duration>,
    /// DNS SANs (must be in the identity's entitlements).
    pub dns_names: Vec<String>,
    /// When OIDC or Unix evidence matches several identities, the one wanted.
    pub spiffe_id: Option<String>,
}

/// A workload's connection to the broker. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    targets: Arc<crate::failover::Targets>,
    timeout: Duration,
    trust: Arc<TrustState>,
    anon: BrokerClient,
    cert_slot: Arc<ClientCertSlot>,
    mtls: ArcSwapOption<BrokerClient>,
    svid: ArcSwapOption<X509Svid>,
    options: std::sync::Mutex<SvidOptions>,
}

fn ttl_secs(d: Option<Duration>) -> u32 {
    d.map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

fn grant(g: Option<pb::Grant>) -> Grant {
    g.map(|g| Grant {
        ttl_seconds: g.ttl_seconds,
        ttl_clamped: g.ttl_clamped,
        notice: g.notice,
    })
    .unwrap_or_default()
}

fn jwt_req(r: &JwtRequest) -> pb::JwtRequest {
    pb::JwtRequest {
        audiences: r.audiences.clone(),
        scopes: r.scopes.clone(),
        ttl_seconds: ttl_secs(r.ttl),
    }
}

fn bad_reply(what: &str) -> SdkError {
    SdkError::new(
        ErrorKind::Retryable,
        format!("the broker's reply is malformed: {what}"),
    )
}

impl WorkloadClient {
    /// Prepares a connection (made lazily on the first call).
    pub fn new(cfg: ClientConfig) -> Result<Self, SdkError> {
        let targets = Arc::new(crate::failover::Targets::parse(&cfg.broker_url)?);
        let roots = sigil_pki::certs_from_pem(&cfg.trust_bundle_pem)
            .map_err(|e| SdkError::fatal(format!("trust bundle: {e}")))?;
        let trust = Arc::new(TrustState::with_clock(roots, cfg.clock.clone())?);
        let anon = pb::broker_client::BrokerClient::with_interceptor(
            crate::failover::Failover::new(
                targets.clone(),
                transport::dynamic_client_config(trust.clone(), None)?,
                cfg.timeout,
            )?,
            ActAs::default(),
        );
        Ok(WorkloadClient {
            inner: Arc::new(Inner {
                targets,
                timeout: cfg.timeout,
                trust,
                anon,
                cert_slot: Arc::new(ClientCertSlot::default()),
                mtls: ArcSwapOption::empty(),
                svid: ArcSwapOption::empty(),
                options: std::sync::Mutex::new(SvidOptions::default()),
            }),
        })
    }

    /// Attests with `evidence`, generating a fresh P-256 key locally (it is never sent), and
    /// returns the first X.509-SVID, the bundle and any JWT-SVIDs asked for.
    pub async fn attest(
        &self,
        evidence: Evidence,
        options: SvidOptions,
        jwts: &[JwtRequest],
    ) -> Result<Credentials, SdkError> {
        let (key, csr) = new_key_and_csr()?;
        let req = pb::AttestRequest {
            evidence: Some(pb::Evidence {
                kind: Some(match evidence {
                    Evidence::JoinToken(t) => {
                        pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                            token: t.expose_secret().to_owned(),
                        })
                    }
                    Evidence::Oidc(t) => pb::evidence::Kind::Oidc(pb::OidcEvidence {
                        token: t.expose_secret().to_owned(),
                    }),
                    Evidence::Unix => pb::evidence::Kind::Unix(pb::UnixEvidence {}),
                }),
            }),
            csr,
            ttl_seconds: ttl_secs(options.ttl),
            dns_names: options.dns_names.clone(),
            jwts: jwts.iter().map(jwt_req).collect(),
            spiffe_id: options.spiffe_id.clone().unwrap_or_default(),
        };
        let resp = self.inner.anon.clone().attest(req).await?.into_inner();
        let bundle = self.accept_bundle(resp.bundle.ok_or_else(|| bad_reply("no bundle"))?)?;
        let svid = self.accept_svid(resp.svid.ok_or_else(|| bad_reply("no svid"))?, &key)?;
        if let Ok(mut o) = self.inner.options.lock() {
            *o = options;
        }
        let jwts = resp
            .jwts
            .into_iter()
            .map(jwt_svid)
            .collect::<Result<_, _>>()?;
        Ok(Credentials { svid, bundle, jwts })
    }

    /// Renews the X.509-SVID with a fresh key, proving the identity with the current one.
    pub async fn renew_x509_svid(&self) -> Result<Arc<X509Svid>, SdkError> {
        let (key, csr) = new_key_and_csr()?;
        let options = self
            .inner
            .options
            .lock()
            .map(|o| o.clone())
            .unwrap_or_default();
        let req = pb::MintX509SvidRequest {
            csr,
            ttl_seconds: ttl_secs(options.ttl),
            dns_names: options.dns_names,
        };
        let resp = self.mtls()?.mint_x509_svid(req).await?.into_inner();
        self.accept_svid(resp.svid.ok_or_else(|| bad_reply("no svid"))?, &key)
    }

    /// Mints a JWT-SVID for this workload.
    pub async fn fetch_jwt_svid(&self, req: &JwtRequest) -> Result<JwtSvid, SdkError> {
        let resp = self
            .mtls()?
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                request: Some(jwt_req(req)),
            })
            .await?
            .into_inner();
        jwt_svid(resp.svid.ok_or_else(|| bad_reply("no svid"))?)
    }

    /// Exchanges another workload's JWT-SVID (`subject_token`) for a narrower one naming this
    /// workload as the actor (RFC 8693 `act`): a subset of its audiences and scopes, no longer
    /// life. Returns the token and the actor chain (this workload first).
    pub async fn exchange_jwt_svid(
        &self,
        subject_token: &str,
        req: &JwtRequest,
    ) -> Result<(JwtSvid, Vec<String>), SdkError> {
        let resp = self
            .mtls()?
            .exchange_jwt_svid(pb::ExchangeJwtSvidRequest {
                subject_token: subject_token.to_owned(),
                audiences: req.audiences.clone(),
                scopes: req.scopes.clone(),
                ttl_seconds: ttl_secs(req.ttl),
            })
            .await?
            .into_inner();
        let svid = jwt_svid(resp.svid.ok_or_else(|| bad_reply("no svid"))?)?;
        Ok((svid, resp.actors))
    }

    /// Fetches the current trust bundle.
    pub async fn fetch_bundle(&self) -> Result<Arc<TrustBundle>, SdkError> {
        let resp = self
            .inner
            .anon
            .clone()
            .fetch_bundle(pb::FetchBundleRequest {})
            .await?
            .into_inner();
        self.accept_bundle(resp.bundle.ok_or_else(|| bad_reply("no bundle"))?)
    }

    /// Opens the broker's stream of trust changes, resuming after `since` (0: from a
    /// snapshot). Uses mTLS when this client has an SVID, so directives addressed to it
    /// arrive too.
    pub async fn watch(&self, since: u64) -> Result<tonic::Streaming<pb::WatchEvent>, SdkError> {
        let mut c = self
            .inner
            .mtls
            .load_full()
            .map(|c| (*c).clone())
            .unwrap_or_else(|| self.inner.anon.clone());
        // A stream lives until the broker or this client ends it, not for one call's deadline.
        let mut req = tonic::Request::new(pb::WatchRequest {
            since_sequence: since,
        });
        req.set_timeout(Duration::from_secs(365 * 86400));
        Ok(c.watch(req).await?.into_inner())
    }

    /// Asks the broker whether a credential is valid right now (RFC 7662 semantics).
    pub async fn introspect_token(&self, token: &str) -> Result<pb::IntrospectResponse, SdkError> {
        let req = pb::IntrospectRequest {
            subject: Some(pb::introspect_request::Subject::Token(token.to_owned())),
        };
        Ok(self.mtls()?.introspect(req).await?.into_inner())
    }

    /// The current X.509-SVID.
    pub fn x509_svid(&self) -> Option<Arc<X509Svid>> {
        self.inner.svid.load_full()
    }

    /// The current bundle.
    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.inner.trust.bundle()
    }

    /// The trust state (bundle and revocations) this client keeps.
    pub fn trust(&self) -> &Arc<TrustState> {
        &self.inner.trust
    }

    fn mtls(&self) -> Result<BrokerClient, SdkError> {
        self.inner
            .mtls
            .load_full()
            .map(|c| (*c).clone())
            .ok_or_else(|| SdkError::new(ErrorKind::Reattest, "no X.509-SVID yet: attest first"))
    }

    /// Installs a bundle the broker sent (on attestation, fetch or the watch stream).
    pub(crate) fn accept_bundle(&self, b: pb::Bundle) -> Result<Arc<TrustBundle>, SdkError> {
        let td: TrustDomain = b
            .trust_domain
            .parse()
            .map_err(|_| bad_reply("bad trust domain"))?;
        let bundle = SpiffeBundle::from_json(td, &b.spiffe_bundle_json)
            .map_err(|e| bad_reply(&e.to_string()))?;
        self.inner
            .trust
            .set_bundle(TrustBundle::new(bundle, b.spiffe_bundle_json)?);
        self.inner
            .trust
            .bundle()
            .ok_or_else(|| bad_reply("no bundle"))
    }

    /// Checks an SVID before publishing it: the leaf carries our key and one SPIFFE ID, and the
    /// chain verifies to the current roots. A bad reply never replaces a good credential.
    fn accept_svid(&self, s: pb::X509Svid, key: &EcKey) -> Result<Arc<X509Svid>, SdkError> {
        let chain: Vec<CertificateDer<'static>> =
            s.cert_chain.into_iter().map(CertificateDer::from).collect();
        let leaf = chain
            .first()
            .ok_or_else(|| bad_reply("empty certificate chain"))?;
        let (_, parsed) =
            X509Certificate::from_der(leaf).map_err(|_| bad_reply("leaf is not X.509"))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_point() {
            return Err(bad_reply(
                "the certificate is not for the key this client generated",
            ));
        }
        let spiffe_id: SpiffeId = s
            .spiffe_id
            .parse()
            .map_err(|_| bad_reply("bad SPIFFE ID"))?;
        let ee =
            webpki::EndEntityCert::try_from(leaf).map_err(|_| bad_reply("leaf does not parse"))?;
        let roots = self.inner.trust.current_roots();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            roots.anchors(),
            &chain[1..],
            crate::clock::unix_time(self.inner.trust.clock().now()),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            bad_reply(&format!(
                "certificate chain does not verify against the trust bundle: {e}"
            ))
        })?;
        let pkcs8 = key.to_pkcs8().map_err(|e| SdkError::fatal(e.to_string()))?;
        let svid = Arc::new(X509Svid {
            spiffe_id,
            not_before: parsed.validity().not_before.timestamp(),
            cert_chain: chain,
            private_key: pkcs8,
            serial: s.serial,
            expires_at: s.expires_at,
            generation: s.generation,
            grant: grant(s.grant),
        });
        self.publish(svid.clone())?;
        Ok(svid)
    }

    fn publish(&self, svid: Arc<X509Svid>) -> Result<(), SdkError> {
        self.inner
            .cert_slot
            .set(svid.cert_chain.clone(), svid.private_key.expose_secret())?;
        // A new channel so the next call handshakes with the new certificate; calls in flight
        // finish on the old connection.
        let resolver: Arc<dyn rustls::client::ResolvesClientCert> = self.inner.cert_slot.clone();
        let tls = transport::dynamic_client_config(self.inner.trust.clone(), Some(resolver))?;
        let ch =
            crate::failover::Failover::new(self.inner.targets.clone(), tls, self.inner.timeout)?;
        let act_as = ActAs(
            self.inner
                .targets
                .is_unix()
                .then(|| svid.spiffe_id.as_str().parse().ok())
                .flatten(),
        );
        self.inner.mtls.store(Some(Arc::new(
            pb::broker_client::BrokerClient::with_interceptor(ch, act_as),
        )));
        self.inner.svid.store(Some(svid));
        Ok(())
    }
}

fn new_key_and_csr() -> Result<(EcKey, Vec<u8>), SdkError> {
    let key = EcKey::generate().map_err(|e| SdkError::fatal(e.to_string()))?;
    let csr =
        sigil_pki::csr::request_for(&key).map_err(|e| SdkError::fatal(format!("CSR: {e}")))?;
    Ok((key, csr))
}

fn jwt_svid(s: pb::JwtSvid) -> Result<JwtSvid, SdkError> {
    Ok(JwtSvid {
        token: SecretString::new(s.token),
        spiffe_id: s
            .spiffe_id
            .parse()
            .map_err(|_| bad_reply("bad SPIFFE ID"))?,
        audiences: s.audiences,
        scopes: s.scopes,
        jti: s.jti,
        expires_at: s.expires_at,
        issued_at: s.issued_at,
        grant: grant(s.grant),
    })
}
