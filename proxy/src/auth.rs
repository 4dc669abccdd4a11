//! Users and permissions: who may call the proxy, and what they may do.
//!
//! ```text
//!  call ──metadata──▶ authenticate (signature, date, nonce) ──▶ principal
//!                                                                  │
//!        resources and actions the call needs ──▶ permit (rules) ──┴──▶ handler
//! ```
//!
//! Users and rules live in one TOML file (`--auth-file`), edited with
//! `petrel user` and `petrel acl` and re-read whenever it changes, without
//! touching any connection:
//!
//! ```toml
//! [[users]]
//! name = "alice"                 # the access key
//! signing_key = "base64..."      # derived from the secret (see petrel_proto::auth)
//! rocketmq_key = "base64..."     # verifies RocketMQ clients' signatures (petrel_proto::rmq_auth)
//!
//! [[rules]]
//! id = 1
//! user = "alice"                 # or "*": every user
//! resource = "topic:orders.*"    # topic:PATTERN, group:PATTERN, cluster, or *
//! actions = ["publish"]          # publish subscribe create update delete describe admin, or *
//! effect = "allow"               # or "deny"
//! source = "10.0.0.0/8"          # optional: only calls from there
//! ```
//!
//! # Invariants
//! - Deny wins: a call is allowed only if some allow rule matches every
//!   resource and action it needs and no deny rule matches any of them.
//! - Secrets are never stored or sent; the file holds signing keys only.
//! - A signature is accepted once (per client instance and call number)
//!   and only within [`MAX_SKEW`] of the proxy's clock.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use dashmap::DashMap;
use ipnet::IpNet;
use petrel_proto::auth as sig;
use petrel_proto::PetrelError;
use serde::{Deserialize, Serialize};

/// How far a call's signed date may be from the proxy's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Calls of one client instance that may arrive out of order (the replay
/// window, in call numbers).
const WINDOW_BITS: u64 = 1024;
/// Client instances remembered for replay protection at most.
const MAX_CLIENTS: usize = 200_000;
/// A refusal is logged once per user (or address) per this long.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What a call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Publish,
    Subscribe,
    Create,
    Update,
    Delete,
    Describe,
    Admin,
}

impl Action {
    pub const ALL: [Action; 7] = [
        Action::Publish,
        Action::Subscribe,
        Action::Create,
        Action::Update,
        Action::Delete,
        Action::Describe,
        Action::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Describe => "describe",
            Action::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What a call acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    Topic(&'a str),
    Group(&'a str),
    Cluster,
}

impl std::fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Topic(t) => write!(f, "topic:{t}"),
            Resource::Group(g) => write!(f, "group:{g}"),
            Resource::Cluster => f.write_str("cluster"),
        }
    }
}

/// The users file, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    #[serde(default)]
    pub users: Vec<UserEntry>,
    #[serde(default)]
    pub rules: Vec<RuleEntry>,
}

/// A request extension naming the user another front end of this proxy
/// authenticated (see [`Auth::check`]).
#[derive(Debug, Clone)]
pub struct Verified(pub Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// The access key.
    pub name: String,
    /// Base64 of `petrel_proto::auth::signing_key(name, secret)`.
    pub signing_key: String,
    /// Base64 of `petrel_proto::rmq_auth::pad_states(secret)`: lets the
    /// user's RocketMQ clients sign in (absent: they cannot).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rocketmq_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    pub id: u64,
    /// A user name, or `*` for every user.
    pub user: String,
    /// `topic:PATTERN`, `group:PATTERN`, `cluster`, or `*` (everything);
    /// `*` in a pattern matches any run of characters.
    pub resource: String,
    /// Action names, or `*` for all.
    pub actions: Vec<String>,
    /// `allow` or `deny`.
    pub effect: String,
    /// Only calls from this network (CIDR), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl AuthFile {
    /// Parses and checks a users file (the reason names the bad entry).
    pub fn parse(text: &str) -> Result<AuthFile, String> {
        let f: AuthFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Policy::compile(&f)?;
        Ok(f)
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# Petrel users and permissions: edit with `petrel user` and `petrel acl`.\n\
             # signing_key is derived from the user's secret; the secret is not stored.\n\n",
        );
        out.push_str(&toml::to_string(self).expect("plain data"));
        out
    }

    /// The id the next rule gets.
    pub fn next_rule_id(&self) -> u64 {
        self.rules.iter().map(|r| r.id).max().unwrap_or(0) + 1
    }
}

