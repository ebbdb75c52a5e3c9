//! The workload-facing `sigil.v1.Broker` service.

use std::pin::Pin;
use std::sync::Arc;

use sigil_pki::SecretString;
use sigil_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{context, status, ttl};
use crate::authz::Grant;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::hub::{HubEvent, Sequenced, Target};
use crate::issue::{Evidence, IssuedJwt, IssuedX509, JwtAsk, X509Ask};
use crate::keys::KeyRing;
use crate::model::{IdentityStatus, RevocationRecord};

/// Implements `sigil.v1.Broker`.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    broker: Arc<Broker>,
}

impl WorkloadApi {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        WorkloadApi { broker }
    }
}

fn grant(g: &Grant) -> pb::Grant {
    pb::Grant {
        ttl_seconds: u32::try_from(g.ttl.as_secs()).unwrap_or(u32::MAX),
        ttl_clamped: g.clamped,
        notice: g.notice.clone(),
    }
}

fn x509(s: IssuedX509) -> pb::X509Svid {
    pb::X509Svid {
        spiffe_id: s.spiffe_id.to_string(),
        cert_chain: s.chain.into_iter().map(|c| c.to_vec()).collect(),
        serial: s.serial,
        expires_at: s.expires_at,
        generation: s.generation,
        grant: Some(grant(&s.grant)),
    }
}

fn jwt(s: IssuedJwt) -> pb::JwtSvid {
    pb::JwtSvid {
        token: s.token.expose_secret().to_owned(),
        spiffe_id: s.spiffe_id.to_string(),
        audiences: s.audiences,
        scopes: s.scopes,
        jti: s.jti,
        expires_at: s.expires_at,
        grant: Some(grant(&s.grant)),
        issued_at: s.issued_at,
    }
}

/// The bundle message for the current key ring.
pub fn bundle(ring: &KeyRing) -> pb::Bundle {
    pb::Bundle {
        trust_domain: ring.bundle.trust_domain.to_string(),
        x509_authorities: ring
            .bundle
            .x509_authorities
            .iter()
            .map(|c| c.to_vec())
            .collect(),
        spiffe_bundle_json: ring.bundle_json.clone(),
        sequence: ring.bundle.sequence,
    }
}

fn jwt_ask(r: pb::JwtRequest) -> JwtAsk {
    JwtAsk {
        audiences: r.audiences,
        scopes: r.scopes,
        ttl: ttl(r.ttl_seconds),
    }
}

/// A revocation as watchers see it: what a verifier needs to refuse the credential (its id,
/// kind and when the entry may be forgotten), not whose it was or the operator's reason.
fn revoked(r: &RevocationRecord) -> pb::RevokedCredential {
    pb::RevokedCredential {
        credential_id: r.credential_id.clone(),
        kind: r.kind.as_str().into(),
        spiffe_id: String::new(),
        expires_at: r.expires_at,
        reason: String::new(),
    }
}

/// The full revocation state, for a watcher that starts fresh or fell behind.
fn revocation_snapshot(broker: &Broker, seq: u64) -> pb::WatchEvent {
    let floors = broker
        .registry()
        .list()
        .iter()
        .filter(|r| r.generation > 1 || r.status == IdentityStatus::Retired)
        .map(|r| pb::GenerationFloor {
            spiffe_id: r.spiffe_id.to_string(),
            min_generation: r.generation,
        })
        .collect();
    pb::WatchEvent {
        sequence: seq,
        kind: Some(pb::watch_event::Kind::Revocations(pb::Revocations {
            snapshot: true,
            credentials: broker
                .revocations()
                .snapshot()
                .iter()
                .map(revoked)
                .collect(),
            floors,
            revoked_keys: broker.keys().current().revoked_keys.clone(),
            expired: Vec::new(),
        })),
    }
}

