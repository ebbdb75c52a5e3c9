//! [`Source`]: credentials that keep themselves current.
//!
//! A background task renews the X.509-SVID and every cached JWT-SVID at a share of their
//! lifetime (½ by default) with jitter, clamped to [min, max]. A failure never throws away a
//! credential that is still valid: it is retried with capped exponential backoff and jitter.
//! When the broker refuses the current certificate (expired, revoked, identity compromised) the
//! source attests again with the evidence its [`EvidenceSource`] still has. A second task
//! follows the broker's watch stream: bundle changes, revocations, and renew-now directives.
//!
//! The current SVID is published through a `tokio::sync::watch` channel and an atomic
//! certificate resolver used by [`Source::server_config`] / [`Source::client_config`]. Events
//! go out on a broadcast channel. [`Source::shutdown`] is idempotent; dropping the source stops
//! its tasks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::evidence::EvidenceSource;
use crate::tls::{Authorizer, SvidResolver};
use crate::watch::{Hooks, backoff, jitter};
use crate::{
    ErrorKind, JwtRequest, JwtSvid, SdkError, SvidOptions, TrustBundle, Verifier, WorkloadClient,
    X509Svid,
};

/// Renewal settings.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Renew at this share of the lifetime.
    pub renew_share: f64,
    /// Spread renewals by up to this share of the renewal time, either way.
    pub jitter: f64,
    /// Never renew sooner than this after the last renewal.
    pub min_interval: Duration,
    /// Never wait longer than this between renewals.
    pub max_interval: Duration,
    /// First retry delay after a failure.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// What to ask for when renewing the X.509-SVID.
    pub svid: SvidOptions,
    /// Follow the broker's watch stream (revocations, rotations, directives).
    pub watch: bool,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            renew_share: 0.5,
            jitter: 0.1,
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(3600),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            svid: SvidOptions::default(),
            watch: true,
        }
    }
}

/// Something that happened to the source's credentials.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SourceEvent {
    /// The X.509-SVID was renewed.
    Renewed {
        /// New serial.
        serial: String,
        /// New expiry.
        expires_at: i64,
    },
    /// The workload attested again with fresh evidence (or, on the broker's Unix socket where
    /// every call is attested afresh, a renewal returned a new identity generation): earlier
    /// credentials are revoked and cached JWT-SVIDs are fetched again.
    Reattested {
        /// New serial.
        serial: String,
    },
    /// A renewal failed; the current credential stays in use while valid.
    RenewalFailed {
        /// Why.
        error: SdkError,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// The broker says this workload's credentials (or a key that signed them) were revoked.
    Revoked {
        /// Why.
        reason: String,
    },
    /// The trust bundle changed.
    BundleChanged {
        /// Its sequence number.
        sequence: u64,
    },
    /// A cached JWT-SVID was renewed.
    JwtRenewed {
        /// Its audiences.
        audiences: Vec<String>,
    },
    /// The X.509-SVID expired without a replacement.
    Expired {
        /// When.
        at: i64,
    },
}

#[derive(Debug, Clone)]
struct JwtEntry {
    svid: JwtSvid,
    /// Unix seconds of the next refresh attempt.
    next: i64,
    failures: u32,
}

#[derive(Debug)]
struct Shared {
    client: WorkloadClient,
    evidence: Arc<dyn EvidenceSource>,
    cfg: SourceConfig,
    events: broadcast::Sender<SourceEvent>,
    svid: watch::Sender<Option<Arc<X509Svid>>>,
    resolver: Arc<SvidResolver>,
    jwts: Mutex<HashMap<JwtRequest, JwtEntry>>,
    renew_now: Arc<Notify>,
    /// Wakes the loop to recompute when to act (a JWT-SVID was cached), without renewing.
    reschedule: Notify,
    last_error: Mutex<Option<SdkError>>,
}

impl Shared {
    fn clock(&self) -> &Arc<dyn Clock> {
        self.client.trust().clock()
    }
}

