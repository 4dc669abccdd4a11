//! Settings a proxy can change while running (from its `--config` TOML
//! file, re-read on SIGHUP and whenever it changes): the log filter and
//! per-topic and per-client rate limits.
//!
//! ```toml
//! log = "info"
//! [rate_limits]
//! default_records_per_sec = 0        # topics not listed; 0 = unlimited
//! per_client_records_per_sec = 0     # each client not listed; 0 = unlimited
//! [rate_limits.topics]
//! orders = 1000                      # records per second, all clients together
//! [rate_limits.clients]
//! "billing-1" = 50                   # records per second for this producer id
//! [receive_limits]
//! default_records_per_sec = 0        # per consumer group not listed; 0 = unlimited
//! per_client_records_per_sec = 0     # each client not listed; 0 = unlimited
//! [receive_limits.groups]
//! reports = 500                      # records per second, all its consumers together
//! [receive_limits.clients]
//! "alice" = 100                      # records per second received by this user
//! ```
//!
//! Receive limits count records delivered. A client there is its user, or
//! its address (`ip:ADDRESS`, which also bounds every user at it). A
//! receive is refused (`rate_limited`, retryable) only when a bucket that
//! applies is empty; otherwise it asks the broker for no more records than
//! the emptiest bucket holds, and what it gets is taken afterwards (long
//! polls hold no tokens while they wait).
//!
//! A client is named by the producer id its sends carry
//! (`Producer::builder().producer_id(..)`, `petrel produce --producer-id`)
//! or by its address (`ip:10.0.0.7`). An id limit applies to that id; an
//! address limit to every send from the address, whatever ids it uses
//! (producer ids are chosen by clients, addresses are not); the per-client
//! default applies to each id, and to each address whose sends carry no id.
//! Limits are per proxy: with N proxies a client may get up to N times its
//! limit. A send must pass every limit that applies; a refused send takes
//! no tokens and gets the retryable `rate_limited` error.
//!
//! Buckets hold one second of tokens. A request larger than that passes
//! when its bucket is full and leaves it in debt, so the long-run rate holds
//! and a big batch is never refused forever; the next sends wait it out.
//!
//! A reload that does not parse or validate is rejected with a logged
//! reason and the running settings stay; connections are never dropped.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use petrel_proto::{validate, PetrelError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Log filter (e.g. `info`, `petrel_proxy=debug`); unset = the flag's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    #[serde(default)]
    pub rate_limits: RateLimits,
    #[serde(default)]
    pub receive_limits: ReceiveLimits,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveLimits {
    /// Records per second for each consumer group not listed (0 =
    /// unlimited).
    #[serde(default)]
    pub default_records_per_sec: u64,
    /// Records per second per consumer group, all its consumers together.
    #[serde(default)]
    pub groups: BTreeMap<String, u64>,
    /// Records per second for each client not listed (0 = unlimited).
    #[serde(default)]
    pub per_client_records_per_sec: u64,
    /// Records per second per client: a user name, or `ip:ADDRESS`.
    #[serde(default)]
    pub clients: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Records per second for topics not listed (0 = unlimited).
    #[serde(default)]
    pub default_records_per_sec: u64,
    /// Records per second per topic (0 = unlimited).
    #[serde(default)]
    pub topics: BTreeMap<String, u64>,
    /// Records per second for each client not listed (0 = unlimited).
    #[serde(default)]
    pub per_client_records_per_sec: u64,
    /// Records per second per client: producer id, or `ip:ADDRESS`
    /// (0 = unlimited).
    #[serde(default)]
    pub clients: BTreeMap<String, u64>,
    /// Whether `clients` names any address (set by the [`Limiter`] that
    /// takes this config, so a send need not look).
    #[serde(skip)]
    pub has_ip_limits: bool,
}

/// Longest client key accepted in the file (producer ids are at most 128).
const MAX_CLIENT_KEY: usize = 160;

