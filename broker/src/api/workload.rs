//! The workload-facing `sigil.v1.Broker` service.

use std::sync::Arc;

use sigil_pki::SecretString;
use sigil_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{context, status, ttl};
use crate::authz::Grant;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::issue::{Evidence, IssuedJwt, IssuedX509, JwtAsk, X509Ask};
use crate::keys::KeyRing;

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

#[tonic::async_trait]
impl pb::broker_server::Broker for WorkloadApi {
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
        let out = self
            .broker
            .attest(evidence, ask, jwts, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        let ring = self.broker.keys().current();
        Ok(Response::new(pb::AttestResponse {
            svid: Some(x509(out.x509)),
            bundle: Some(bundle(&ring)),
            jwts: out.jwts.into_iter().map(jwt).collect(),
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
