//! The `sigil` command line: flag definitions and the commands behind them.
//!
//! Operator commands find the broker and the operator credential from `--data-dir` (which
//! holds `broker.url`, `bundle.pem` and `admin/`), or from explicit flags and `SIGIL_*`
//! environment variables.
//!
//! Layout, in the order a user meets them (that of `sigil --help`); each command group's file
//! holds its flags beside the code that runs them, and this file only parses and dispatches:
//! - `serve`: `sigil init` and `sigil serve`, and the config loading and shutdown signal
//!   `dev` shares.
//! - `dev`: `sigil dev`, init + serve + a demo identity and join token in one command.
//! - `identity`: `sigil identity ...`.
//! - `join_token`: `sigil join-token ...`.
//! - `revoke`: `sigil revoke ...` and `sigil leak`.
//! - `keys`: `sigil rotate` and `sigil keys ...`.
//! - `owner`: `sigil owner ...`.
//! - `report`: `sigil report`.
//! - `credential`: `sigil credential ...`.
//! - `audit`: `sigil audit ...`.
//! - `backup`: `sigil backup` and `sigil restore`.
//! - `migrate`: `sigil migrate` (PostgreSQL schema; embedded store into PostgreSQL).
//! - `approve`: `sigil approve` and `sigil approvals ...`.
//! - `policy`: `sigil policy ...`.
//! - `operator`: `sigil operator ...` and `sigil whoami`.
//! - `fetch`: `sigil fetch`, the workload side ([`FetchArgs`]).
//! - `bench`: `sigil bench`, over the sigil-bench crate.
//! - `completion`: `sigil completion SHELL` and `sigil man`.
//! - `conn`: [`Conn`], how operator commands (and the bench) reach a broker, and
//!   [`broker_url_of`].
//! - `output`: what several groups print alike (identities, revocation reports, tables).

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

mod agent;
mod approve;
mod audit;
mod backup;
mod bench;
mod completion;
mod conn;
mod credential;
mod dev;
mod fetch;
mod identity;
mod join_token;
mod keys;
mod migrate;
mod operator;
mod output;
mod owner;
mod policy;
mod profile;
mod report;
mod revoke;
mod serve;
mod status;

pub use conn::{Conn, broker_url_of, target};
pub use fetch::FetchArgs;

/// Sigil: short-lived credentials (X.509-SVIDs and JWT-SVIDs) for services, jobs and agents.
#[derive(Debug, Parser)]
#[command(
    name = "sigil",
    version = sigil_broker::VERSION,
    about,
    long_about = None,
    propagate_version = true,
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Log filter (e.g. `info`, `sigil_broker=debug`).
    #[arg(long, global = true, env = "SIGIL_LOG", default_value = "info")]
    pub log: String,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "SIGIL_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