impl RuntimeConfig {
    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: RuntimeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(l) = &c.log {
            tracing_subscriber::EnvFilter::try_new(l)
                .map_err(|e| format!("log filter {l:?}: {e}"))?;
        }
        for t in c.rate_limits.topics.keys() {
            validate::topic_name(t).map_err(|e| format!("rate_limits.topics: {e}"))?;
        }
        for k in c.rate_limits.clients.keys() {
            let ok = match k.strip_prefix("ip:") {
                Some(ip) => ip.parse::<std::net::IpAddr>().is_ok(),
                None => {
                    validate::producer_id(k).is_ok()
                        && !k.is_empty()
                        && !k.chars().any(char::is_control)
                }
            };
            if !ok || k.len() > MAX_CLIENT_KEY {
                return Err(format!(
                    "rate_limits.clients: {k:?} is neither a producer id nor ip:ADDRESS"
                ));
            }
        }
        for g in c.receive_limits.groups.keys() {
            validate::group_name(g).map_err(|e| format!("receive_limits.groups: {e}"))?;
        }
        for k in c.receive_limits.clients.keys() {
            let ok = match k.strip_prefix("ip:") {
                Some(ip) => ip.parse::<std::net::IpAddr>().is_ok(),
                None => !k.is_empty() && !k.chars().any(|c| c.is_control() || c.is_whitespace()),
            };
            if !ok || k.len() > MAX_CLIENT_KEY {
                return Err(format!(
                    "receive_limits.clients: {k:?} is neither a user name nor ip:ADDRESS"
                ));
            }
        }
        Ok(c)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        Self::parse(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// Reads a config file, naming it in the error.
pub fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A token bucket: `rate` tokens per second, at most one second's worth.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key (topic, producer id or `ip:ADDR`).
type Buckets = DashMap<String, Mutex<Bucket>>;

/// Most client buckets kept before idle ones are dropped. A bucket idle for
/// a second is full, so dropping it changes nothing.
const MAX_CLIENT_BUCKETS: usize = 10_000;

/// Per-topic and per-client rate limiting under the current runtime settings.
#[derive(Debug, Default)]
pub struct Limiter {
    config: RwLock<Arc<RuntimeConfig>>,
    topics: Buckets,
    clients: Buckets,
    /// Receive buckets: per consumer group, per user or `ip:ADDR`.
    receive_groups: Buckets,
    receive_clients: Buckets,
}

/// Takes `n` tokens from `key`'s bucket at `rate`/s, or says how long to
/// wait. A request larger than a second's worth passes when the bucket is
/// full, so it is never refused forever.
fn take(map: &Buckets, key: &str, rate: u64, n: u64, now: Instant) -> Result<(), u64> {
    let cap = rate as f64;
    with_bucket(map, key, rate, now, |b| {
        let need = (n as f64).min(cap);
        if b.tokens >= need {
            b.tokens -= n as f64;
            Ok(())
        } else {
            Err(((need - b.tokens) / cap * 1000.0).ceil() as u64)
        }
    })
}

/// The tokens in `key`'s bucket now (refilled at `rate`/s, at most one
/// second's worth; negative while in debt).
fn peek(map: &Buckets, key: &str, rate: u64, now: Instant) -> f64 {
    with_bucket(map, key, rate, now, |b| b.tokens)
}

/// Runs `f` on `key`'s bucket (made full if new), refilled at `rate`/s up
/// to `now`.
fn with_bucket<T>(
    map: &Buckets,
    key: &str,
    rate: u64,
    now: Instant,
    f: impl FnOnce(&mut Bucket) -> T,
) -> T {
    let cap = rate as f64;
    let entry = match map.get(key) {
        Some(e) => e,
        None => map
            .entry(key.to_string())
            .or_insert_with(|| {
                Mutex::new(Bucket {
                    tokens: cap,
                    at: now,
                })
            })
            .downgrade(),
    };
    let mut b = entry.lock().unwrap_or_else(|e| e.into_inner());
    b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * cap).min(cap);
    b.at = now;
    f(&mut b)
}

/// Forgets buckets idle for a second (full again) once there are many.
fn trim(map: &Buckets, now: Instant) {
    if map.len() >= MAX_CLIENT_BUCKETS {
        map.retain(|_, b| {
            now.duration_since(b.get_mut().unwrap_or_else(|e| e.into_inner()).at)
                < Duration::from_secs(1)
        });
    }
}

fn give_back(map: &Buckets, key: &str, n: u64) {
    if let Some(e) = map.get(key) {
        e.lock().unwrap_or_else(|e| e.into_inner()).tokens += n as f64;
    }
}

impl Limiter {
    pub fn new(config: RuntimeConfig) -> Self {
        Self {
            config: RwLock::new(Arc::new(Self::prepare(config))),
            ..Default::default()
        }
    }

