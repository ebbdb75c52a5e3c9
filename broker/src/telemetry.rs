//! Metrics and request ids.
//!
//! Metrics go through the `metrics` facade to a Prometheus recorder installed once per process
//! and rendered at `/metrics`. [`RequestLayer`] wraps every gRPC call: it gives the request an
//! id (carried in logs, audit entries and the `sigil-request-id` status metadata) and records
//! its latency by method.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use. `None` when another
/// recorder was installed first (an embedding application's own).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let batch = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("sigil_store_commit_batch_size".into()),
                        &batch,
                    )
                })
                .map(|b| b.build_recorder());
            let recorder = match recorder {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics disabled");
                    return None;
                }
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::info!("another metrics recorder is installed; /metrics will be empty");
                return None;
            }
            describe();
            // Present from the start, at zero, so dashboards and alerts see them at once.
            metrics::gauge!("sigil_watch_streams").set(0.0);
            metrics::gauge!("sigil_live_credentials").set(0.0);
            metrics::gauge!("sigil_revoked_credentials").set(0.0);
            metrics::gauge!(
                "sigil_build_info",
                "version" => env!("CARGO_PKG_VERSION"),
                "commit" => env!("SIGIL_COMMIT")
            )
            .set(1.0);
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "sigil_issuance_total",
        "Credentials issued or refused, by kind, result and deciding gate."
    );
    describe_counter!(
        "sigil_attestation_failures_total",
        "Attestations that failed, by method and reason."
    );
    describe_counter!(
        "sigil_commit_failures_total",
        "Issuances refused because the store could not commit (fail closed)."
    );
    describe_counter!("sigil_revocations_total", "Credentials revoked.");
    describe_counter!(
        "sigil_anomalies_total",
        "Behaviour anomalies detected, by kind."
    );
    describe_counter!(
        "sigil_hub_events_total",
        "Trust changes published to watch streams."
    );
    describe_counter!(
        "sigil_tls_handshake_failures_total",
        "TLS handshakes that failed."
    );
    describe_gauge!(
        "sigil_live_credentials",
        "Credentials issued by this broker that have not expired."
    );
    describe_gauge!(
        "sigil_revoked_credentials",
        "Revoked credentials that have not expired yet."
    );
    describe_gauge!("sigil_watch_streams", "Open watch streams.");
    describe_gauge!("sigil_connections", "Open connections, by listener.");
    describe_counter!(
        "sigil_connections_refused_total",
        "Connections closed at once because a listener's budget was used up, by listener."
    );
    describe_counter!(
        "sigil_silent_connections_closed_total",
        "Connections closed because the peer sent nothing within the handshake timeout."
    );
    describe_counter!(
        "sigil_rate_limited_total",
        "Calls refused by a rate limit, by kind of caller."
    );
    describe_counter!(
        "sigil_baseline_dropped_total",
        "Committed issuances the behaviour baselines could not keep up with."
    );
    describe_counter!(
        "sigil_store_commit_failures_total",
        "Group commits that failed for a storage reason (every change in them refused)."
    );
    describe_counter!(
        "sigil_store_recovery_attempts_total",
        "Attempts to bring the store back after a failed commit."
    );
    describe_counter!(
        "sigil_store_shed_total",
        "Changes refused at once because the store writer's queue was full."
    );
    describe_counter!(
        "sigil_store_behind_total",
        "Times this replica found itself further behind the shared commit log than it keeps."
    );
    describe_gauge!(
        "sigil_schedule_leader",
        "1 when this replica runs the schedules (key rotation, pruning); exactly one replica on a shared database does."
    );
    describe_gauge!(
        "sigil_build_info",
        "Always 1: the version and commit of this broker, as labels."
    );
    describe_counter!(
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds."
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        "Resident memory size in bytes."
    );
    describe_gauge!(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes."
    );
    describe_gauge!("process_open_fds", "Number of open file descriptors.");
    describe_gauge!(
        "process_max_fds",
        "Maximum number of open file descriptors."
    );
    describe_gauge!(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds."
    );
    describe_gauge!("sigil_identities", "Identity records, by status.");
    describe_gauge!(
        "sigil_key_age_seconds",
        "Age of each signing key, by kind and state."
    );
    describe_gauge!(
        "sigil_key_rotation_due_seconds",
        "Seconds until the current key of each kind is due to rotate."
    );
    describe_histogram!(
        "sigil_grpc_request_duration_seconds",
        "gRPC request latency by service, method and status name."
    );
    describe_histogram!(
        "sigil_store_commit_seconds",
        "Duration of one group commit (one transaction, one fsync)."
    );
    describe_histogram!(
        "sigil_store_commit_batch_size",
        "Changes folded into one group commit."
    );
}

