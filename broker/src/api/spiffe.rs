//! The SPIFFE Workload API on the Unix socket, as the SPIFFE specification defines it, so
//! existing SPIFFE clients work unmodified.
//!
//! - Every call must carry the metadata `workload.spiffe.io` exactly once, with the value
//!   `true` exactly (case-sensitive, no spaces) — `InvalidArgument` otherwise, before any
//!   attestation work: it stops a browser or an SSRF from reaching the API.
//! - The caller is attested by its Unix peer credentials on every call; a caller that matches
//!   no identity gets `PermissionDenied`.
//! - The broker generates the SVID key pairs (the API hands out private keys); each SVID is
//!   minted through the same gates, ledger and audit as any other credential.
//! - `FetchX509SVID`, `FetchX509Bundles` and `FetchJWTBundles` send the complete state at once
//!   and again on every change: a new bundle (rotation), a revocation or generation bump
//!   touching the caller, a renew-now directive, and half-way through the SVIDs' lives.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sigil_pki::EcKey;
use sigil_proto::workload as w;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{context, status};
use crate::broker::{Broker, RequestContext};
use crate::error::BrokerError;
use crate::hub::{HubEvent, Target};
use crate::issue::{Evidence, JwtAsk, X509Ask};
use crate::model::IdentityRecord;

/// Implements `SpiffeWorkloadAPI`.
#[derive(Debug, Clone)]
pub struct SpiffeApi {
    broker: Arc<Broker>,
}

impl SpiffeApi {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        SpiffeApi { broker }
    }
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The SPIFFE Workload API's security header.
const SECURITY_HEADER: &str = "workload.spiffe.io";

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    let mut values = req.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        (None, _) => Err(Status::invalid_argument(
            "security header missing from request: every Workload API call must carry the metadata workload.spiffe.io: true",
        )),
        (Some(_), Some(_)) => Err(Status::invalid_argument(
            "security header workload.spiffe.io is repeated: send it exactly once, with the value true",
        )),
        (Some(_), None) => Err(Status::invalid_argument(
            "security header workload.spiffe.io must be exactly \"true\" (lower case, no spaces)",
        )),
    }
}

fn td_id(broker: &Broker) -> String {
    format!("spiffe://{}", broker.trust_domain())
}

fn x509_bundle_der(broker: &Broker) -> Vec<u8> {
    let ring = broker.keys().current();
    ring.bundle
        .x509_authorities
        .iter()
        .flat_map(|c| c.as_ref().to_vec())
        .collect()
}

fn jwt_bundle(broker: &Broker) -> Result<Vec<u8>, Status> {
    broker
        .keys()
        .current()
        .bundle
        .jwt_svid_jwks()
        .map(String::into_bytes)
        .map_err(|e| Status::internal(e.to_string()))
}

/// The identities the caller's process matches.
async fn caller_identities(
    broker: &Arc<Broker>,
    ctx: &RequestContext,
) -> Result<Vec<Arc<IdentityRecord>>, Status> {
    let Some(peer) = ctx.unix else {
        return Err(Status::permission_denied(
            "the Workload API is served only on the Unix socket",
        ));
    };
    let b = broker.clone();
    let info = tokio::task::spawn_blocking(move || b.unix_hashes.inspect(&peer))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|r| Status::permission_denied(format!("no identity issued: {}", r.message)))?;
    let ids = broker.registry().matching(&info.selectors());
    if ids.is_empty() {
        let why = match &info.binary_unreadable {
            Some(w) => format!("; {w}, {}", crate::attest::unix::UNREADABLE_HINT),
            None => String::new(),
        };
        return Err(Status::permission_denied(format!(
            "no identity issued: this process (uid {}, {}) matches no identity{why}",
            info.uid,
            info.path.as_deref().unwrap_or("binary unreadable")
        )));
    }
    Ok(ids)
}