    fn prepare(mut c: RuntimeConfig) -> RuntimeConfig {
        c.rate_limits.has_ip_limits = c.rate_limits.clients.keys().any(|k| k.starts_with("ip:"));
        c
    }

    pub fn config(&self) -> Arc<RuntimeConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes effect for the next request; buckets keep their tokens (capped
    /// to the new rate).
    pub fn replace(&self, config: RuntimeConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Self::prepare(config));
    }

    /// Admits `n` records to `topic` from a producer (its id; empty = none)
    /// at address `ip`, or refuses them all with a retryable `rate_limited`
    /// error saying which limit and when to come back. Every limit that
    /// applies must pass: the producer id's (listed, else the per-client
    /// default), the address's (`ip:ADDR` listed; the per-client default
    /// too when the send carries no producer id) and the topic's. A refusal
    /// gives back what the earlier limits took.
    pub fn admit(
        &self,
        topic: &str,
        producer_id: &str,
        ip: Option<std::net::IpAddr>,
        n: u64,
    ) -> Result<(), PetrelError> {
        let c = self.config();
        let l = &c.rate_limits;
        // Sends are the hot path: with no limit that applies, admit without
        // building a key or touching a bucket.
        let mut checks: Vec<(&Buckets, std::borrow::Cow<'_, str>, u64, &'static str)> = Vec::new();
        if !producer_id.is_empty() {
            let rate = l
                .clients
                .get(producer_id)
                .copied()
                .unwrap_or(l.per_client_records_per_sec);
            if rate > 0 {
                checks.push((&self.clients, producer_id.into(), rate, "client"));
            }
        }
        if let Some(ip) = ip {
            if l.has_ip_limits || (producer_id.is_empty() && l.per_client_records_per_sec > 0) {
                let key = format!("ip:{ip}");
                let rate = match l.clients.get(&key) {
                    Some(r) => *r,
                    None if producer_id.is_empty() => l.per_client_records_per_sec,
                    None => 0,
                };
                if rate > 0 {
                    checks.push((&self.clients, key.into(), rate, "client"));
                }
            }
        }
        let topic_rate = l
            .topics
            .get(topic)
            .copied()
            .unwrap_or(l.default_records_per_sec);
        if topic_rate > 0 {
            checks.push((&self.topics, topic.into(), topic_rate, "topic"));
        }
        if checks.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        trim(&self.clients, now);
        for (i, (map, key, rate, kind)) in checks.iter().enumerate() {
            if let Err(wait_ms) = take(map, key, *rate, n, now) {
                for (map, key, _, _) in &checks[..i] {
                    give_back(map, key, n);
                }
                metrics::counter!("petrel_proxy_rate_limited_total", "topic" => topic.to_string(), "limit" => *kind)
                    .increment(1);
                let who = if *kind == "topic" { "topic" } else { "client" };
                return Err(PetrelError::RateLimited(format!(
                    "{who} {key:?} is limited to {rate} records/s; retry in {wait_ms} ms"
                )));
            }
        }
        Ok(())
    }
}

/// One receive's pass through the receive limits: how many records it may
/// ask for, and the buckets to charge for what it gets.
#[derive(Debug, Default)]
pub struct ReceiveAllowance {
    pub max: u32,
    charge: Vec<(bool, String)>,
}

impl Limiter {
    /// The receive limits that apply to a receive by `user` (None:
    /// anonymous) at `ip` for consumer group `group`: (is a group bucket,
    /// key, rate).
    fn receive_checks(
        l: &ReceiveLimits,
        group: &str,
        user: Option<&str>,
        ip: Option<std::net::IpAddr>,
    ) -> Vec<(bool, String, u64)> {
        let mut out = Vec::new();
        let group_rate = l
            .groups
            .get(group)
            .copied()
            .unwrap_or(l.default_records_per_sec);
        if group_rate > 0 {
            out.push((true, group.to_string(), group_rate));
        }
        if let Some(u) = user {
            let rate = l
                .clients
                .get(u)
                .copied()
                .unwrap_or(l.per_client_records_per_sec);
            if rate > 0 {
                out.push((false, u.to_string(), rate));
            }
        }
        if let Some(ip) = ip {
            let key = format!("ip:{ip}");
            let rate = match l.clients.get(&key) {
                Some(r) => *r,
                None if user.is_none() => l.per_client_records_per_sec,
                None => 0,
            };
            if rate > 0 {
                out.push((false, key, rate));
            }
        }
        out
    }