/// The id of one request, in its extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Tags each request with a [`RequestId`] and times it.
#[derive(Debug, Clone, Default)]
pub struct RequestLayer;

impl<S> tower::Layer<S> for RequestLayer {
    type Service = RequestService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestService { inner }
    }
}

/// See [`RequestLayer`].
#[derive(Debug, Clone)]
pub struct RequestService<S> {
    inner: S,
}

impl<S, B, R> tower::Service<tonic::codegen::http::Request<B>> for RequestService<S>
where
    S: tower::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<R>,
        >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: tonic::codegen::http::Request<B>) -> Self::Future {
        // A caller's own request id is kept if it is short and plain, so its logs and ours join.
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c))
            })
            .map(str::to_owned)
            .unwrap_or_else(|| sigil_pki::ids::to_hex(&sigil_pki::ids::random_bytes::<8>()));
        req.extensions_mut().insert(RequestId(id.clone()));
        // "/sigil.v1.Broker/MintJwtSvid": the service and the method, both as labels.
        let (service, method) = {
            let mut parts = req.uri().path().trim_start_matches('/').splitn(2, '/');
            let service = parts.next().unwrap_or("").to_owned();
            (service, parts.next().unwrap_or("").to_owned())
        };
        let span = tracing::debug_span!("request", request_id = %id, method = %method);
        let started = Instant::now();
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(tracing::Instrument::instrument(
            async move {
                let mut res = fut.await;
                if let Ok(r) = &mut res {
                    oversize_is_resource_exhausted(r.headers_mut());
                    if let Ok(v) = id.parse() {
                        r.headers_mut().insert("sigil-request-id", v);
                    }
                }
                let code = match &res {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or("OK", code_name),
                    Err(_) => "TRANSPORT_ERROR",
                };
                let secs = started.elapsed().as_secs_f64();
                tracing::debug!(code = %code, elapsed_ms = secs * 1000.0, "request finished");
                metrics::histogram!(
                    "sigil_grpc_request_duration_seconds",
                    "grpc_service" => service,
                    "grpc_method" => method,
                    "grpc_code" => code
                )
                .record(secs);
                res
            },
            span,
        ))
    }
}

/// tonic answers a request above the decoding limit with `OutOfRange`; gRPC-core and grpc-go
/// (and the gRPC status code guide) say `ResourceExhausted`, which clients treat as "too
/// big", not as a range error in the request's contents. Rewrites that status, which tonic
/// sends trailers-only (in the response headers), and says which limit applies.
fn oversize_is_resource_exhausted(headers: &mut tonic::codegen::http::HeaderMap) {
    const OUT_OF_RANGE: &[u8] = b"11";
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(OUT_OF_RANGE) {
        return;
    }
    let message = headers
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    let Some(rest) = message.strip_prefix("Error, decoded message length too large: found ") else {
        return;
    };
    let numbers: Vec<&str> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .collect();
    let text = match numbers.as_slice() {
        [found, limit] => format!(
            "the request is {found} bytes; the limit is {limit} bytes (limits.max_request_bytes)"
        ),
        _ => "the request is larger than limits.max_request_bytes".to_owned(),
    };
    headers.insert(
        "grpc-status",
        tonic::codegen::http::HeaderValue::from_static("8"),
    );
    if let Ok(v) = tonic::codegen::http::HeaderValue::from_str(&text.replace(' ', "%20")) {
        headers.insert("grpc-message", v);
    }
}

/// Decodes the `%XX` escapes of a `grpc-message`.
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%'
            && let Some(b) = v
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Credentials live now (issued, unexpired, not revoked, of their identity's current
/// generation), counted per identity by expiry second: cheap to keep, exact enough for a gauge.
#[derive(Debug)]
pub struct LiveCredentials {
    inner: std::sync::Mutex<LiveInner>,
}

#[derive(Debug)]
struct LiveInner {
    /// Identity id -> expiry (Unix seconds) -> how many.
    by_identity: std::collections::HashMap<String, std::collections::BTreeMap<i64, u64>>,
    /// `Some` until seeding finishes: what the observer saw meanwhile, in order.
    pending: Option<Vec<LiveEvent>>,
}

#[derive(Debug)]
enum LiveEvent {
    Add(String, String, i64),
    Revoke(String, i64),
    Clear(String),
}

impl Default for LiveCredentials {
    fn default() -> Self {
        LiveCredentials {
            inner: std::sync::Mutex::new(LiveInner {
                by_identity: Default::default(),
                pending: Some(Vec::new()),
            }),
        }
    }
}

impl LiveInner {
    fn apply(&mut self, e: LiveEvent) {
        match e {
            LiveEvent::Add(identity, _, exp) => {
                *self
                    .by_identity
                    .entry(identity)
                    .or_default()
                    .entry(exp)
                    .or_default() += 1;
            }
            LiveEvent::Revoke(identity, exp) => {
                if let Some(m) = self.by_identity.get_mut(&identity)
                    && let Some(n) = m.get_mut(&exp)
                {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        m.remove(&exp);
                    }
                }
            }
            LiveEvent::Clear(identity) => {
                self.by_identity.remove(&identity);
            }
        }
    }

    fn event(&mut self, e: LiveEvent) {
        match self.pending.as_mut() {
            Some(p) => p.push(e),
            None => self.apply(e),
        }
    }
}