/// Checks a name pattern: letters, digits and `. _ - % *`.
fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 255 {
        return Err(format!("pattern {p:?} must be 1..=255 characters"));
    }
    if let Some(c) = p
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-%*".contains(*c)))
    {
        return Err(format!("pattern {p:?} has {c:?}"));
    }
    Ok(())
}

/// Glob match where `*` matches any run of characters (iterative, linear
/// in practice: patterns are short).
fn glob(p: &str, s: &str) -> bool {
    let (p, s) = (p.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

#[derive(Debug, Clone)]
enum Pattern {
    Topic(String),
    Group(String),
    Cluster,
    Any,
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern, String> {
        Ok(match s {
            "*" => Pattern::Any,
            "cluster" => Pattern::Cluster,
            _ => match s.split_once(':') {
                Some(("topic", p)) => {
                    check_pattern(p)?;
                    Pattern::Topic(p.to_string())
                }
                Some(("group", p)) => {
                    check_pattern(p)?;
                    Pattern::Group(p.to_string())
                }
                _ => {
                    return Err(format!(
                        "resource {s:?} must be topic:PATTERN, group:PATTERN, cluster or *"
                    ))
                }
            },
        })
    }

    fn matches(&self, r: Resource<'_>) -> bool {
        match (self, r) {
            (Pattern::Any, _) => true,
            (Pattern::Cluster, Resource::Cluster) => true,
            (Pattern::Topic(p), Resource::Topic(t)) => glob(p, t),
            (Pattern::Group(p), Resource::Group(g)) => glob(p, g),
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    id: u64,
    user: Option<String>,
    resource: Pattern,
    actions: u8,
    deny: bool,
    source: Option<IpNet>,
}

/// The compiled users file.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    users: HashMap<String, [u8; 32]>,
    /// RocketMQ signing states, for users that have them.
    rocketmq: HashMap<String, [u8; 40]>,
    rules: Vec<Rule>,
}

impl Policy {
    pub fn compile(f: &AuthFile) -> Result<Policy, String> {
        let mut users = HashMap::new();
        let mut rocketmq = HashMap::new();
        for u in &f.users {
            petrel_proto::validate::group_name(&u.name)
                .map_err(|e| format!("user {:?}: {e}", u.name))?;
            let key: [u8; 32] = base64::engine::general_purpose::STANDARD
                .decode(&u.signing_key)
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or_else(|| {
                    format!("user {:?}: signing_key is not 32 bytes of base64", u.name)
                })?;
            if users.insert(u.name.clone(), key).is_some() {
                return Err(format!("user {:?} is listed twice", u.name));
            }
            if !u.rocketmq_key.is_empty() {
                let states: [u8; 40] = base64::engine::general_purpose::STANDARD
                    .decode(&u.rocketmq_key)
                    .ok()
                    .and_then(|k| k.try_into().ok())
                    .ok_or_else(|| {
                        format!("user {:?}: rocketmq_key is not 40 bytes of base64", u.name)
                    })?;
                rocketmq.insert(u.name.clone(), states);
            }
        }
        let mut ids = BTreeSet::new();
        let mut rules = Vec::new();
        for r in &f.rules {
            let at = |e: String| format!("rule {}: {e}", r.id);
            if !ids.insert(r.id) {
                return Err(at("the id is used twice".into()));
            }
            let user = match r.user.as_str() {
                "*" => None,
                u if users.contains_key(u) => Some(u.to_string()),
                u => return Err(at(format!("no user {u:?}"))),
            };
            let mut actions = 0u8;
            for a in &r.actions {
                actions |= match a.as_str() {
                    "*" => u8::MAX,
                    a => Action::parse(a)
                        .ok_or_else(|| {
                            at(format!(
                                "unknown action {a:?} (publish, subscribe, create, update, delete, \
                                 describe, admin or *)"
                            ))
                        })?
                        .bit(),
                };
            }
            if actions == 0 {
                return Err(at("no actions".into()));
            }
            let deny = match r.effect.as_str() {
                "allow" => false,
                "deny" => true,
                e => return Err(at(format!("effect {e:?} must be allow or deny"))),
            };
            let source = r
                .source
                .as_deref()
                .map(|s| {
                    s.parse::<IpNet>()
                        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| at(format!("source {s:?} is not a CIDR like 10.0.0.0/8")))
                })
                .transpose()?;
            rules.push(Rule {
                id: r.id,
                user,
                resource: Pattern::parse(&r.resource).map_err(at)?,
                actions,
                deny,
                source,
            });
        }
        Ok(Policy {
            users,
            rocketmq,
            rules,
        })
    }

    /// Whether `user` calling from `from` may do `action` on `res`: the
    /// denying rule's id, or `None` for no matching allow rule.
    pub fn decide(
        &self,
        user: &str,
        from: Option<IpAddr>,
        res: Resource<'_>,
        action: Action,
    ) -> Result<(), Option<u64>> {
        let mut allowed = false;
        for r in &self.rules {
            let applies = r.user.as_deref().is_none_or(|u| u == user)
                && r.actions & action.bit() != 0
                && r.resource.matches(res)
                && r.source
                    .is_none_or(|n| from.is_some_and(|ip| n.contains(&ip)));
            if applies {
                if r.deny {
                    return Err(Some(r.id));
                }
                allowed = true;
            }
        }
        if allowed {
            Ok(())
        } else {
            Err(None)
        }
    }
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    User(Arc<str>),
}

impl Principal {
    pub fn name(&self) -> &str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::User(u) => u,
        }
    }
}