/// Self-renewing credentials of one workload.
#[derive(Debug)]
pub struct Source {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Seconds from `now` until a credential valid over [`not_before`, `not_after`] should be
/// renewed: `share` of its lifetime, moved by `jitter_frac` (−1..1) × `jitter` of that, clamped
/// to [`min`, `max`] and to before it expires.
pub fn renew_delay(
    now: i64,
    not_before: i64,
    not_after: i64,
    cfg: &SourceConfig,
    jitter_frac: f64,
) -> Duration {
    let lifetime = (not_after - not_before).max(0) as f64;
    let target = not_before as f64 + lifetime * cfg.renew_share * (1.0 + cfg.jitter * jitter_frac);
    let delay = Duration::from_secs_f64((target - now as f64).max(0.0));
    let remaining = Duration::from_secs((not_after - now).max(0) as u64);
    delay
        .clamp(cfg.min_interval.min(remaining / 2), cfg.max_interval)
        .min(remaining.saturating_sub(Duration::from_secs(1)))
}

impl Source {
    /// Starts keeping `client`'s credentials current. Attests first with `evidence` unless the
    /// client already holds an SVID.
    pub async fn start(
        client: WorkloadClient,
        evidence: Arc<dyn EvidenceSource>,
        cfg: SourceConfig,
    ) -> Result<Source, SdkError> {
        let svid = match client.x509_svid() {
            Some(s) => s,
            None => {
                client
                    .attest(evidence.evidence().await?, cfg.svid.clone(), &[])
                    .await?
                    .svid
            }
        };
        let resolver = Arc::new(SvidResolver::with_clock(client.trust().clock().clone()));
        resolver.set(&svid)?;
        let (events, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            client,
            evidence,
            cfg,
            events,
            svid: watch::channel(Some(svid)).0,
            resolver,
            jwts: Mutex::new(HashMap::new()),
            renew_now: Arc::new(Notify::new()),
            reschedule: Notify::new(),
            last_error: Mutex::new(None),
        });
        let cancel = CancellationToken::new();
        let mut tasks = vec![tokio::spawn(renew_loop(shared.clone(), cancel.clone()))];
        if shared.cfg.watch {
            let hooks = Hooks {
                renew_now: shared.renew_now.clone(),
                events: shared.events.clone(),
            };
            tasks.push(tokio::spawn(crate::watch::run(
                shared.client.clone(),
                hooks,
                shared.svid.subscribe(),
                cancel.clone(),
            )));
        }
        Ok(Source {
            shared,
            cancel,
            tasks: Mutex::new(tasks),
        })
    }

    /// The current X.509-SVID, or why there is none valid: it expired and could not be
    /// renewed (the last error says why).
    pub fn x509_svid(&self) -> Result<Arc<X509Svid>, SdkError> {
        let svid = self
            .shared
            .svid
            .borrow()
            .clone()
            .ok_or_else(|| SdkError::new(ErrorKind::Reattest, "no X.509-SVID"))?;
        if svid.expires_at <= self.shared.clock().unix() {
            let last = self.shared.last_error.lock().ok().and_then(|e| e.clone());
            let why = last
                .map(|e| format!("; the last renewal attempt failed: {e}"))
                .unwrap_or_default();
            return Err(SdkError::new(
                ErrorKind::Retryable,
                format!(
                    "the X.509-SVID expired at {} and has not been renewed{why}",
                    svid.expires_at
                ),
            ));
        }
        Ok(svid)
    }

    /// Ticks with every new X.509-SVID.
    pub fn updates(&self) -> watch::Receiver<Option<Arc<X509Svid>>> {
        self.shared.svid.subscribe()
    }

    /// Renewals, failures, revocations, bundle changes.
    pub fn events(&self) -> broadcast::Receiver<SourceEvent> {
        self.shared.events.subscribe()
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.shared.client.bundle()
    }

    /// The client underneath.
    pub fn client(&self) -> &WorkloadClient {
        &self.shared.client
    }

