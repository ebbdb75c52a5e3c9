//! The SDK's clock: what time it is for renewal schedules, expiry, and every certificate and
//! token check the SDK makes (its rustls configs read it through [`TimeProvider`]).
//!
//! Production code uses [`SystemClock`]. Tests inject a [`ManualClock`] — shared with an
//! in-process broker — and move time by hand, so renewal, expiry and rotation are tested
//! without waiting on the machine's clock.
//!
//! [`TimeProvider`]: rustls::time_provider::TimeProvider

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::UnixTime;

/// A future that resolves when a clock reaches a time.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Where the SDK reads the time, and how it waits for a time to come.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now.
    fn now(&self) -> SystemTime;

    /// Resolves once this clock reads `at` or later.
    fn sleep_until(&self, at: SystemTime) -> Sleep;

    /// Now, in whole seconds since the Unix epoch (0 before it).
    fn unix(&self) -> i64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// The operating system's clock; waits with tokio timers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, at: SystemTime) -> Sleep {
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when told to, waking whoever waits on it. For tests.
#[derive(Debug)]
pub struct ManualClock {
    now: tokio::sync::watch::Sender<SystemTime>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: SystemTime) -> Self {
        ManualClock {
            now: tokio::sync::watch::channel(start).0,
        }
    }

    /// Moves the clock forward by `by`, waking every sleep that is due.
    pub fn advance(&self, by: Duration) {
        self.now.send_modify(|t| *t += by);
    }

    /// Moves the clock to `to` if that is later than now.
    pub fn advance_to(&self, to: SystemTime) {
        self.now.send_if_modified(|t| {
            let later = to > *t;
            if later {
                *t = to;
            }
            later
        });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.borrow()
    }

    fn sleep_until(&self, at: SystemTime) -> Sleep {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            // Ends only when the clock gets there; a dropped clock never does.
            if rx.wait_for(|t| *t >= at).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// `t` as the certificate checks' time (the epoch if `t` is before it).
pub(crate) fn unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// `clock`'s time for rustls, so certificate validity in every handshake the SDK makes is
/// judged by the same clock as its schedules.
#[derive(Debug)]
pub(crate) struct ClockTime(pub(crate) Arc<dyn Clock>);

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(unix_time(self.0.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_only_when_moved_past_their_time() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = Arc::new(ManualClock::new(start));
        let mut sleep = clock.sleep_until(start + Duration::from_secs(5));
        let poll_once = |s: &mut Sleep| {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            s.as_mut().poll(&mut cx).is_ready()
        };
        assert!(!poll_once(&mut sleep));
        clock.advance(Duration::from_secs(4));
        assert!(!poll_once(&mut sleep), "not yet: 4 of 5 s");
        clock.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(1), sleep)
            .await
            .expect("due once the clock reaches it");
        assert_eq!(clock.unix(), 1_005);
        clock.advance_to(start);
        assert_eq!(clock.unix(), 1_005, "never backwards");
        let past = clock.sleep_until(start);
        tokio::time::timeout(Duration::from_secs(1), past)
            .await
            .expect("a time already passed is due at once");
    }
}
