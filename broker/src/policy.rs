//! Gate 3 and admin roles: Cedar policies over the same identity record the other gates read.
//!
//! - **Principal**: `Sigil::Identity::"<SPIFFE ID>"` with attributes `spiffe_id`, `path`,
//!   `owner`, `purpose`, `status`, its labels as tags, and the roles in its `roles` label
//!   (comma-separated) as parents `Sigil::Role::"<role>"`. Operators are
//!   `Sigil::Operator::"<name>"` in `Sigil::Role::"<admin|operator|auditor|revoker>"`.
//! - **Actions**: `attest`, `mint_x509`, `mint_jwt`, `exchange`, and the admin actions
//!   (grouped under `read`, `revoke`, `manage`, `administer`).
//! - **Resource**: the audience (`Sigil::Audience::"db"`) for JWT-SVIDs and exchanges, the
//!   credential kind (`Sigil::Kind::"x509"`) for certificates, `Sigil::Broker::"sigil"` for
//!   attestation and admin actions.
//! - **Context**: attestation method, selectors, source address (`ipaddr`, absent on the Unix
//!   socket), requested TTL, audiences, scopes, DNS names, approvals in force, and the time
//!   (`now`, `hour` and `weekday` in UTC, Monday = 1).
//!
//! Policies come from a file or a directory of `.cedar` files and are validated against the
//! schema ([`SCHEMA`], also in `deploy/policies/sigil.cedarschema`) at start and on reload; a
//! policy that does not parse or validate is refused with its file, line and error, and the
//! policies in force stay. Built-in policies (ids starting `sigil.`): the admin roles, and —
//! unless `policy.default = "deny"` — a permit for what gates 1 and 2 allowed, so your files
//! only need `forbid` rules. A `forbid` that cannot be evaluated denies (fail closed).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::Arc;

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Decision, Effect, Entities, Entity, EntityUid, Policy, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use crate::config::PolicyDefault;
use crate::model::IdentityRecord;

/// The Cedar schema every policy is validated against.
pub const SCHEMA: &str = include_str!("../../deploy/policies/sigil.cedarschema");

/// Operator roles, most powerful first.
pub const ROLES: [&str; 4] = ["admin", "operator", "auditor", "revoker"];

const BUILTIN_ROLES: &str = r#"
@id("sigil.role.admin")
permit(principal in Sigil::Role::"admin", action, resource);

@id("sigil.role.operator")
permit(principal in Sigil::Role::"operator", action in
  [Sigil::Action::"read", Sigil::Action::"revoke", Sigil::Action::"manage"], resource);

@id("sigil.role.auditor")
permit(principal in Sigil::Role::"auditor", action in Sigil::Action::"read", resource);

@id("sigil.role.revoker")
permit(principal in Sigil::Role::"revoker", action in
  [Sigil::Action::"read", Sigil::Action::"revoke"], resource);
"#;

const BUILTIN_PERMIT: &str = r#"
@id("sigil.default")
permit(principal is Sigil::Identity, action in
  [Sigil::Action::"attest", Sigil::Action::"mint_x509", Sigil::Action::"mint_jwt"], resource);
"#;

/// Why policies could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// The outcome of one authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Allowed?
    pub allowed: bool,
    /// Ids of the policies that decided (the permits that allowed, or the forbids that
    /// denied; empty when nothing permitted).
    pub policies: Vec<String>,
    /// A plain-words reason for a denial.
    pub reason: String,
}

/// The loaded policies.
#[derive(Debug)]
struct Loaded {
    set: PolicySet,
    ids: Vec<String>,
    files: Vec<String>,
    /// `@reason` annotations, by policy id.
    reasons: BTreeMap<String, String>,
    forbids: HashSet<String>,
    /// Workload actions some non-built-in policy could apply to (by its action scope). For
    /// the others the decision is known without evaluating: the built-in default decides.
    user_actions: HashSet<&'static str>,
    default: PolicyDefault,
}

/// Actions of workloads (not in any action group), which the fast path covers.
const WORKLOAD_ACTIONS: [&str; 4] = ["attest", "mint_x509", "mint_jwt", "exchange"];