    /// A JWT-SVID for `req`: the cached one while it is fresh, else a new one (which is then
    /// kept fresh in the background). If the broker cannot be reached, a cached token that is
    /// still valid is returned.
    pub async fn jwt_svid(&self, req: &JwtRequest) -> Result<JwtSvid, SdkError> {
        let now = self.shared.clock().unix();
        let cached = self
            .shared
            .jwts
            .lock()
            .ok()
            .and_then(|m| m.get(req).cloned());
        if let Some(e) = &cached
            && now < e.next
            && e.svid.expires_at > now
        {
            return Ok(e.svid.clone());
        }
        match self.shared.client.fetch_jwt_svid(req).await {
            Ok(svid) => {
                let next = now
                    + renew_delay(
                        now,
                        svid.issued_at,
                        svid.expires_at,
                        &self.shared.cfg,
                        jitter() * 2.0 - 1.0,
                    )
                    .as_secs() as i64;
                if let Ok(mut m) = self.shared.jwts.lock() {
                    m.insert(
                        req.clone(),
                        JwtEntry {
                            svid: svid.clone(),
                            next,
                            failures: 0,
                        },
                    );
                }
                // Only so the loop refreshes this token in time: fetching a JWT-SVID must not
                // renew the certificate.
                self.shared.reschedule.notify_one();
                Ok(svid)
            }
            Err(e) => match cached {
                Some(c) if c.svid.expires_at > now + 1 && e.kind() == ErrorKind::Retryable => {
                    Ok(c.svid)
                }
                _ => Err(e),
            },
        }
    }

    /// A rustls server config that presents the current SVID and requires client SVIDs that
    /// `authorizer` accepts, checked against the current bundle and revocations.
    pub fn server_config(
        &self,
        authorizer: Authorizer,
    ) -> Result<Arc<rustls::ServerConfig>, SdkError> {
        crate::tls::server_config(
            self.shared.client.trust().clone(),
            self.shared.resolver.clone(),
            authorizer,
        )
    }

    /// A rustls client config that presents the current SVID and accepts servers that
    /// `authorizer` accepts.
    pub fn client_config(
        &self,
        authorizer: Authorizer,
    ) -> Result<Arc<rustls::ClientConfig>, SdkError> {
        crate::tls::client_config(
            self.shared.client.trust().clone(),
            self.shared.resolver.clone(),
            authorizer,
        )
    }

    /// A verifier that follows this source's trust state.
    pub fn verifier(&self) -> Verifier {
        Verifier::new(self.shared.client.trust().clone())
    }

    /// Renews now instead of waiting for the schedule.
    pub fn renew_now(&self) {
        self.shared.renew_now.notify_one();
    }

