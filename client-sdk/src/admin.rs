//! The operator client used by the `sigil` CLI: the generated `Admin` client over mutual TLS
//! with an operator credential.

use std::time::Duration;

use sigil_proto::v1::admin_client::AdminClient;

use crate::SdkError;
use crate::failover::{Failover, Targets};
use crate::transport::{self, ClientCertSlot};

/// Connects to the admin API with an operator certificate and key (PEM). `broker_url` may
/// name several replicas, separated by commas: calls move on when one is gone or unavailable.
pub fn connect_admin(
    broker_url: &str,
    trust_bundle_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<AdminClient<Failover>, SdkError> {
    Ok(AdminClient::new(admin_channel(
        broker_url,
        trust_bundle_pem,
        cert_pem,
        key_pem,
    )?))
}

/// The channel [`connect_admin`] uses, for other services on the same connection (health,
/// reflection).
pub fn admin_channel(
    broker_url: &str,
    trust_bundle_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Failover, SdkError> {
    let targets = std::sync::Arc::new(Targets::parse(broker_url)?);
    let roots = transport::roots_from_pem(trust_bundle_pem)?;
    let chain = sigil_pki::certs_from_pem(cert_pem)
        .map_err(|e| SdkError::fatal(format!("operator certificate: {e}")))?;
    let key = sigil_pki::EcKey::from_pkcs8_pem(
        std::str::from_utf8(key_pem)
            .map_err(|_| SdkError::fatal("operator key is not PEM text"))?,
    )
    .map_err(|e| SdkError::fatal(format!("operator key: {e}")))?;
    let slot = std::sync::Arc::new(ClientCertSlot::default());
    let pkcs8 = key.to_pkcs8().map_err(|e| SdkError::fatal(e.to_string()))?;
    slot.set(chain, pkcs8.expose_secret())?;
    let tls = transport::client_config(roots, Some(slot))?;
    Failover::new(targets, tls, Duration::from_secs(30))
}
