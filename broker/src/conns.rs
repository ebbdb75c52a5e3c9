//! Connection budgets: every listener caps its open connections in total and per client (a
//! source address, or a uid on the Unix socket), so no caller — and no listener — can use up
//! the process's file descriptors and take the others down. A connection over budget is
//! closed at once after `accept`, and the refusal is logged once per interval, not per attempt.
//!
//! At start the descriptor limit is raised to its hard maximum ([`raise_fd_limit`]) and the
//! budgets are fitted under it with a reserve for the store, logs and outbound connections
//! ([`Budgets`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Limits;

/// Descriptors kept back for everything that is not a client connection (the store, logs,
/// outbound connections): this many, or a quarter of a smaller limit.
pub const RESERVE: u64 = 256;

fn reserve(fd_limit: u64) -> u64 {
    RESERVE.min(fd_limit / 4)
}

/// How often a listener that keeps refusing says so.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's budget.
#[derive(Debug)]
pub struct ConnLimit {
    listener: &'static str,
    max_total: usize,
    max_per_client: usize,
    state: Mutex<State>,
    last_log: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct State {
    open: usize,
    per_client: HashMap<String, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener is full.
    Total,
    /// That client already has its share.
    PerClient,
}

/// An admitted connection; its slot is freed when this is dropped.
#[derive(Debug)]
pub struct ConnGuard {
    limit: Arc<ConnLimit>,
    client: String,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut s = self.limit.state.lock().unwrap_or_else(|p| p.into_inner());
        s.open = s.open.saturating_sub(1);
        if let Some(n) = s.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                s.per_client.remove(&self.client);
            }
        }
        metrics::gauge!("sigil_connections", "listener" => self.limit.listener).set(s.open as f64);
    }
}

impl ConnLimit {
    /// A budget of `max_total` connections, `max_per_client` per client, for `listener`
    /// (`grpc`, `http`, `unix`).
    pub fn new(listener: &'static str, max_total: usize, max_per_client: usize) -> Arc<Self> {
        metrics::gauge!("sigil_connections", "listener" => listener).set(0.0);
        Arc::new(ConnLimit {
            listener,
            max_total: max_total.max(1),
            max_per_client: max_per_client.max(1),
            state: Mutex::default(),
            last_log: Mutex::new(None),
        })
    }

    /// Admits a connection from `client`, or says why not (and logs it, once per interval).
    pub fn admit(self: &Arc<Self>, client: &str) -> Result<ConnGuard, Refused> {
        let refused = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mine = s.per_client.get(client).copied().unwrap_or(0);
            if s.open >= self.max_total {
                Some(Refused::Total)
            } else if mine >= self.max_per_client {
                Some(Refused::PerClient)
            } else {
                s.open += 1;
                *s.per_client.entry(client.to_owned()).or_default() += 1;
                metrics::gauge!("sigil_connections", "listener" => self.listener)
                    .set(s.open as f64);
                None
            }
        };
        match refused {
            None => Ok(ConnGuard {
                limit: self.clone(),
                client: client.to_owned(),
            }),
            Some(why) => {
                let label = if why == Refused::Total {
                    "listener_full"
                } else {
                    "client_full"
                };
                metrics::counter!("sigil_connections_refused_total", "listener" => self.listener, "why" => label)
                    .increment(1);
                self.log_once(|| match why {
                    Refused::Total => format!(
                        "refusing connections on the {} listener: {} are open (limits)",
                        self.listener, self.max_total
                    ),
                    Refused::PerClient => format!(
                        "refusing connections on the {} listener from {client}: it has {} open (limits)",
                        self.listener, self.max_per_client
                    ),
                });
                Err(why)
            }
        }
    }

    /// Logs `msg` unless this listener logged in the last interval.
    pub fn log_once(&self, msg: impl FnOnce() -> String) {
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(listener = self.listener, "{}", msg());
        }
    }
}

/// The connection budgets of the three listeners, fitted under the descriptor limit.
#[derive(Debug, Clone)]
pub struct Budgets {
    /// The gRPC (TLS) listener.
    pub grpc: Arc<ConnLimit>,
    /// The HTTP listener.
    pub http: Arc<ConnLimit>,
    /// The Unix socket.
    pub unix: Arc<ConnLimit>,
}

impl Budgets {
    /// `[limits]`'s caps, scaled down (and logged) when they do not fit `fd_limit` descriptors
    /// with [`RESERVE`] kept back.
    pub fn new(l: &Limits, fd_limit: u64) -> Self {
        let wanted = (l.max_connections + l.max_http_connections + l.max_unix_connections) as u64;
        let room = fd_limit.saturating_sub(reserve(fd_limit)).max(3);
        let fit = |n: usize| -> usize {
            if wanted <= room {
                n
            } else {
                ((n as u64 * room) / wanted).max(1) as usize
            }
        };
        if wanted > room {
            tracing::warn!(
                fd_limit,
                wanted,
                "the connection limits do not fit the file descriptor limit; scaled down (raise `ulimit -n` or lower [limits])"
            );
        }
        Budgets {
            grpc: ConnLimit::new(
                "grpc",
                fit(l.max_connections),
                l.max_connections_per_address,
            ),
            http: ConnLimit::new(
                "http",
                fit(l.max_http_connections),
                l.max_connections_per_address,
            ),
            unix: ConnLimit::new(
                "unix",
                fit(l.max_unix_connections),
                l.max_unix_connections_per_uid,
            ),
        }
    }
}

/// Raises the soft limit on open files to the hard one; returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    let (soft, hard) = (cur.current.unwrap_or(u64::MAX), cur.maximum);
    if let Some(hard) = hard
        && soft < hard
    {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            tracing::info!(from = soft, to = hard, "raised the open file limit");
            return hard;
        }
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_shares_are_enforced_and_freed_on_drop() {
        let l = ConnLimit::new("test", 3, 2);
        let a1 = l.admit("a").unwrap();
        let _a2 = l.admit("a").unwrap();
        assert_eq!(l.admit("a").unwrap_err(), Refused::PerClient);
        let _b1 = l.admit("b").unwrap();
        assert_eq!(l.admit("c").unwrap_err(), Refused::Total);
        drop(a1);
        assert!(l.admit("c").is_ok(), "a closed connection frees its slot");
    }

    #[test]
    fn budgets_fit_under_the_descriptor_limit() {
        let lim = Limits::default();
        let roomy = Budgets::new(&lim, 1 << 20);
        assert_eq!(roomy.grpc.max_total, lim.max_connections);
        let tight = Budgets::new(&lim, 1024);
        let total = tight.grpc.max_total + tight.http.max_total + tight.unix.max_total;
        assert!(total as u64 <= 1024 - RESERVE, "{total}");
        assert!(tight.http.max_total >= 1);
        // A small limit keeps a quarter back, not more than it has.
        let small = Budgets::new(&lim, 256);
        let total = small.grpc.max_total + small.http.max_total + small.unix.max_total;
        assert!((150..=192).contains(&total), "{total}");
    }
}