/// Cached type names (parsing one runs Cedar's parser).
fn type_name(kind: &str) -> Result<cedar_policy::EntityTypeName, String> {
    use std::sync::OnceLock;
    static NAMES: OnceLock<BTreeMap<&'static str, cedar_policy::EntityTypeName>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        [
            "Identity", "Operator", "Role", "Audience", "Kind", "Broker", "Action",
        ]
        .into_iter()
        .filter_map(|k| {
            cedar_policy::EntityTypeName::from_str(&format!("Sigil::{k}"))
                .ok()
                .map(|n| (k, n))
        })
        .collect()
    });
    names
        .get(kind)
        .cloned()
        .ok_or_else(|| format!("unknown entity type Sigil::{kind}"))
}

/// Policies in force, swapped atomically on reload.
#[derive(Debug)]
pub struct PolicyEngine {
    schema: Schema,
    path: Option<PathBuf>,
    default: PolicyDefault,
    current: ArcSwap<Loaded>,
    authorizer: Authorizer,
    /// Check each request's entities and context against the schema (tests).
    strict: bool,
}

/// What was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Policy ids in force.
    pub policy_ids: Vec<String>,
    /// Files read.
    pub files: Vec<String>,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The first labelled offset of a Cedar diagnostic.
fn first_offset(d: &dyn miette::Diagnostic) -> Option<usize> {
    d.labels()
        .and_then(|mut l| l.next())
        .map(|l| l.offset())
        .or_else(|| {
            d.related()
                .and_then(|mut r| r.next())
                .and_then(first_offset)
        })
}

fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| PolicyError(format!("policy path {}: {e}", path.display())))?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| PolicyError(format!("policy dir {}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .collect();
    files.sort();
    Ok(files)
}

impl PolicyEngine {
    /// Loads the policies (at start: an error refuses start).
    pub fn load(
        path: Option<PathBuf>,
        default: PolicyDefault,
    ) -> Result<Arc<PolicyEngine>, PolicyError> {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA)
            .map_err(|e| PolicyError(format!("built-in schema: {e}")))?;
        let loaded = build(&schema, path.as_deref(), default)?;
        Ok(Arc::new(PolicyEngine {
            schema,
            path,
            default,
            current: ArcSwap::from_pointee(loaded),
            authorizer: Authorizer::new(),
            strict: cfg!(test),
        }))
    }

    /// Re-reads the policy files. On any error the policies in force stay.
    pub fn reload(&self) -> Result<LoadReport, PolicyError> {
        let loaded = build(&self.schema, self.path.as_deref(), self.default)?;
        let report = LoadReport {
            policy_ids: loaded.ids.clone(),
            files: loaded.files.clone(),
        };
        self.current.store(Arc::new(loaded));
        Ok(report)
    }

    /// What is in force.
    pub fn report(&self) -> LoadReport {
        let c = self.current.load();
        LoadReport {
            policy_ids: c.ids.clone(),
            files: c.files.clone(),
        }
    }

    /// Decides `action` by `principal` on `resource` in the context `context` builds (only
    /// built when a policy has to be evaluated).
    pub fn authorize(
        &self,
        principal: Principal<'_>,
        action: &str,
        resource: Resource<'_>,
        context: impl FnOnce() -> Vec<(String, RestrictedExpression)>,
    ) -> PolicyDecision {
        match self.try_authorize(principal, action, resource, context) {
            Ok(d) => d,
            Err(e) => PolicyDecision {
                allowed: false,
                policies: Vec::new(),
                reason: format!("the request could not be evaluated ({e}); refusing"),
            },
        }
    }

    fn try_authorize(
        &self,
        principal: Principal<'_>,
        action: &str,
        resource: Resource<'_>,
        context: impl FnOnce() -> Vec<(String, RestrictedExpression)>,
    ) -> Result<PolicyDecision, String> {
        let loaded = self.current.load();
        if let Some(a) = WORKLOAD_ACTIONS.iter().find(|a| **a == action)
            && !loaded.user_actions.contains(a)
        {
            // No policy of the operator's applies to this action: the built-in default
            // decides, exactly as evaluating would.
            return Ok(
                if loaded.default == PolicyDefault::Permit && action != "exchange" {
                    PolicyDecision {
                        allowed: true,
                        policies: vec!["sigil.default".into()],
                        reason: String::new(),
                    }
                } else {
                    PolicyDecision {
                        allowed: false,
                        policies: Vec::new(),
                        reason: format!("no policy permits {action}"),
                    }
                },
            );
        }
        let mut entities = Vec::new();
        let (puid, pentity) = principal.entity()?;
        entities.push(pentity);
        for r in principal.roles() {
            entities.push(Entity::new_no_attrs(uid("Role", &r)?, HashSet::new()));
        }
        let ruid = resource.uid()?;
        entities.push(Entity::new_no_attrs(ruid.clone(), HashSet::new()));
        // Entities and context are built here, in one shape, and policies were validated
        // against the schema at load; checking every workload request against the schema
        // again would cost more than the decision (the unit tests check the shape matches the
        // schema). Admin actions keep the schema: it supplies the action groups roles use.
        let workload = WORKLOAD_ACTIONS.contains(&action);
        let schema = (self.strict || !workload).then_some(&self.schema);
        let entities = Entities::from_entities(entities, schema).map_err(|e| e.to_string())?;
        let action_uid = uid("Action", action)?;
        let ctx = Context::from_pairs(context()).map_err(|e| e.to_string())?;
        let req = Request::new(puid, action_uid, ruid, ctx, schema).map_err(|e| e.to_string())?;
        let resp = self.authorizer.is_authorized(&req, &loaded.set, &entities);
        let decided: Vec<String> = resp
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        // Cedar skips a policy that errors; a forbid we could not evaluate denies instead.
        let broken_forbids: Vec<String> = resp
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .filter(|e| loaded.forbids.iter().any(|id| e.contains(id.as_str())))
            .collect();
        if !broken_forbids.is_empty() {
            return Ok(PolicyDecision {
                allowed: false,
                policies: Vec::new(),
                reason: format!(
                    "a forbid policy could not be evaluated ({}); refusing",
                    broken_forbids.join("; ")
                ),
            });
        }
        Ok(match resp.decision() {
            Decision::Allow => PolicyDecision {
                allowed: true,
                policies: decided,
                reason: String::new(),
            },
            Decision::Deny if decided.is_empty() => PolicyDecision {
                allowed: false,
                policies: Vec::new(),
                reason: format!("no policy permits {action}"),
            },
            Decision::Deny => {
                let why: Vec<String> = decided
                    .iter()
                    .map(|id| match loaded.reasons.get(id) {
                        Some(r) => format!("policy {id} forbids {action}: {r}"),
                        None => format!("policy {id} forbids {action}"),
                    })
                    .collect();
                PolicyDecision {
                    allowed: false,
                    policies: decided,
                    reason: why.join("; "),
                }
            }
        })
    }
}

fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    Ok(EntityUid::from_type_name_and_id(
        type_name(kind)?,
        cedar_policy::EntityId::new(id),
    ))
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub enum Principal<'a> {
    /// A workload identity.
    Identity(&'a IdentityRecord),
    /// An operator with a role.
    Operator {
        /// Name.
        name: &'a str,
        /// Role.
        role: &'a str,
    },
}

impl Principal<'_> {
    fn roles(&self) -> Vec<String> {
        match self {
            Principal::Identity(r) => r
                .labels
                .get("roles")
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            Principal::Operator { role, .. } => vec![(*role).to_owned()],
        }
    }

    fn entity(&self) -> Result<(EntityUid, Entity), String> {
        let parents = self
            .roles()
            .iter()
            .map(|r| uid("Role", r))
            .collect::<Result<Vec<_>, _>>()?;
        match self {
            Principal::Identity(r) => {
                let u = uid("Identity", r.spiffe_id.as_str())?;
                let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
                let attrs = [
                    ("spiffe_id".to_owned(), s(r.spiffe_id.as_str())),
                    ("path".to_owned(), s(r.spiffe_id.path())),
                    ("owner".to_owned(), s(&r.owner)),
                    ("purpose".to_owned(), s(&r.purpose)),
                    ("status".to_owned(), s(r.status.as_str())),
                ];
                let tags = r
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), s(v)))
                    .collect::<Vec<_>>();
                let e = Entity::new_with_tags(u.clone(), attrs, parents, tags)
                    .map_err(|e| e.to_string())?;
                Ok((u, e))
            }
            Principal::Operator { name, .. } => {
                let u = uid("Operator", name)?;
                let e = Entity::new_with_tags(
                    u.clone(),
                    [(
                        "name".to_owned(),
                        RestrictedExpression::new_string((*name).to_owned()),
                    )],
                    parents,
                    [],
                )
                .map_err(|e| e.to_string())?;
                Ok((u, e))
            }
        }
    }
}