/// What one watcher is sent for a hub event (directives only reach their addressee).
fn watch_event(
    broker: &Broker,
    ev: &Sequenced,
    peer: Option<&crate::attest::x509::PeerCert>,
) -> Option<pb::WatchEvent> {
    use pb::watch_event::Kind;
    let additions = |r: pb::Revocations| Some(Kind::Revocations(r));
    let kind = match &ev.event {
        HubEvent::Bundle => Some(Kind::Bundle(bundle(&broker.keys().current()))),
        HubEvent::Revoked(recs) => additions(pb::Revocations {
            credentials: recs.iter().map(revoked).collect(),
            ..Default::default()
        }),
        HubEvent::Expired(ids) => additions(pb::Revocations {
            expired: ids.clone(),
            ..Default::default()
        }),
        HubEvent::Floors(f) => additions(pb::Revocations {
            floors: f
                .iter()
                .map(|(id, g)| pb::GenerationFloor {
                    spiffe_id: id.clone(),
                    min_generation: *g,
                })
                .collect(),
            ..Default::default()
        }),
        HubEvent::KeysRevoked(k) => additions(pb::Revocations {
            revoked_keys: k.clone(),
            ..Default::default()
        }),
        HubEvent::RenewNow { target, reason } => {
            let addressed = match (target, peer) {
                (Target::All, Some(_)) => true,
                (Target::Serial(s), Some(p)) => p.serial_hex() == *s,
                (Target::SpiffeId(id), Some(p)) => {
                    p.spiffe_id.as_ref().is_some_and(|x| x.as_str() == id)
                }
                (_, None) => false,
            };
            addressed.then(|| {
                Kind::RenewNow(pb::RenewNow {
                    reason: reason.clone(),
                })
            })
        }
    };
    kind.map(|k| pb::WatchEvent {
        sequence: ev.seq,
        kind: Some(k),
    })
}

/// Streams trust changes to one watcher until it goes away or the broker shuts down.
async fn run_watch(
    broker: Arc<Broker>,
    since: u64,
    peer: Option<Arc<crate::attest::x509::PeerCert>>,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
    _slot: crate::hub::WatchSlot,
) {
    let (mut rx, replay) = broker.hub().subscribe(since);
    metrics::gauge!("sigil_watch_streams").increment(1.0);
    let snapshot = |b: &Broker| {
        let seq = b.hub().sequence();
        [
            pb::WatchEvent {
                sequence: seq,
                kind: Some(pb::watch_event::Kind::Bundle(bundle(&b.keys().current()))),
            },
            revocation_snapshot(b, seq),
        ]
    };
    let initial: Vec<pb::WatchEvent> = match replay {
        Some(events) => events
            .iter()
            .filter_map(|e| watch_event(&broker, e, peer.as_deref()))
            .collect(),
        None => snapshot(&broker).into(),
    };
    'outer: {
        for m in initial {
            if tx.send(Ok(m)).await.is_err() {
                break 'outer;
            }
        }
        loop {
            let next = tokio::select! {
                _ = broker.shutdown_token().cancelled() => break,
                _ = tx.closed() => break,
                r = rx.recv() => r,
            };
            let out: Vec<pb::WatchEvent> = match next {
                Ok(ev) => watch_event(&broker, &ev, peer.as_deref())
                    .into_iter()
                    .collect(),
                // Too slow to keep up: start it over from a snapshot.
                Err(broadcast::error::RecvError::Lagged(_)) => snapshot(&broker).into(),
                Err(broadcast::error::RecvError::Closed) => break,
            };
            for m in out {
                if tx.send(Ok(m)).await.is_err() {
                    break 'outer;
                }
            }
        }
    }
    metrics::gauge!("sigil_watch_streams").decrement(1.0);
}