/// Which call numbers of one client instance were seen.
#[derive(Debug)]
struct Window {
    top: u64,
    seen: [u64; (WINDOW_BITS / 64) as usize],
    last: Instant,
}

impl Window {
    fn new(n: u64) -> Window {
        let mut w = Window {
            top: n,
            seen: [0; (WINDOW_BITS / 64) as usize],
            last: Instant::now(),
        };
        w.mark(n);
        w
    }

    fn mark(&mut self, n: u64) {
        let b = n % WINDOW_BITS;
        self.seen[(b / 64) as usize] |= 1 << (b % 64);
    }

    fn seen(&self, n: u64) -> bool {
        let b = n % WINDOW_BITS;
        self.seen[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Accepts call `n` once; refuses numbers below the window.
    fn accept(&mut self, n: u64) -> Result<(), &'static str> {
        self.last = Instant::now();
        if n > self.top {
            // Clear the bits the window slides over.
            let steps = (n - self.top).min(WINDOW_BITS);
            for i in 1..=steps {
                let b = (self.top + i) % WINDOW_BITS;
                self.seen[(b / 64) as usize] &= !(1 << (b % 64));
            }
            self.top = n;
            self.mark(n);
            return Ok(());
        }
        if self.top - n >= WINDOW_BITS {
            return Err("a call number too far behind the client's latest");
        }
        if self.seen(n) {
            return Err("a replayed signature");
        }
        self.mark(n);
        Ok(())
    }
}

/// The proxy's authenticator: anonymous (every call allowed), or users
/// and rules from a file.
pub struct Auth {
    policy: Option<RwLock<Arc<Policy>>>,
    windows: DashMap<(Arc<str>, u64), Window>,
    logged: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("anonymous", &self.policy.is_none())
            .finish()
    }
}

impl Auth {
    /// Every call allowed, no credentials needed (`--allow-anonymous`,
    /// `petrel dev`).
    pub fn anonymous() -> Auth {
        Auth {
            policy: None,
            windows: DashMap::new(),
            logged: Mutex::new(HashMap::new()),
        }
    }