/// One round of X.509-SVIDs for the caller, and the serials in it.
async fn mint_x509(
    broker: &Arc<Broker>,
    ctx: &RequestContext,
) -> Result<(w::X509svidResponse, BTreeSet<String>, BTreeSet<String>, i64), Status> {
    let ids = caller_identities(broker, ctx).await?;
    let bundle = x509_bundle_der(broker);
    let mut svids = Vec::new();
    let mut serials = BTreeSet::new();
    let mut spiffe_ids = BTreeSet::new();
    let mut earliest_renew = i64::MAX;
    let mut first_error = None;
    for id in ids {
        let key = EcKey::generate().map_err(|e| Status::internal(e.to_string()))?;
        let csr = sigil_pki::csr::request_for(&key).map_err(|e| Status::internal(e.to_string()))?;
        let ask = X509Ask {
            csr_der: csr,
            ttl: None,
            dns_names: id.entitlements.dns_names.iter().cloned().collect(),
        };
        match broker
            .attest_as(
                &Evidence::Unix,
                Some(id.spiffe_id.as_str()),
                Some(ask),
                Vec::new(),
                ctx,
            )
            .await
        {
            Ok((Some(x), _)) => {
                let now = broker.clock().unix();
                earliest_renew = earliest_renew.min(now + (x.expires_at - now) / 2);
                serials.insert(x.serial.clone());
                spiffe_ids.insert(x.spiffe_id.to_string());
                let key_der = key
                    .to_pkcs8()
                    .map_err(|e| Status::internal(e.to_string()))?;
                svids.push(w::X509svid {
                    spiffe_id: x.spiffe_id.to_string(),
                    x509_svid: x.chain.iter().flat_map(|c| c.as_ref().to_vec()).collect(),
                    x509_svid_key: key_der.expose_secret().to_vec(),
                    bundle: bundle.clone(),
                    hint: id.labels.get("hint").cloned().unwrap_or_default(),
                });
            }
            Ok((None, _)) => {}
            Err(e) => {
                tracing::info!(spiffe_id = %id.spiffe_id, error = %e, "Workload API: not minted");
                first_error.get_or_insert(e);
            }
        }
    }
    if svids.is_empty() {
        let e = first_error
            .unwrap_or_else(|| BrokerError::Unauthenticated("no identity issued".into()));
        return Err(match e {
            BrokerError::Unavailable(_) => status(e, ctx),
            other => Status::permission_denied(format!("no identity issued: {other}")),
        });
    }
    Ok((
        w::X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles: HashMap::new(),
        },
        serials,
        spiffe_ids,
        earliest_renew,
    ))
}

/// Does `ev` call for a new round for a stream holding `serials` of `spiffe_ids`?
fn touches(ev: &HubEvent, serials: &BTreeSet<String>, spiffe_ids: &BTreeSet<String>) -> bool {
    match ev {
        HubEvent::Bundle | HubEvent::KeysRevoked(_) => true,
        HubEvent::Revoked(rs) => rs
            .iter()
            .any(|r| serials.contains(&r.credential_id) || spiffe_ids.contains(&r.spiffe_id)),
        HubEvent::Floors(fs) => fs.iter().any(|(s, _)| spiffe_ids.contains(s)),
        HubEvent::RenewNow { target, .. } => match target {
            Target::All => true,
            Target::Serial(s) => serials.contains(s),
            Target::SpiffeId(s) => spiffe_ids.contains(s),
        },
        HubEvent::Expired(_) => false,
    }
}

/// Waits until `deadline` (Unix seconds on the broker clock, polled so a test clock works),
/// an event that `wake` accepts, the client going away, or shutdown. `false`: stop.
async fn wait_for_change<T>(
    broker: &Broker,
    rx: &mut tokio::sync::broadcast::Receiver<Arc<crate::hub::Sequenced>>,
    tx: &mpsc::Sender<T>,
    deadline: i64,
    wake: impl Fn(&HubEvent) -> bool,
) -> bool {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = broker.shutdown_token().cancelled() => return false,
            _ = tx.closed() => return false,
            _ = tick.tick() => {
                if broker.clock().unix() >= deadline {
                    return true;
                }
            }
            ev = rx.recv() => match ev {
                Ok(ev) if wake(&ev.event) => return true,
                Ok(_) => {}
                // Missed events: refresh to be safe.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return true,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            },
        }
    }
}

/// A bundle stream: `message` at once, then again whenever the bundle changes (a rotation or
/// a revoked key), until the caller goes away or the broker stops.
fn bundle_stream<T: Send + 'static>(
    broker: Arc<Broker>,
    message: impl Fn(&Broker) -> Result<T, Status> + Send + 'static,
) -> Response<Out<T>> {
    let (mut rx, _) = broker.hub().subscribe(0);
    let (tx, out) = mpsc::channel(2);
    tokio::spawn(async move {
        loop {
            if tx.send(message(&broker)).await.is_err() {
                return;
            }
            if !wait_for_change(&broker, &mut rx, &tx, i64::MAX, |ev| {
                matches!(ev, HubEvent::Bundle | HubEvent::KeysRevoked(_))
            })
            .await
            {
                return;
            }
        }
    });
    Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)))
}