#[tonic::async_trait]
impl pb::broker_server::Broker for WorkloadApi {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let ctx = context(&req);
        // The feed names revoked credentials and identities: only holders of a current Sigil
        // credential (a workload, a verifier with its own identity, an operator) may follow it.
        let client = self
            .broker
            .authorize_watch(&ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        let max = self.broker.config().limits.max_watch_streams_per_client;
        let Some(slot) = self.broker.hub().admit(&client, max) else {
            return Err(status(
                BrokerError::ResourceExhausted(format!(
                    "this client already has {max} watch streams open (limits.max_watch_streams_per_client); one is enough"
                )),
                &ctx,
            ));
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run_watch(
            self.broker.clone(),
            req.get_ref().since_sequence,
            ctx.peer.clone(),
            tx,
            slot,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn introspect(
        &self,
        req: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let ctx = context(&req);
        // Any current Sigil credential may introspect; operators also learn why a credential
        // is inactive (RFC 7662 tells others nothing about inactive tokens).
        let operator = self.broker.authorize_operator(&ctx).is_ok();
        if !operator {
            self.broker
                .attest_peer(&ctx, "introspect")
                .await
                .map_err(|e| status(e, &ctx))?;
        }
        let r = match req.into_inner().subject {
            Some(pb::introspect_request::Subject::Token(t)) => {
                self.broker.introspect_token(t.trim())
            }
            Some(pb::introspect_request::Subject::Certificate(c)) => {
                self.broker.introspect_certificate(&c).await
            }
            None => {
                return Err(status(
                    BrokerError::invalid("subject", "give a token or a certificate"),
                    &ctx,
                ));
            }
        };
        if !r.active {
            return Ok(Response::new(pb::IntrospectResponse {
                active: false,
                reason: if operator { r.reason } else { String::new() },
                ..Default::default()
            }));
        }
        Ok(Response::new(pb::IntrospectResponse {
            active: true,
            sub: r.sub,
            aud: r.aud,
            exp: r.exp,
            iat: r.iat,
            jti: r.id,
            scope: r.scopes.join(" "),
            token_type: r.kind,
            generation: r.generation,
            reason: String::new(),
        }))
    }

    async fn attest(
        &self,
        req: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let ctx = context(&req);
        let r = req.into_inner();
        let evidence = match r.evidence.and_then(|e| e.kind) {
            Some(pb::evidence::Kind::JoinToken(t)) => {
                Evidence::JoinToken(SecretString::new(t.token))
            }
            Some(pb::evidence::Kind::Oidc(t)) => Evidence::Oidc(SecretString::new(t.token)),
            Some(pb::evidence::Kind::Unix(_)) => Evidence::Unix,
            None => {
                return Err(status(
                    BrokerError::invalid("evidence", "is required (e.g. a join token)"),
                    &ctx,
                ));
            }
        };
        let ask = X509Ask {
            csr_der: r.csr,
            ttl: ttl(r.ttl_seconds),
            dns_names: r.dns_names,
        };
        let jwts = r.jwts.into_iter().map(jwt_ask).collect();
        let spiffe_id = (!r.spiffe_id.is_empty()).then_some(r.spiffe_id);
        let (svid, jwts) = self
            .broker
            .attest_as(&evidence, spiffe_id.as_deref(), Some(ask), jwts, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        let ring = self.broker.keys().current();
        Ok(Response::new(pb::AttestResponse {
            svid: svid.map(x509),
            bundle: Some(bundle(&ring)),
            jwts: jwts.into_iter().map(jwt).collect(),
        }))
    }

    async fn exchange_jwt_svid(
        &self,
        req: Request<pb::ExchangeJwtSvidRequest>,
    ) -> Result<Response<pb::ExchangeJwtSvidResponse>, Status> {
        let ctx = context(&req);
        let r = req.into_inner();
        let ask = crate::exchange::ExchangeAsk {
            subject_token: SecretString::new(r.subject_token),
            audiences: r.audiences,
            scopes: r.scopes,
            ttl: ttl(r.ttl_seconds),
        };
        let (issued, actors) = self
            .broker
            .exchange_jwt(ask, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(pb::ExchangeJwtSvidResponse {
            svid: Some(jwt(issued)),
            actors: actors.into_iter().map(|a| a.to_string()).collect(),
        }))
    }

    async fn mint_x509_svid(
        &self,
        req: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        let ctx = context(&req);
        let r = req.into_inner();
        let ask = X509Ask {
            csr_der: r.csr,
            ttl: ttl(r.ttl_seconds),
            dns_names: r.dns_names,
        };
        let out = self
            .broker
            .mint_x509(ask, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(pb::MintX509SvidResponse {
            svid: Some(x509(out)),
        }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let ctx = context(&req);
        let Some(r) = req.into_inner().request else {
            return Err(status(BrokerError::invalid("request", "is required"), &ctx));
        };
        let out = self
            .broker
            .mint_jwt(jwt_ask(r), &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(pb::MintJwtSvidResponse {
            svid: Some(jwt(out)),
        }))
    }

    async fn fetch_bundle(
        &self,
        _req: Request<pb::FetchBundleRequest>,
    ) -> Result<Response<pb::FetchBundleResponse>, Status> {
        Ok(Response::new(pb::FetchBundleResponse {
            bundle: Some(bundle(&self.broker.keys().current())),
        }))
    }
}