    /// Users and rules from a users file's text.
    pub fn from_text(text: &str) -> Result<Auth, String> {
        let p = Policy::compile(&AuthFile::parse(text)?)?;
        Ok(Auth {
            policy: Some(RwLock::new(Arc::new(p))),
            ..Auth::anonymous()
        })
    }

    pub fn is_anonymous(&self) -> bool {
        self.policy.is_none()
    }

    /// Replaces the users and rules (a reloaded file); an invalid text
    /// keeps the running ones.
    pub fn reload(&self, text: &str) -> Result<(), String> {
        let Some(lock) = &self.policy else {
            return Err("the proxy runs without users (--allow-anonymous)".into());
        };
        let p = Policy::compile(&AuthFile::parse(text)?)?;
        *lock.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
        Ok(())
    }

    /// Whether calls must come from a user (an auth file is in use).
    pub fn requires_users(&self) -> bool {
        self.policy().is_some()
    }

    fn policy(&self) -> Option<Arc<Policy>> {
        self.policy
            .as_ref()
            .map(|l| l.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Authenticates a RocketMQ client's call by its `MQv2-HMAC-SHA1`
    /// signature (see `petrel_proto::rmq_auth`): its user, `Anonymous` on
    /// a proxy without users, or `unauthenticated`. RocketMQ signatures
    /// carry no nonce, so a replay within the date's freshness is not
    /// caught (RocketMQ's own proxy does not catch it either); use TLS.
    pub fn rocketmq_user(
        &self,
        md: &tonic::metadata::MetadataMap,
        peer: Option<SocketAddr>,
    ) -> Result<Principal, PetrelError> {
        use petrel_proto::rmq_auth;
        let Some(policy) = self.policy() else {
            return Ok(Principal::Anonymous);
        };
        let bad = |m: String| PetrelError::Unauthenticated(m);
        let r = (|| {
            let header = md
                .get(sig::AUTHORIZATION_HEADER)
                .ok_or_else(|| {
                    bad("no credentials: this proxy requires a signed access key".into())
                })?
                .to_str()
                .map_err(|_| bad("the authorization header is not text".into()))?;
            let (ak, signature) = rmq_auth::parse(header).map_err(bad)?;
            let date = md
                .get(rmq_auth::DATE_HEADER)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| bad(format!("no {}", rmq_auth::DATE_HEADER)))?;
            let (name, states) = policy.rocketmq.get_key_value(ak).ok_or_else(|| {
                bad(format!(
                    "access key {ak:?} has no RocketMQ key (add the user again with \
                     `petrel user add` to let its RocketMQ clients sign in)"
                ))
            })?;
            if !rmq_auth::verify(states, date, &signature) {
                return Err(bad(format!(
                    "the signature does not match access key {ak:?} (wrong secret?)"
                )));
            }
            Ok(Arc::<str>::from(name.as_str()))
        })();
        let user = r.inspect_err(|e| self.refused(peer, None, e, "unauthenticated", None))?;
        Ok(Principal::User(user))
    }

    /// Authenticates a call and checks it may do every `(resource,
    /// action)` in `needs`.
    pub fn check<T>(
        &self,
        req: &tonic::Request<T>,
        needs: &[(Resource<'_>, Action)],
    ) -> Result<Principal, PetrelError> {
        let Some(policy) = self.policy() else {
            return Ok(Principal::Anonymous);
        };
        let peer = req.remote_addr();
        let verified = req.extensions().get::<Verified>().map(|v| v.0.clone());
        let user = match (
            verified,
            req.metadata().get(sig::AUTHORIZATION_HEADER),
            req.peer_certs(),
        ) {
            // Authenticated by another front end of this proxy (RocketMQ):
            // extensions are set in-process only, never from the wire.
            (Some(u), _, _) => Ok(u),
            // A verified client certificate stands in for a signed key.
            (None, None, Some(certs)) if !certs.is_empty() => {
                self.certificate_user(&policy, certs[0].as_ref())
            }
            _ => self.authenticate(&policy, req.metadata()),
        }
        .inspect_err(|e| self.refused(peer, None, e, "unauthenticated", None))?;
        for (res, action) in needs {
            self.permit_with(&policy, &user, peer.map(|a| a.ip()), *res, *action)?;
        }
        Ok(Principal::User(user))
    }

    /// Whether an authenticated user may do `action` on `res` (for calls
    /// that learn a resource late, e.g. from a message id, and for
    /// filtering lists).
    pub fn permits(
        &self,
        who: &Principal,
        peer: Option<SocketAddr>,
        res: Resource<'_>,
        action: Action,
    ) -> bool {
        match (self.policy(), who) {
            (None, _) => true,
            (Some(p), Principal::User(u)) => p.decide(u, peer.map(|a| a.ip()), res, action).is_ok(),
            (Some(_), Principal::Anonymous) => false,
        }
    }

    /// [`Auth::permits`], as the error a refused call gets.
    pub fn permit(
        &self,
        who: &Principal,
        peer: Option<SocketAddr>,
        res: Resource<'_>,
        action: Action,
    ) -> Result<(), PetrelError> {
        match (self.policy(), who) {
            (None, _) => Ok(()),
            (Some(p), Principal::User(u)) => {
                self.permit_with(&p, u, peer.map(|a| a.ip()), res, action)
            }
            (Some(_), Principal::Anonymous) => {
                Err(PetrelError::Unauthenticated("no credentials".into()))
            }
        }
    }

    fn permit_with(
        &self,
        p: &Policy,
        user: &Arc<str>,
        ip: Option<IpAddr>,
        res: Resource<'_>,
        action: Action,
    ) -> Result<(), PetrelError> {
        p.decide(user, ip, res, action).map_err(|rule| {
            let why = match rule {
                Some(id) => format!("rule {id} denies it"),
                None => "no rule allows it".to_string(),
            };
            let e = PetrelError::PermissionDenied(format!(
                "user {user:?} may not {} {res}: {why}",
                action.name()
            ));
            self.refused(None, Some(user), &e, "permission_denied", Some(action));
            e
        })
    }

    fn authenticate(
        &self,
        p: &Policy,
        md: &tonic::metadata::MetadataMap,
    ) -> Result<Arc<str>, PetrelError> {
        let bad = |m: &str| PetrelError::Unauthenticated(m.to_string());
        let header = md
            .get(sig::AUTHORIZATION_HEADER)
            .ok_or_else(|| bad("no credentials: this proxy requires a signed access key"))?
            .to_str()
            .map_err(|_| bad("the authorization header is not text"))?;
        let s = sig::parse_authorization(header).map_err(|e| bad(&e))?;
        let date: i64 = md
            .get(sig::DATE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("no x-petrel-date"))?;
        let now = petrel_proto::now_ms();
        if (now - date).unsigned_abs() > MAX_SKEW.as_millis() as u64 {
            return Err(bad(&format!(
                "a stale signature: signed at {date}, the proxy's clock says {now} (at most {}s apart)",
                MAX_SKEW.as_secs()
            )));
        }
        let (name, key) = p
            .users
            .get_key_value(s.access_key)
            .ok_or_else(|| bad(&format!("unknown access key {:?}", s.access_key)))?;
        if !sig::verify(key, &s, date) {
            return Err(bad(&format!(
                "the signature does not match access key {:?} (wrong secret?)",
                s.access_key
            )));
        }
        let (client, n) = sig::parse_nonce(s.nonce).ok_or_else(|| bad("malformed nonce"))?;
        let user: Arc<str> = Arc::from(name.as_str());
        self.accept_nonce(&user, client, n).map_err(bad)?;
        Ok(user)
    }

    /// The user a client certificate names (its subject's common name),
    /// which must be in the users file. The certificate was verified
    /// against `--tls-client-ca` in the handshake.
    fn certificate_user(&self, p: &Policy, der: &[u8]) -> Result<Arc<str>, PetrelError> {
        let bad = |m: String| PetrelError::Unauthenticated(m);
        let (_, x) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| bad(format!("unreadable client certificate: {e}")))?;
        let cn = x
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .ok_or_else(|| bad("the client certificate names no common name".into()))?;
        match p.users.get_key_value(cn) {
            Some((name, _)) => Ok(Arc::from(name.as_str())),
            None => Err(bad(format!(
                "the client certificate names {cn:?}, which is not a user"
            ))),
        }
    }

    fn accept_nonce(&self, user: &Arc<str>, client: u64, n: u64) -> Result<(), &'static str> {
        let key = (user.clone(), client);
        if let Some(mut w) = self.windows.get_mut(&key) {
            return w.accept(n);
        }
        if self.windows.len() >= MAX_CLIENTS {
            // Forget client instances idle for longer than a signature
            // stays fresh twice over: their old calls are stale anyway.
            let idle = MAX_SKEW * 2;
            self.windows.retain(|_, w| w.last.elapsed() < idle);
            if self.windows.len() >= MAX_CLIENTS {
                return Err("too many client instances signing at once; retry later");
            }
        }
        match self.windows.entry(key) {
            dashmap::Entry::Occupied(mut o) => o.get_mut().accept(n),
            dashmap::Entry::Vacant(v) => {
                v.insert(Window::new(n));
                Ok(())
            }
        }
    }

    /// Counts a refusal and logs it once per user (or address) a minute.
    fn refused(
        &self,
        peer: Option<SocketAddr>,
        user: Option<&Arc<str>>,
        e: &PetrelError,
        kind: &'static str,
        action: Option<Action>,
    ) {
        metrics::counter!(
            "petrel_proxy_auth_refusals_total",
            "kind" => kind,
            "action" => action.map(Action::name).unwrap_or("")
        )
        .increment(1);
        let who = match (user, peer) {
            (Some(u), _) => u.to_string(),
            (None, Some(p)) => p.ip().to_string(),
            (None, None) => "unknown".to_string(),
        };
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() > 10_000 {
            logged.retain(|_, t| t.elapsed() < LOG_EVERY);
        }
        let now = Instant::now();
        let due = logged.get(&who).is_none_or(|t| now - *t >= LOG_EVERY);
        if due {
            logged.insert(who.clone(), now);
            drop(logged);
            tracing::warn!(who = %who, error = %e, "call refused (logged once a minute per caller)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_b64(user: &str, secret: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(sig::signing_key(user, secret))
    }

    fn file() -> AuthFile {
        AuthFile {
            users: vec![
                UserEntry {
                    name: "alice".into(),
                    signing_key: key_b64("alice", "a"),
                    rocketmq_key: String::new(),
                },
                UserEntry {
                    name: "ops".into(),
                    signing_key: key_b64("ops", "o"),
                    rocketmq_key: String::new(),
                },
            ],
            rules: vec![
                RuleEntry {
                    id: 1,
                    user: "alice".into(),
                    resource: "topic:orders.*".into(),
                    actions: vec!["publish".into(), "describe".into()],
                    effect: "allow".into(),
                    source: None,
                },
                RuleEntry {
                    id: 2,
                    user: "alice".into(),
                    resource: "topic:orders.secret".into(),
                    actions: vec!["*".into()],
                    effect: "deny".into(),
                    source: None,
                },
                RuleEntry {
                    id: 3,
                    user: "ops".into(),
                    resource: "*".into(),
                    actions: vec!["*".into()],
                    effect: "allow".into(),
                    source: Some("10.0.0.0/8".into()),
                },
            ],
        }
    }

    #[test]
    fn deny_wins_and_nothing_is_allowed_without_a_rule() {
        let p = Policy::compile(&file()).unwrap();
        let t = Resource::Topic;
        assert!(p
            .decide("alice", None, t("orders.eu"), Action::Publish)
            .is_ok());
        assert_eq!(
            p.decide("alice", None, t("billing"), Action::Publish),
            Err(None)
        );
        assert_eq!(
            p.decide("alice", None, t("orders.eu"), Action::Delete),
            Err(None)
        );
        assert_eq!(
            p.decide("alice", None, t("orders.secret"), Action::Publish),
            Err(Some(2))
        );
        let inside = Some("10.1.2.3".parse().unwrap());
        let outside = Some("192.168.0.1".parse().unwrap());
        assert!(p
            .decide("ops", inside, Resource::Cluster, Action::Admin)
            .is_ok());
        assert!(p
            .decide("ops", outside, Resource::Cluster, Action::Admin)
            .is_err());
        assert!(p
            .decide("ops", None, Resource::Cluster, Action::Admin)
            .is_err());
        assert!(p
            .decide("mallory", inside, t("orders.eu"), Action::Publish)
            .is_err());
    }

    #[test]
    fn bad_files_are_refused_with_the_entry_named() {
        let mut f = file();
        f.rules[0].actions = vec!["fly".into()];
        assert!(Policy::compile(&f).unwrap_err().contains("rule 1"));
        let mut f = file();
        f.rules[1].user = "nobody".into();
        assert!(Policy::compile(&f).unwrap_err().contains("no user"));
        let mut f = file();
        f.rules[2].source = Some("ten".into());
        assert!(Policy::compile(&f).unwrap_err().contains("CIDR"));
        let mut f = file();
        f.users[1].signing_key = "short".into();
        assert!(Policy::compile(&f).unwrap_err().contains("32 bytes"));
        let mut f = file();
        f.rules[0].resource = "queue:x".into();
        assert!(Policy::compile(&f).is_err());
        assert!(AuthFile::parse("[[users]]\nname = 1\n").is_err());
        assert!(AuthFile::parse("surprise = true\n").is_err());
        // What is written parses back.
        assert_eq!(AuthFile::parse(&file().to_toml()).unwrap(), file());
    }

    #[test]
    fn glob_matches_runs_of_characters() {
        assert!(glob("orders.*", "orders.eu"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(!glob("orders.*", "billing"));
        assert!(glob("orders", "orders"));
        assert!(!glob("orders", "orders2"));
    }

    #[test]
    fn each_call_number_is_accepted_once_within_the_window() {
        let mut w = Window::new(10);
        assert_eq!(w.accept(10), Err("a replayed signature"));
        assert!(w.accept(12).is_ok());
        assert!(w.accept(11).is_ok(), "out of order within the window");
        assert!(w.accept(11).is_err());
        assert!(w.accept(10 + 5 * WINDOW_BITS).is_ok());
        assert!(w.accept(12).is_err(), "far behind");
        // Bits the window slid over are clear again.
        assert!(w.accept(10 + 5 * WINDOW_BITS - 1).is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, failure_persistence: None, ..Default::default() })]

        /// Whatever a users file or a proxy config file says: accepted, or
        /// refused with a reason; never a panic.
        #[test]
        fn any_file_text_is_accepted_or_refused_with_a_reason(
            text in proptest::prelude::prop_oneof![
                "[ -~\n]{0,200}",
                "\\[\\[(users|rules)\\]\\]\n(name|id|user|resource|actions|effect|source|signing_key|rocketmq_key) = (\"[a-z*:.]{0,8}\"|[0-9]{1,3}|\\[\"[a-z*]{0,6}\"\\])\n{1,3}",
                "(log|listen|brokers|max_wait|receipt_secret|auth_file) = (\"[ -~]{0,12}\"|[0-9]{1,4}|true)\n",
                "\\[(rate|receive)_limits(\\.(clients|groups|topics))?\\]\n(\"?[a-z:.0-9 ]{0,10}\"?|default_records_per_sec|per_client_records_per_sec) = (-?[0-9]{1,4}|\"x\")\n{1,2}",
            ]
        ) {
            if let Err(e) = AuthFile::parse(&text) {
                proptest::prop_assert!(!e.is_empty());
            }
            if let Err(e) = crate::config::parse_file(&text) {
                proptest::prop_assert!(!e.is_empty());
            }
        }
    }
}