    /// Stops the background tasks and waits for them. Safe to call more than once.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in tasks {
            let _ = t.await;
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn publish(shared: &Shared, svid: Arc<X509Svid>) {
    if let Err(e) = shared.resolver.set(&svid) {
        tracing::error!(error = %e, "could not install the renewed SVID in TLS configs");
        return;
    }
    shared.svid.send_replace(Some(svid));
    if let Ok(mut e) = shared.last_error.lock() {
        e.take();
    }
}

async fn renew_x509(shared: &Shared) -> Result<(), SdkError> {
    // An expired certificate cannot prove anything over mTLS: go straight to fresh evidence.
    let (expired, generation) = shared.svid.borrow().as_ref().map_or((false, 0), |s| {
        (s.expires_at <= shared.clock().unix(), s.generation)
    });
    let renewed = if expired {
        Err(SdkError::new(ErrorKind::Reattest, "the X.509-SVID expired"))
    } else {
        shared.client.renew_x509_svid().await
    };
    match renewed {
        Ok(svid) if svid.generation > generation => {
            // Over the Unix socket the kernel re-attests every call, so a renewal after the
            // identity was revoked already carries the new generation.
            let event = SourceEvent::Reattested {
                serial: svid.serial.clone(),
            };
            refetch_jwts(shared);
            publish(shared, svid);
            let _ = shared.events.send(event);
            Ok(())
        }
        Ok(svid) => {
            let event = SourceEvent::Renewed {
                serial: svid.serial.clone(),
                expires_at: svid.expires_at,
            };
            // Publish first: whoever reacts to the event must see the new SVID.
            publish(shared, svid);
            let _ = shared.events.send(event);
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::Reattest => {
            tracing::info!(error = %e, "the broker refused renewal; attesting again");
            let evidence = shared.evidence.evidence().await?;
            let creds = shared
                .client
                .attest(evidence, shared.cfg.svid.clone(), &[])
                .await?;
            let event = SourceEvent::Reattested {
                serial: creds.svid.serial.clone(),
            };
            refetch_jwts(shared);
            publish(shared, creds.svid);
            let _ = shared.events.send(event);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Cached JWT-SVIDs belong to the old generation, which is revoked: never serve them again
/// (not even as a fallback while the broker is unreachable) and fetch new ones at once. Done
/// before the new SVID is published, so whoever reacts to the event gets a fresh token.
fn refetch_jwts(shared: &Shared) {
    if let Ok(mut m) = shared.jwts.lock() {
        for e in m.values_mut() {
            e.next = 0;
            e.svid.expires_at = 0;
        }
    }
}

async fn refresh_jwts(shared: &Shared, now: i64) -> Option<i64> {
    let due: Vec<JwtRequest> = shared
        .jwts
        .lock()
        .map(|m| {
            m.iter()
                .filter(|(_, e)| e.next <= now)
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    for req in due {
        match shared.client.fetch_jwt_svid(&req).await {
            Ok(svid) => {
                let next = now
                    + renew_delay(
                        now,
                        svid.issued_at,
                        svid.expires_at,
                        &shared.cfg,
                        jitter() * 2.0 - 1.0,
                    )
                    .as_secs() as i64;
                if let Ok(mut m) = shared.jwts.lock() {
                    m.insert(
                        req.clone(),
                        JwtEntry {
                            svid,
                            next,
                            failures: 0,
                        },
                    );
                }
                let _ = shared.events.send(SourceEvent::JwtRenewed {
                    audiences: req.audiences.clone(),
                });
            }
            Err(e) => {
                if let Ok(mut m) = shared.jwts.lock()
                    && let Some(entry) = m.get_mut(&req)
                {
                    entry.failures += 1;
                    let wait = backoff(
                        entry.failures,
                        shared.cfg.backoff_initial,
                        shared.cfg.backoff_max,
                    );
                    entry.next = now + wait.as_secs().max(1) as i64;
                    // An expired token that cannot be renewed is dropped; a valid one stays.
                    if entry.svid.expires_at <= now {
                        m.remove(&req);
                    }
                }
                tracing::debug!(error = %e, "JWT-SVID refresh failed; keeping the cached one while valid");
            }
        }
    }
    shared
        .jwts
        .lock()
        .ok()
        .and_then(|m| m.values().map(|e| e.next).min())
}

/// When a certificate was issued: its expiry less the granted lifetime (`ttl_seconds`), or
/// `not_before` if the grant is unknown.
fn issued_at(not_before: i64, expires_at: i64, ttl_seconds: u32) -> i64 {
    match i64::from(ttl_seconds) {
        0 => not_before,
        ttl => (expires_at - ttl).max(not_before),
    }
}

/// When the current X.509-SVID is due for renewal, on the source's clock.
fn x509_deadline(shared: &Shared) -> SystemTime {
    let clock = shared.clock();
    let now = clock.unix();
    let wait = match shared.svid.borrow().as_ref() {
        // The lifetime runs from issuance, not from `not_before`: the broker backdates that for
        // clock skew (30 s by default), which would make a short-lived certificate look
        // half-spent the moment it arrives and renew it at every `min_interval`.
        Some(s) => renew_delay(
            now,
            issued_at(s.not_before, s.expires_at, s.grant.ttl_seconds),
            s.expires_at,
            &shared.cfg,
            jitter() * 2.0 - 1.0,
        ),
        None => Duration::ZERO,
    };
    // From the same whole second the delay was computed from, so the renewal lands on its
    // share of the lifetime rather than up to a second after it.
    std::time::UNIX_EPOCH + Duration::from_secs(now.max(0) as u64) + wait
}

async fn renew_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let clock = shared.clock().clone();
    let mut failures = 0u32;
    let mut forced = false;
    let mut expired_reported = false;
    let mut x509_at = x509_deadline(&shared);
    loop {
        let jwt_at = shared
            .jwts
            .lock()
            .ok()
            .and_then(|m| m.values().map(|e| e.next).min())
            .map(|t| std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64));
        let wake = if forced {
            clock.now()
        } else {
            jwt_at.map_or(x509_at, |j| j.min(x509_at))
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.renew_now.notified() => forced = true,
            _ = shared.reschedule.notified() => continue,
            _ = clock.sleep_until(wake) => {}
        }
        if forced || clock.now() >= x509_at {
            forced = false;
            match renew_x509(&shared).await {
                Ok(()) => {
                    failures = 0;
                    expired_reported = false;
                    x509_at = x509_deadline(&shared);
                }
                Err(e) => {
                    failures += 1;
                    // Never sooner than the broker asked (a rate limit says when).
                    let retry_in =
                        backoff(failures, shared.cfg.backoff_initial, shared.cfg.backoff_max)
                            .max(e.retry_after().unwrap_or_default());
                    x509_at = clock.now() + retry_in;
                    tracing::warn!(error = %e, ?retry_in, "SVID renewal failed; keeping the current one while it is valid");
                    if let Ok(mut l) = shared.last_error.lock() {
                        *l = Some(e.clone());
                    }
                    let _ = shared
                        .events
                        .send(SourceEvent::RenewalFailed { error: e, retry_in });
                    let expired = shared
                        .svid
                        .borrow()
                        .as_ref()
                        .map(|s| s.expires_at)
                        .filter(|at| *at <= clock.unix());
                    if let (Some(at), false) = (expired, expired_reported) {
                        expired_reported = true;
                        let _ = shared.events.send(SourceEvent::Expired { at });
                    }
                }
            }
        }
        refresh_jwts(&shared, clock.unix()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backdated_short_certificate_is_renewed_at_half_its_granted_life() {
        let short = SourceConfig {
            min_interval: Duration::from_millis(100),
            ..SourceConfig::default()
        };
        // Issued at 1000 for 4 s, notBefore backdated 30 s for clock skew.
        let start = issued_at(970, 1004, 4);
        assert_eq!(start, 1000);
        assert_eq!(
            renew_delay(1000, start, 1004, &short, 0.0),
            Duration::from_secs(2)
        );
        // Measured from notBefore it would look nearly spent already.
        assert!(renew_delay(1000, 970, 1004, &short, 0.0) < Duration::from_secs(1));
        assert_eq!(issued_at(970, 1004, 0), 970, "no grant: notBefore");
        assert_eq!(issued_at(990, 1004, 60), 990, "never before notBefore");
    }

    #[test]
    fn renewal_lands_at_the_configured_share_with_bounded_jitter() {
        let cfg = SourceConfig::default();
        // 1h certificate issued at t=1000: renew around 30 minutes in.
        assert_eq!(
            renew_delay(1000, 1000, 4600, &cfg, 0.0),
            Duration::from_secs(1800)
        );
        let early = renew_delay(1000, 1000, 4600, &cfg, -1.0);
        let late = renew_delay(1000, 1000, 4600, &cfg, 1.0);
        assert_eq!((early.as_secs(), late.as_secs()), (1620, 1980));
        // Past the renewal point: now, but not in a busy loop.
        assert_eq!(
            renew_delay(3000, 1000, 4600, &cfg, 0.0),
            Duration::from_secs(1)
        );
        // Clamped to max.
        let long = renew_delay(0, 0, 30 * 86400, &cfg, 0.0);
        assert_eq!(long, Duration::from_secs(3600));
        // A credential about to expire is renewed before it does.
        assert!(renew_delay(4599, 1000, 4600, &cfg, 0.0) < Duration::from_secs(1));
        // A 4-second SVID renews around 2 s in.
        let short = SourceConfig {
            min_interval: Duration::from_millis(100),
            ..SourceConfig::default()
        };
        assert_eq!(renew_delay(10, 10, 14, &short, 0.0), Duration::from_secs(2));
    }
}