/// What is acted on.
#[derive(Debug, Clone, Copy)]
pub enum Resource<'a> {
    /// A JWT audience.
    Audience(&'a str),
    /// A credential kind.
    Kind(&'a str),
    /// The broker itself.
    Broker,
}

impl Resource<'_> {
    fn uid(&self) -> Result<EntityUid, String> {
        match self {
            Resource::Audience(a) => uid("Audience", a),
            Resource::Kind(k) => uid("Kind", k),
            Resource::Broker => uid("Broker", "sigil"),
        }
    }
}

/// Context building helpers.
pub mod ctx {
    use super::*;

    /// A string.
    pub fn s(v: impl Into<String>) -> RestrictedExpression {
        RestrictedExpression::new_string(v.into())
    }

    /// A number.
    pub fn n(v: i64) -> RestrictedExpression {
        RestrictedExpression::new_long(v)
    }

    /// A set of strings.
    pub fn set<I, S>(items: I) -> RestrictedExpression
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RestrictedExpression::new_set(items.into_iter().map(|i| s(i)))
    }

    /// An IP address.
    pub fn ip(a: IpAddr) -> RestrictedExpression {
        RestrictedExpression::new_ip(a.to_string())
    }

    /// `now`, `hour` (0-23 UTC) and `weekday` (Monday = 1 ... Sunday = 7).
    pub fn time(now: i64) -> Vec<(String, RestrictedExpression)> {
        let t = time::OffsetDateTime::from_unix_timestamp(now)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        vec![
            ("now".into(), n(now)),
            ("hour".into(), n(i64::from(t.hour()))),
            (
                "weekday".into(),
                n(i64::from(t.weekday().number_from_monday())),
            ),
        ]
    }
}

fn build(
    schema: &Schema,
    path: Option<&Path>,
    default: PolicyDefault,
) -> Result<Loaded, PolicyError> {
    let mut sources: Vec<(String, String)> = vec![("built-in roles".into(), BUILTIN_ROLES.into())];
    if default == PolicyDefault::Permit {
        sources.push(("built-in default".into(), BUILTIN_PERMIT.into()));
    }
    let builtin = sources.len();
    let mut files = Vec::new();
    if let Some(p) = path {
        for f in policy_files(p)? {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| PolicyError(format!("{}: {e}", f.display())))?;
            files.push(f.display().to_string());
            sources.push((f.display().to_string(), text));
        }
    }
    let mut set = PolicySet::new();
    let mut ids = Vec::new();
    let mut reasons = BTreeMap::new();
    let mut forbids = HashSet::new();
    let mut user_actions = HashSet::new();
    // Which source each policy came from, for locating validation errors.
    let mut origin: BTreeMap<String, usize> = BTreeMap::new();
    for (k, (name, text)) in sources.iter().enumerate() {
        let parsed = PolicySet::from_str(text).map_err(|e| {
            let (line, col) = first_offset(&e)
                .map(|o| line_col(text, o))
                .unwrap_or((0, 0));
            let detail: Vec<String> = e.iter().map(|x| x.to_string()).collect();
            PolicyError(format!("{name}:{line}:{col}: {}", detail.join("; ")))
        })?;
        let mut policies: Vec<&Policy> = parsed.policies().collect();
        // Cedar names them policy0, policy1, ... in source order.
        policies.sort_by_key(|p| {
            p.id()
                .to_string()
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        });
        if parsed.templates().next().is_some() {
            return Err(PolicyError(format!(
                "{name}: templates are not supported; write plain policies"
            )));
        }
        for (n, p) in policies.into_iter().enumerate() {
            let id = match p.annotation("id") {
                Some(id) => id.to_owned(),
                None => format!("{name}#{n}"),
            };
            if id.starts_with("sigil.") && k >= builtin {
                return Err(PolicyError(format!(
                    "{name}: policy id {id:?} is reserved (ids starting sigil. are built in)"
                )));
            }
            if let Some(r) = p.annotation("reason") {
                reasons.insert(id.clone(), r.to_owned());
            }
            if p.effect() == Effect::Forbid {
                forbids.insert(id.clone());
            }
            if k >= builtin {
                for a in WORKLOAD_ACTIONS {
                    let me = uid("Action", a).map_err(PolicyError)?;
                    let applies = match p.action_constraint() {
                        cedar_policy::ActionConstraint::Any => true,
                        cedar_policy::ActionConstraint::Eq(x) => x == me,
                        cedar_policy::ActionConstraint::In(xs) => xs.contains(&me),
                    };
                    if applies {
                        user_actions.insert(a);
                    }
                }
            }
            set.add(p.new_id(PolicyId::new(&id)))
                .map_err(|e| PolicyError(format!("{name}: policy {id:?}: {e}")))?;
            origin.insert(id.clone(), k);
            ids.push(id);
        }
    }
    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if !result.validation_passed() {
        let mut msgs = Vec::new();
        for e in result.validation_errors() {
            let id = e.policy_id().to_string();
            let (name, text) = origin
                .get(&id)
                .and_then(|k| sources.get(*k))
                .map(|(n, t)| (n.as_str(), t.as_str()))
                .unwrap_or(("?", ""));
            let (line, col) = first_offset(e).map(|o| line_col(text, o)).unwrap_or((0, 0));
            msgs.push(format!("{name}:{line}:{col}: policy {id}: {e}"));
        }
        return Err(PolicyError(msgs.join("\n")));
    }
    Ok(Loaded {
        set,
        ids,
        files,
        reasons,
        forbids,
        user_actions,
        default,
    })
}