    /// Admits a receive of up to `max` records, or refuses it with a
    /// retryable `rate_limited` error naming the limit and when to come
    /// back. Charge what it delivered with [`Limiter::received`].
    pub fn admit_receive(
        &self,
        group: &str,
        user: Option<&str>,
        ip: Option<std::net::IpAddr>,
        max: u32,
    ) -> Result<ReceiveAllowance, PetrelError> {
        let c = self.config();
        let l = &c.receive_limits;
        if l.groups.is_empty()
            && l.clients.is_empty()
            && l.default_records_per_sec == 0
            && l.per_client_records_per_sec == 0
        {
            return Ok(ReceiveAllowance {
                max,
                charge: Vec::new(),
            });
        }
        let now = Instant::now();
        trim(&self.receive_clients, now);
        let mut allowance = ReceiveAllowance {
            max,
            charge: Vec::new(),
        };
        for (is_group, key, rate) in Self::receive_checks(l, group, user, ip) {
            let map = if is_group {
                &self.receive_groups
            } else {
                &self.receive_clients
            };
            let tokens = peek(map, &key, rate, now);
            if tokens < 1.0 {
                metrics::counter!("petrel_proxy_limit_refusals_total", "limit" => "receive_rate")
                    .increment(1);
                let wait_ms = ((1.0 - tokens) / rate as f64 * 1000.0).ceil() as u64;
                let who = if is_group { "consumer group" } else { "client" };
                return Err(PetrelError::RateLimited(format!(
                    "{who} {key:?} may receive {rate} records/s; retry in {wait_ms} ms"
                )));
            }
            allowance.max = allowance
                .max
                .min(tokens.floor().min(u32::MAX as f64) as u32);
            allowance.charge.push((is_group, key));
        }
        Ok(allowance)
    }

