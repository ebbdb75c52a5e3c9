//! Rate limits: token buckets (GCRA, the `governor` crate) per source address for callers
//! that present no credential, per identity for those that do, and per source address on the
//! HTTP listener. A refused call is `ResourceExhausted` (gRPC) or 429 (HTTP) with a retry
//! hint (`sigil-retry-after-ms`, `Retry-After`), and counted in `sigil_rate_limited_total`.
//!
//! Beside the buckets, a client may have at most `limits.max_streams_per_client` calls in
//! flight at once across all its connections and listeners ([`StreamBudget`]): a unary call
//! holds a slot until it is answered, a stream until it ends.
//!
//! Health checks are never limited (load balancers and probes must see the truth), and the
//! buckets of callers gone quiet are dropped on the housekeeping tick, so memory follows the
//! number of recent callers.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::Limits;

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// Which bucket a caller draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// No credential: keyed by source address.
    Unauthenticated,
    /// A client certificate (keyed by its SPIFFE ID) or a process on the Unix socket (by uid).
    Authenticated,
    /// The HTTP listener, keyed by source address.
    Http,
}

impl Class {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Unauthenticated => "unauthenticated",
            Class::Authenticated => "authenticated",
            Class::Http => "http",
        }
    }
}

/// The broker's buckets.
#[derive(Debug)]
pub struct RateLimits {
    unauthenticated: Option<Keyed>,
    authenticated: Option<Keyed>,
    http: Option<Keyed>,
    clock: DefaultClock,
    streams: Option<Arc<StreamBudget>>,
}

/// Calls in flight per client, across every connection and listener.
#[derive(Debug)]
pub struct StreamBudget {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One call in flight; its slot is freed when this is dropped (the call answered, the stream
/// ended or the client went away).
#[derive(Debug)]
pub struct StreamSlot {
    budget: Arc<StreamBudget>,
    client: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.budget.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

impl StreamBudget {
    /// At most `max` calls in flight per client.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(StreamBudget {
            max: max.max(1),
            open: Mutex::default(),
        })
    }

    /// A slot for one more call of `client`, or `None` when it already has `max` in flight.
    pub fn admit(self: &Arc<Self>, client: &str) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(client.to_owned()).or_default();
        if *n >= self.max {
            drop(open);
            metrics::counter!("sigil_rate_limited_total", "class" => "streams").increment(1);
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            budget: self.clone(),
            client: client.to_owned(),
        })
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }
}

fn bucket(per_second: u32, burst: u32) -> Option<Keyed> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
    Some(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

impl RateLimits {
    /// Buckets as `[limits]` says (a rate of 0 turns that class off).
    pub fn new(l: &Limits) -> Self {
        RateLimits {
            unauthenticated: bucket(l.unauthenticated_per_second, l.unauthenticated_burst),
            authenticated: bucket(l.authenticated_per_second, l.authenticated_burst),
            http: bucket(l.http_per_second, l.http_burst),
            clock: DefaultClock::default(),
            streams: (l.max_streams_per_client > 0)
                .then(|| StreamBudget::new(l.max_streams_per_client)),
        }
    }

    /// The per-client budget of calls in flight (`None`: turned off).
    pub fn streams(&self) -> Option<&Arc<StreamBudget>> {
        self.streams.as_ref()
    }

    /// Takes one token for `key` of `class`: `Err(wait)` when the bucket is empty, with how
    /// long until it has one again.
    pub fn check(&self, class: Class, key: &str) -> Result<(), Duration> {
        let lim = match class {
            Class::Unauthenticated => &self.unauthenticated,
            Class::Authenticated => &self.authenticated,
            Class::Http => &self.http,
        };
        let Some(lim) = lim else { return Ok(()) };
        match lim.check_key(&key.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                metrics::counter!("sigil_rate_limited_total", "class" => class.as_str())
                    .increment(1);
                Err(not_until.wait_time_from(self.clock.now()))
            }
        }
    }

    /// Drops the buckets of callers that have been quiet long enough to be full again.
    pub fn prune(&self) {
        for l in [&self.unauthenticated, &self.authenticated, &self.http]
            .into_iter()
            .flatten()
        {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// The retry hint of a refused call, in whole milliseconds (at least 1).
pub fn retry_ms(wait: Duration) -> u64 {
    (wait.as_millis() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_in_flight_are_capped_per_client_and_freed_when_they_end() {
        let b = StreamBudget::new(2);
        let one = b.admit("spiffe://example.org/a").unwrap();
        let _two = b.admit("spiffe://example.org/a").unwrap();
        assert!(
            b.admit("spiffe://example.org/a").is_none(),
            "a third is refused"
        );
        assert!(b.admit("uid:1000").is_some(), "another client has its own");
        drop(one);
        assert!(
            b.admit("spiffe://example.org/a").is_some(),
            "an ended call frees its slot"
        );
        assert!(
            b.open.lock().unwrap().get("uid:1000").is_none(),
            "idle clients cost nothing"
        );
    }

    #[test]
    fn a_burst_above_the_limit_is_refused_per_key_with_a_retry_hint() {
        let l = Limits {
            unauthenticated_per_second: 5,
            unauthenticated_burst: 10,
            ..Limits::default()
        };
        let r = RateLimits::new(&l);
        for _ in 0..10 {
            r.check(Class::Unauthenticated, "10.0.0.1").unwrap();
        }
        let wait = r.check(Class::Unauthenticated, "10.0.0.1").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        assert!(
            r.check(Class::Unauthenticated, "10.0.0.2").is_ok(),
            "another source has its own bucket"
        );
        // A rate of 0 turns a class off.
        let off = RateLimits::new(&Limits {
            http_per_second: 0,
            ..Limits::default()
        });
        for _ in 0..10_000 {
            off.check(Class::Http, "x").unwrap();
        }
        r.prune();
    }
}