#[tonic::async_trait]
impl w::spiffe_workload_api_server::SpiffeWorkloadApi for SpiffeApi {
    type FetchX509SVIDStream = Out<w::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<w::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        let ctx = context(&req);
        let broker = self.broker.clone();
        let (mut rx, _) = broker.hub().subscribe(0);
        // The first message now, so a caller without an identity hears so at once.
        let first = mint_x509(&broker, &ctx).await?;
        let (tx, out) = mpsc::channel(2);
        tokio::spawn(async move {
            let (mut resp, mut serials, mut ids, mut renew) = first;
            loop {
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
                if !wait_for_change(&broker, &mut rx, &tx, renew, |ev| {
                    touches(ev, &serials, &ids)
                })
                .await
                {
                    return;
                }
                match mint_x509(&broker, &ctx).await {
                    Ok(next) => (resp, serials, ids, renew) = next,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    type FetchX509BundlesStream = Out<w::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<w::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        let ctx = context(&req);
        caller_identities(&self.broker, &ctx).await?;
        Ok(bundle_stream(self.broker.clone(), |broker| {
            Ok(w::X509BundlesResponse {
                crl: Vec::new(),
                bundles: HashMap::from([(td_id(broker), x509_bundle_der(broker))]),
            })
        }))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<w::JwtsvidRequest>,
    ) -> Result<Response<w::JwtsvidResponse>, Status> {
        check_header(&req)?;
        let ctx = context(&req);
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let mut ids = caller_identities(&self.broker, &ctx).await?;
        if !r.spiffe_id.is_empty() {
            ids.retain(|i| i.spiffe_id.as_str() == r.spiffe_id);
            if ids.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity issued: this process is not {}",
                    r.spiffe_id
                )));
            }
        }
        let mut svids = Vec::new();
        let mut first_error = None;
        for id in ids {
            let ask = JwtAsk {
                audiences: r.audience.clone(),
                scopes: Vec::new(),
                ttl: None,
            };
            match self
                .broker
                .attest_as(
                    &Evidence::Unix,
                    Some(id.spiffe_id.as_str()),
                    None,
                    vec![ask],
                    &ctx,
                )
                .await
            {
                Ok((_, jwts)) => {
                    for j in jwts {
                        svids.push(w::Jwtsvid {
                            spiffe_id: j.spiffe_id.to_string(),
                            svid: j.token.expose_secret().to_owned(),
                            hint: id.labels.get("hint").cloned().unwrap_or_default(),
                        });
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if svids.is_empty() {
            return Err(match first_error {
                Some(BrokerError::Unavailable(m)) => Status::unavailable(m),
                Some(e) => Status::permission_denied(format!("no identity issued: {e}")),
                None => Status::permission_denied("no identity issued"),
            });
        }
        Ok(Response::new(w::JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = Out<w::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<w::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        let ctx = context(&req);
        caller_identities(&self.broker, &ctx).await?;
        Ok(bundle_stream(self.broker.clone(), |broker| {
            jwt_bundle(broker).map(|jwks| w::JwtBundlesResponse {
                bundles: HashMap::from([(td_id(broker), jwks)]),
            })
        }))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<w::ValidateJwtsvidRequest>,
    ) -> Result<Response<w::ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let i = self.broker.introspect_token(&r.svid);
        if !i.active {
            return Err(Status::invalid_argument(format!(
                "the JWT-SVID is not valid: {}",
                i.reason
            )));
        }
        if !i.aud.contains(&r.audience) {
            return Err(Status::invalid_argument(format!(
                "the JWT-SVID is not valid: its audience {:?} does not include {:?}",
                i.aud, r.audience
            )));
        }
        let claims = sigil_pki::jwt::peek_unverified(&r.svid)
            .map(|(_, c)| c)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(w::ValidateJwtsvidResponse {
            spiffe_id: i.sub,
            claims: Some(to_struct(claims)),
        }))
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    prost_types::Value {
        kind: Some(match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.into_iter().map(to_value).collect(),
            }),
            serde_json::Value::Object(m) => Kind::StructValue(to_struct(m)),
        }),
    }
}

fn to_struct(m: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}