// Parsed once per process; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Create a new data dir: master key, CAs, JWT key, operator credential, bundle.pem.
    Init(serve::InitArgs),
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Try Sigil in one command: init a local data dir if needed, serve, create a demo
    /// identity and print a join token and the exact `sigil fetch` command to use it.
    Dev(dev::DevArgs),
    /// Manage identities (operator).
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
    /// Manage join tokens (operator).
    #[command(subcommand, name = "join-token")]
    JoinToken(join_token::JoinTokenCmd),
    /// Revoke a credential, or everything an identity holds (operator).
    #[command(subcommand)]
    Revoke(revoke::RevokeCmd),
    /// Report a leaked token or certificate: revoke it and everything its identity holds, mark
    /// the identity compromised and record the incident (operator).
    Leak(revoke::LeakArgs),
    /// Rotate keys: `jwt`, `x509` (the signing intermediate) or `root` (operator).
    Rotate(keys::RotateArgs),
    /// List signing keys, or revoke one in an emergency (operator).
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// Owners of identities: deactivate one who left, list them (operator).
    #[command(subcommand)]
    Owner(owner::OwnerCmd),
    /// The governance report: inventory, findings, programme metrics (operator).
    Report(report::ReportArgs),
    /// Look up issued credentials in the ledger (operator).
    #[command(subcommand)]
    Credential(credential::CredentialCmd),
    /// Read and check the audit log (operator).
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Write a consistent backup of the whole store while the broker serves (or, with
    /// --offline, of a stopped one) (operator, role admin).
    Backup(backup::BackupArgs),
    /// Make a new data dir from a backup (needs the master key of the store it came from).
    Restore(backup::RestoreArgs),
    /// Bring a PostgreSQL store's schema up to date, or move an embedded store into
    /// PostgreSQL (--from DATA_DIR --to URL) to run several replicas.
    Migrate(migrate::MigrateArgs),
    /// Approve an approval-gated scope for an identity, for a limited time (operator).
    Approve(approve::ApproveArgs),
    /// List or end approvals (operator).
    #[command(subcommand)]
    Approvals(approve::ApprovalsCmd),
    /// Cedar policies: check files offline, or reload the broker's (operator).
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Operator credentials with a role: admin, operator, auditor, revoker (operator).
    #[command(subcommand, name = "operator")]
    OperatorCred(operator::OperatorCmd),
    /// Is each broker up and able to issue, and as whom this CLI talks to it; `--wait 30s`
    /// waits for it (exit code 5 while any broker is not serving).
    Status(status::StatusArgs),
    /// Saved connections to brokers (URL, trust bundle, operator credential) for remote
    /// operators, picked with --profile or SIGIL_PROFILE.
    #[command(subcommand)]
    Profile(profile::ProfileCmd),
    /// Show which operator and role the current credential is.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Attest (join token, OIDC token, or Unix peer credentials over the broker's socket) and
    /// write the workload's credentials to files.
    Fetch(FetchArgs),
    /// Keep a workload's credentials in files, renewed, following revocations, running a
    /// command or signalling a process on every change (a sidecar; `--once` for init
    /// containers).
    Agent(agent::AgentArgs),
    /// Measure issuance throughput and latency.
    Bench(bench::BenchCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion(completion::CompletionArgs),
    /// Write man pages (sigil.1 and one per command).
    Man(completion::ManArgs),
}

/// What `sigil` exits with, for scripts.
pub const EXIT_CODES: &str = "Exit codes: 0 ok; 1 error; 2 usage (bad flags); 3 not found; \
4 denied or unauthenticated; 5 broker unavailable (retry later)";

/// The exit code for an error (see [`EXIT_CODES`]): by the gRPC code of the broker's answer
/// when there was one.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let code = e.chain().find_map(|c| {
        c.downcast_ref::<sigil_sdk::SdkError>()
            .and_then(sigil_sdk::SdkError::code)
            .or_else(|| c.downcast_ref::<tonic::Status>().map(tonic::Status::code))
    });
    match code {
        Some(tonic::Code::NotFound) => 3,
        Some(tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) => 4,
        Some(tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) => 5,
        _ => 1,
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(a) => serve::init(a).await,
        Command::Serve(a) => serve::serve(a).await,
        Command::Dev(a) => dev::run(a).await,
        Command::Identity(c) => identity::run(c).await,
        Command::JoinToken(c) => join_token::run(c).await,
        Command::Credential(c) => credential::run(c).await,
        Command::Owner(c) => owner::run(c).await,
        Command::Report(a) => report::run(a).await,
        Command::Revoke(c) => revoke::revoke(c).await,
        Command::Leak(a) => revoke::leak(a).await,
        Command::Rotate(a) => keys::rotate(a).await,
        Command::Keys(c) => keys::keys(c).await,
        Command::Audit(c) => audit::run(c).await,
        Command::Backup(a) => backup::backup(a).await,
        Command::Restore(a) => backup::restore(a).await,
        Command::Migrate(a) => migrate::run(a).await,
        Command::Approve(a) => approve::approve(a).await,
        Command::Approvals(c) => approve::approvals(c).await,
        Command::Policy(c) => policy::run(c).await,
        Command::OperatorCred(c) => operator::operator_cred(c).await,
        Command::Status(a) => status::run(a).await,
        Command::Profile(c) => profile::run(c).await,
        Command::Whoami { json, conn } => operator::whoami(conn, json).await,
        Command::Fetch(a) => fetch::run(a).await,
        Command::Agent(a) => agent::run(a).await,
        Command::Bench(b) => bench::run(b).await,
        Command::Completion(a) => completion::completion(a),
        Command::Man(a) => completion::man(a),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_command_line_is_well_formed() {
        // clap's own consistency checks (unique flags across flattened groups, ...), which
        // otherwise only fire when a debug build parses that command.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn ids_that_start_with_a_dash_are_ids_not_flags() {
        // Key ids and jtis are base64url: one in 64 starts with `-`.
        use clap::Parser as _;
        for args in [
            &["sigil", "keys", "revoke", "-02a-v8Ey", "--dry-run"][..],
            &["sigil", "revoke", "credential", "-xJ3kq"][..],
            &["sigil", "credential", "show", "-xJ3kq", "--json"][..],
        ] {
            if let Err(e) = super::Cli::try_parse_from(args) {
                panic!("{args:?}: {e}");
            }
        }
    }
}