/// Context pairs for a mint or attestation (see the module docs for the names).
#[derive(Debug, Clone, Default)]
pub struct MintFacts<'a> {
    /// Attestation method.
    pub method: &'a str,
    /// Selectors of this attestation.
    pub selectors: Vec<String>,
    /// Caller's address.
    pub source: Option<IpAddr>,
    /// Requested (or default) lifetime.
    pub ttl_secs: u64,
    /// Audiences asked for.
    pub audiences: Vec<String>,
    /// Scopes asked for.
    pub scopes: Vec<String>,
    /// DNS names asked for.
    pub dns_names: Vec<String>,
    /// Approval-gated scopes with an approval in force.
    pub approvals: BTreeSet<String>,
    /// Unix seconds.
    pub now: i64,
}

impl MintFacts<'_> {
    /// As Cedar context.
    pub fn context(&self) -> Vec<(String, RestrictedExpression)> {
        use ctx::*;
        let mut v = vec![
            ("method".to_owned(), s(self.method)),
            ("selectors".to_owned(), set(self.selectors.clone())),
            ("ttl_secs".to_owned(), n(self.ttl_secs as i64)),
            ("audiences".to_owned(), set(self.audiences.clone())),
            ("scopes".to_owned(), set(self.scopes.clone())),
            ("dns_names".to_owned(), set(self.dns_names.clone())),
            ("approvals".to_owned(), set(self.approvals.clone())),
        ];
        if let Some(a) = self.source {
            v.push(("source".to_owned(), ip(a)));
        }
        v.extend(time(self.now));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn the_schema_and_the_example_policies_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies");
        let e = PolicyEngine::load(Some(dir), PolicyDefault::Permit).unwrap();
        let ids = e.report().policy_ids;
        assert!(ids.iter().any(|i| i == "sigil.default"), "{ids:?}");
        assert!(ids.len() > 6, "{ids:?}");
    }

    fn identity() -> IdentityRecord {
        IdentityRecord {
            id: "id-1".into(),
            spiffe_id: "spiffe://example.org/ci/build".parse().unwrap(),
            owner: "ci-team".into(),
            purpose: "builds".into(),
            labels: [
                ("roles".to_owned(), "ci, batch".to_owned()),
                ("tier".to_owned(), "batch".to_owned()),
            ]
            .into(),
            selectors: Default::default(),
            entitlements: Default::default(),
            status: crate::model::IdentityStatus::Active,
            status_reason: String::new(),
            status_since: 0,
            status_seq: 0,
            expires_at: i64::MAX,
            generation: 1,
            created_at: 0,
            created_by: "t".into(),
            updated_at: 0,
            updated_by: "t".into(),
            revision: 1,
            recertified_at: 0,
            recertified_by: String::new(),
        }
    }

    #[test]
    fn requests_match_the_schema_and_the_examples_decide_as_documented() {
        // In tests every request is checked against the schema (`strict`), so a change to the
        // entities or context that the schema does not describe fails here.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies");
        let e = PolicyEngine::load(Some(dir), PolicyDefault::Permit).unwrap();
        assert!(e.strict);
        let id = identity();
        let at = |hour: i64| 1_800_000_000 - 1_800_000_000 % 86400 + hour * 3600;
        let facts = |method: &'static str, hour: i64, ttl: u64| MintFacts {
            method,
            selectors: vec!["unix:uid:1000".into()],
            source: Some("10.1.2.3".parse().unwrap()),
            ttl_secs: ttl,
            audiences: vec!["prod-db".into()],
            scopes: vec!["read".into()],
            dns_names: vec![],
            approvals: Default::default(),
            now: at(hour),
        };
        let mint_jwt = |f: &MintFacts<'_>| {
            e.authorize(
                Principal::Identity(&id),
                "mint_jwt",
                Resource::Audience("prod-db"),
                || f.context(),
            )
        };
        let d = mint_jwt(&facts("unix", 12, 300));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policies, ["sigil.default"]);
        let d = mint_jwt(&facts("join_token", 12, 300));
        assert!(!d.allowed);
        assert_eq!(d.policies, ["prod-db-needs-unix"]);
        // A CI identity (roles label) at 22:00 UTC.
        let d = mint_jwt(&facts("unix", 22, 300));
        assert_eq!(d.policies, ["ci-office-hours"], "{d:?}");
        // Tags: batch identities get short certificates only.
        let x = |ttl| {
            e.authorize(
                Principal::Identity(&id),
                "mint_x509",
                Resource::Kind("x509"),
                || facts("unix", 12, ttl).context(),
            )
        };
        assert!(x(900).allowed);
        assert_eq!(x(3600).policies, ["no-long-lived-certs-for-batch"]);
        // Operators and roles.
        let admin = |role: &str, action: &str| {
            let mut c = vec![("target".to_owned(), ctx::s(""))];
            c.extend(ctx::time(at(12)));
            e.authorize(
                Principal::Operator { name: "ana", role },
                action,
                Resource::Broker,
                || c,
            )
            .allowed
        };
        assert!(admin("auditor", "audit.read"));
        assert!(!admin("auditor", "credential.revoke"));
        assert!(admin("revoker", "credential.revoke"));
        assert!(!admin("revoker", "identity.create"));
        assert!(admin("operator", "identity.create"));
        assert!(!admin("operator", "operator.issue"));
        assert!(admin("admin", "operator.issue"));
    }

    #[test]
    fn roles_and_forbids_hold_without_per_request_schema_checks() {
        // What the broker runs outside tests: no per-request schema check for workloads.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies");
        let loaded = PolicyEngine::load(Some(dir), PolicyDefault::Permit).unwrap();
        let e = PolicyEngine {
            schema: loaded.schema.clone(),
            path: None,
            default: PolicyDefault::Permit,
            current: ArcSwap::new(loaded.current.load_full()),
            authorizer: Authorizer::new(),
            strict: false,
        };
        let admin = |role: &str, action: &str| {
            e.authorize(
                Principal::Operator { name: "ana", role },
                action,
                Resource::Broker,
                || {
                    let mut c = vec![("target".to_owned(), ctx::s(""))];
                    c.extend(ctx::time(1_800_000_000));
                    c
                },
            )
            .allowed
        };
        assert!(admin("auditor", "identity.read"));
        assert!(!admin("auditor", "credential.revoke"));
        assert!(admin("revoker", "credential.revoke"));
        let id = identity();
        let d = e.authorize(
            Principal::Identity(&id),
            "mint_jwt",
            Resource::Audience("prod-db"),
            || {
                MintFacts {
                    method: "join_token",
                    now: 1_800_000_000 - 1_800_000_000 % 86400 + 12 * 3600,
                    ..Default::default()
                }
                .context()
            },
        );
        assert_eq!(d.policies, ["prod-db-needs-unix"], "{d:?}");
    }

    #[test]
    fn a_bad_policy_is_refused_with_file_and_line_and_the_old_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.cedar",
            "@id(\"no-prod\")\nforbid(principal, action == Sigil::Action::\"mint_jwt\", resource == Sigil::Audience::\"prod-db\");\n",
        );
        let e = PolicyEngine::load(Some(dir.path().to_owned()), PolicyDefault::Permit).unwrap();
        write(
            dir.path(),
            "b.cedar",
            "\n\npermit(principal, action, resource) when { principal.nosuch == 1 };\n",
        );
        let err = e.reload().unwrap_err().to_string();
        assert!(err.contains("b.cedar:3:"), "{err}");
        write(dir.path(), "b.cedar", "permit(principal, action\n");
        let err = e.reload().unwrap_err().to_string();
        assert!(err.contains("b.cedar:"), "{err}");
        assert!(e.report().policy_ids.iter().any(|i| i == "no-prod"));
        assert!(!e.report().policy_ids.iter().any(|i| i.contains("b.cedar")));
    }
}