    /// Takes `n` delivered records from the buckets `a` was admitted by
    /// (a bucket may go into debt when receives overlap).
    pub fn received(&self, a: &ReceiveAllowance, n: u64) {
        if n == 0 {
            return;
        }
        for (is_group, key) in &a.charge {
            let map = if *is_group {
                &self.receive_groups
            } else {
                &self.receive_clients
            };
            if let Some(e) = map.get(key) {
                e.lock().unwrap_or_else(|e| e.into_inner()).tokens -= n as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_validates_and_rejects_garbage() {
        let c = RuntimeConfig::parse(
            "log = \"debug\"\n[rate_limits]\ndefault_records_per_sec = 5\n[rate_limits.topics]\norders = 10\n",
        )
        .unwrap();
        assert_eq!(c.rate_limits.topics["orders"], 10);
        assert_eq!(RuntimeConfig::parse(&c.to_toml()).unwrap(), c);
        for bad in [
            "rate_limits = 3",
            "[rate_limits]\nbogus = 1",
            "[rate_limits.topics]\n\"bad name!\" = 1",
            "[rate_limits.topics]\norders = -1",
            "log = \"=[\"",
            "unknown = true",
        ] {
            assert!(RuntimeConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_per_topic_and_follows_a_replace() {
        let mut c = RuntimeConfig::default();
        c.rate_limits.topics.insert("t".into(), 10);
        let l = Limiter::new(c.clone());
        assert!(l.admit("t", "a", None, 10).is_ok());
        assert!(matches!(
            l.admit("t", "b", None, 5),
            Err(PetrelError::RateLimited(_))
        ));
        assert!(
            l.admit("other", "a", None, 1_000_000).is_ok(),
            "unlisted topics are unlimited"
        );
        c.rate_limits.topics.insert("t".into(), 0);
        l.replace(c);
        assert!(l.admit("t", "a", None, 1_000).is_ok());
    }

    #[test]
    fn limits_per_client_and_a_refusal_takes_no_tokens() {
        let mut c = RuntimeConfig::parse(
            "[rate_limits]\nper_client_records_per_sec = 10\n[rate_limits.clients]\nbig = 100\n[rate_limits.topics]\nt = 50\n",
        )
        .unwrap();
        let l = Limiter::new(c.clone());
        assert!(l.admit("u", "small", None, 10).is_ok());
        match l.admit("u", "small", None, 1) {
            Err(PetrelError::RateLimited(m)) => assert!(m.contains("client \"small\""), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(
            l.admit("u", "other", None, 10).is_ok(),
            "each client has its own bucket"
        );
        // "big" may send 100/s, but topic t allows only 50/s: the topic
        // refuses, and the client's tokens are given back.
        assert!(l.admit("t", "big", None, 50).is_ok());
        match l.admit("t", "big", None, 40) {
            Err(PetrelError::RateLimited(m)) => assert!(m.contains("topic \"t\""), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(
            l.admit("u", "big", None, 50).is_ok(),
            "the refused 40 were given back"
        );
        c.rate_limits.per_client_records_per_sec = 0;
        l.replace(c);
        assert!(l.admit("u", "small", None, 1_000).is_ok());
        // An address limit holds whatever producer ids the sends carry.
        let l = Limiter::new(
            RuntimeConfig::parse("[rate_limits.clients]\n\"ip:10.0.0.7\" = 5\n").unwrap(),
        );
        let ip: Option<std::net::IpAddr> = Some("10.0.0.7".parse().unwrap());
        assert!(l.admit("u", "id-1", ip, 5).is_ok());
        match l.admit("u", "id-2", ip, 1) {
            Err(PetrelError::RateLimited(m)) => assert!(m.contains("ip:10.0.0.7"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(l
            .admit("u", "id-2", Some("10.0.0.8".parse().unwrap()), 100)
            .is_ok());
        for bad in [
            "[rate_limits.clients]\n\"ip:notanip\" = 1",
            "[rate_limits.clients]\n\"tab\\there\" = 1",
            "[rate_limits.clients]\n\"\" = 1",
            "[rate_limits.clients]\nx = -1",
            "[rate_limits]\nper_client_records_per_sec = \"fast\"",
        ] {
            assert!(RuntimeConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn receives_are_limited_by_group_and_client_and_charged_what_they_got() {
        let c = RuntimeConfig::parse(
            "[receive_limits]\nper_client_records_per_sec = 10\n[receive_limits.groups]\ng = 25\n[receive_limits.clients]\n\"ip:10.0.0.7\" = 3\n",
        )
        .unwrap();
        let l = Limiter::new(c);
        // Alice may take 10 now: the allowance caps the ask.
        let a = l.admit_receive("g", Some("alice"), None, 32).unwrap();
        assert_eq!(a.max, 10);
        l.received(&a, 10);
        match l.admit_receive("g", Some("alice"), None, 32) {
            Err(PetrelError::RateLimited(m)) => assert!(m.contains("\"alice\""), "{m}"),
            other => panic!("{other:?}"),
        }
        // Bob has his own bucket; the group's 25 are shared.
        let b = l.admit_receive("g", Some("bob"), None, 32).unwrap();
        assert_eq!(b.max, 10);
        l.received(&b, 10);
        let e = l.admit_receive("g", Some("eve"), None, 32).unwrap();
        assert_eq!(e.max, 5, "the group has 5 left");
        l.received(&e, 5);
        match l.admit_receive("g", Some("carol"), None, 1) {
            Err(PetrelError::RateLimited(m)) => assert!(m.contains("consumer group \"g\""), "{m}"),
            other => panic!("{other:?}"),
        }
        // A receive that got nothing takes nothing; other groups are free.
        let o = l.admit_receive("other", Some("dave"), None, 4).unwrap();
        l.received(&o, 0);
        assert_eq!(
            l.admit_receive("other", Some("dave"), None, 4).unwrap().max,
            4
        );
        // An address limit bounds every user at it.
        let ip = Some("10.0.0.7".parse().unwrap());
        assert_eq!(l.admit_receive("h", Some("x"), ip, 50).unwrap().max, 3);
        // No receive limits: the ask goes through untouched.
        let free = Limiter::new(RuntimeConfig::default());
        assert_eq!(free.admit_receive("g", None, None, 77).unwrap().max, 77);
        for bad in [
            "[receive_limits.groups]\n\"bad group!\" = 1",
            "[receive_limits.clients]\n\"two words\" = 1",
            "[receive_limits.clients]\n\"ip:nope\" = 1",
            "[receive_limits]\nbogus = 1",
        ] {
            assert!(RuntimeConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
