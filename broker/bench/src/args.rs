//! The bench's flags: [`BenchArgs`], the [`Scenario`]s to run and the [`Peer`] to compare with.

use std::time::Duration;

use clap::{Args, ValueEnum};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// JWT-SVID mint over mTLS.
    Jwt,
    /// X.509-SVID from a (pre-made) CSR over mTLS: the broker's side of issuance.
    X509,
    /// Join token -> first X.509-SVID (a fresh token per attestation).
    Attest,
    /// The SDK's renewal: a new key and CSR made by the client, mTLS, chain checked.
    Renew,
    /// Three JWT-SVIDs to one X.509-SVID.
    Mixed,
    /// Revocation reaching N watch streams.
    Revoke,
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Jwt => "jwt",
            Scenario::X509 => "x509",
            Scenario::Attest => "attest",
            Scenario::Renew => "renew",
            Scenario::Mixed => "mixed",
            Scenario::Revoke => "revoke",
        }
    }
}

/// `sigil bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Start a broker (a child process on a temporary data dir); the default when no --broker
    /// or --data-dir is given.
    #[arg(long)]
    pub embedded: bool,
    /// Scenarios to run (default jwt,x509; with --baseline jwt,x509,revoke).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenario: Vec<Scenario>,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// TLS connections (each a separately attested workload).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measured time per scenario.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop each scenario after this many completed operations instead of after --duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Join tokens made up front for the attest scenario (it ends when they run out; it has
    /// no warm-up, so none is wasted).
    #[arg(long, default_value_t = 10_000)]
    pub attest_tokens: usize,
    /// Also drive a peer with the same load and CSRs: `cfssl` (its `cfssl serve` sign API,
    /// when the cfssl binary is installed).
    #[arg(long)]
    pub peer: Option<Peer>,
    /// Fill the store with this many ledger rows (and --live-revocations revocations) after
    /// the empty-store run, restart the broker, and run again: the scale figures (embedded
    /// brokers only; default with --baseline: 1000000; 0 turns it off).
    #[arg(long)]
    pub populate: Option<u64>,
    /// Live revocations to add with --populate.
    #[arg(long, default_value_t = 100_000)]
    pub live_revocations: u64,
    /// Unmeasured warm-up per scenario.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Watch streams for the revoke scenario, comma-separated, a run each (default 1000;
    /// with --baseline 10000).
    #[arg(long, value_delimiter = ',')]
    pub watchers: Vec<usize>,
    /// Revocations per revoke run.
    #[arg(long, default_value_t = 20)]
    pub revocations: usize,
    /// Also measure in the same run the raw costs on this machine (a durable commit, ES256,
    /// CSR check + leaf signing, a plain gRPC round trip over the same TLS connections) and,
    /// unless told otherwise, cfssl and the --populate scale run: every figure of the
    /// performance targets (docs/PERFORMANCE.md).
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `postgres`: the replica figures instead, on a private PostgreSQL server the bench
    /// starts (issuance there beside the embedded store, a revocation reaching watchers on two
    /// replicas, an SDK's failover when its replica is killed, and start-to-ready on a database
    /// of --populate rows).
    #[arg(long, value_enum)]
    pub store: Option<StoreKind>,
    /// `[limits]` of an embedded broker: `on` runs every check (rates set far above the load,
    /// so nothing is refused and their cost is in the figures); `off` turns the rate limits
    /// and the calls-in-flight budget off, to measure what they cost by turns.
    #[arg(long, value_enum, default_value = "on")]
    pub limits: LimitsMode,
}

/// Whether an embedded broker runs its `[limits]` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LimitsMode {
    /// Every check runs; the rates are far above the load.
    On,
    /// Rate limits and the calls-in-flight budget off.
    Off,
}

/// Which store the bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// The embedded store (the default run).
    Redb,
    /// Two replicas on a private PostgreSQL server.
    Postgres,
}

/// A peer to compare with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// CloudFlare's cfssl (`cfssl serve`), which signs and stores nothing.
    Cfssl,
}