impl LiveCredentials {
    /// Counts one credential of `identity_id` expiring at `expires_at`.
    pub fn add(&self, identity_id: &str, credential_id: &str, expires_at: i64) {
        if let Ok(mut g) = self.inner.lock() {
            g.event(LiveEvent::Add(
                identity_id.to_owned(),
                credential_id.to_owned(),
                expires_at,
            ));
        }
    }

    /// One credential of `identity_id` expiring at `expires_at` was revoked.
    pub fn revoke(&self, identity_id: &str, expires_at: i64) {
        if let Ok(mut g) = self.inner.lock() {
            g.event(LiveEvent::Revoke(identity_id.to_owned(), expires_at));
        }
    }

    /// Every credential `identity_id` holds so far was revoked (a generation bump).
    pub fn clear(&self, identity_id: &str) {
        if let Ok(mut g) = self.inner.lock() {
            g.event(LiveEvent::Clear(identity_id.to_owned()));
        }
    }

    /// Ends seeding with what the ledger scan found live (identity, credential id, expiry),
    /// then replays what the observer saw meanwhile (a credential both saw counts once).
    pub fn seed(&self, seen: impl IntoIterator<Item = (String, String, i64)>) {
        let Ok(mut g) = self.inner.lock() else { return };
        let pending = g.pending.take().unwrap_or_default();
        let mut counted = std::collections::HashSet::new();
        for (identity, id, exp) in seen {
            counted.insert(id.clone());
            g.apply(LiveEvent::Add(identity, id, exp));
        }
        for e in pending {
            match &e {
                LiveEvent::Add(_, id, _) if counted.contains(id) => {}
                _ => g.apply(e),
            }
        }
    }

    /// Credentials still live at `now`.
    pub fn live(&self, now: i64) -> u64 {
        let Ok(mut g) = self.inner.lock() else {
            return 0;
        };
        let mut total = 0;
        // Expired buckets are dropped as they are passed.
        g.by_identity.retain(|_, m| {
            let live = m.split_off(&(now + 1));
            *m = live;
            total += m.values().sum::<u64>();
            !m.is_empty()
        });
        let pending: u64 = g.pending.as_ref().map_or(0, |p| {
            p.iter()
                .filter(|e| matches!(e, LiveEvent::Add(_, _, exp) if *exp > now))
                .count() as u64
        });
        total + pending
    }
}

/// At most one log line per period for a condition that may repeat on every request (a store
/// that cannot commit fails each of thousands of requests a second): [`LogEvery::due`] says
/// when to log, and how many were not logged since.
#[derive(Debug)]
pub struct LogEvery {
    period_secs: u64,
    /// Unix seconds of the last line, plus one (0: never).
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogEvery {
    /// One line per `period_secs`.
    pub const fn new(period_secs: u64) -> Self {
        LogEvery {
            period_secs,
            last: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line is due now (`n` occurrences went unlogged since the last one);
    /// `None` when this one is only counted.
    pub fn due(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 1;
        let last = self.last.load(Relaxed);
        if last != 0 && now < last + self.period_secs {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        if self
            .last
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}

/// A gRPC status code by its name (as in the gRPC status code guide), for metric labels.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// Refreshes the standard `process_*` metrics from `/proc/self` (Linux; elsewhere they stay
/// absent): CPU time, memory, open and allowed file descriptors, start time.
pub fn update_process_metrics() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    // USER_HZ is 100 on Linux; pages are 4 KiB on the platforms Sigil ships for.
    const HZ: f64 = 100.0;
    if let (Some(u), Some(s)) = (num(11), num(12)) {
        metrics::counter!("process_cpu_seconds_total").absolute(((u + s) / HZ) as u64);
    }
    if let Some(v) = num(20) {
        metrics::gauge!("process_virtual_memory_bytes").set(v);
    }
    if let Some(rss) = num(21) {
        metrics::gauge!("process_resident_memory_bytes").set(rss * 4096.0);
    }
    if let (Some(start), Some(boot)) = (num(19), boot_time()) {
        metrics::gauge!("process_start_time_seconds").set(boot + start / HZ);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
        && let Some(max) = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok())
    {
        metrics::gauge!("process_max_fds").set(max);
    }
}

/// When the machine booted, Unix seconds.
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}
