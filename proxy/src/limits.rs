//! Settings a proxy can change while running (from its `--config` TOML
//! file, re-read on SIGHUP): the log filter and per-topic rate limits.
//!
//! ```toml
//! log = "info"
//! [rate_limits]
//! default_records_per_sec = 0        # 0 = unlimited
//! [rate_limits.topics]
//! orders = 1000                      # records per second, across clients
//! ```
//!
//! A reload that does not parse or validate is rejected with a logged
//! reason and the running settings stay; connections are never dropped.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

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
}

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
        Ok(c)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// A token bucket: `rate` tokens per second, at most one second's worth.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-topic rate limiting under the current runtime settings.
#[derive(Debug, Default)]
pub struct Limiter {
    config: RwLock<Arc<RuntimeConfig>>,
    buckets: DashMap<String, Mutex<Bucket>>,
}

impl Limiter {
    pub fn new(config: RuntimeConfig) -> Self {
        Self {
            config: RwLock::new(Arc::new(config)),
            buckets: DashMap::new(),
        }
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
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    fn rate(&self, topic: &str) -> u64 {
        let c = self.config();
        c.rate_limits
            .topics
            .get(topic)
            .copied()
            .unwrap_or(c.rate_limits.default_records_per_sec)
    }

    /// Admits `n` records to `topic`, or refuses them all with a retryable
    /// `rate_limited` error saying when to come back.
    pub fn admit(&self, topic: &str, n: u64) -> Result<(), PetrelError> {
        let rate = self.rate(topic);
        if rate == 0 {
            return Ok(());
        }
        let cap = rate as f64;
        let now = Instant::now();
        let entry = self.buckets.entry(topic.to_string()).or_insert_with(|| {
            Mutex::new(Bucket {
                tokens: cap,
                at: now,
            })
        });
        let mut b = entry.lock().unwrap_or_else(|e| e.into_inner());
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * cap).min(cap);
        b.at = now;
        // A request larger than a second's worth passes when the bucket is
        // full, so it is never refused forever.
        let need = (n as f64).min(cap);
        if b.tokens >= need {
            b.tokens -= n as f64;
            return Ok(());
        }
        metrics::counter!("petrel_proxy_rate_limited_total", "topic" => topic.to_string())
            .increment(1);
        let wait_ms = ((need - b.tokens) / cap * 1000.0).ceil() as u64;
        Err(PetrelError::RateLimited(format!(
            "topic {topic:?} is limited to {rate} records/s; retry in {wait_ms} ms"
        )))
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
        assert!(l.admit("t", 10).is_ok());
        assert!(matches!(l.admit("t", 5), Err(PetrelError::RateLimited(_))));
        assert!(
            l.admit("other", 1_000_000).is_ok(),
            "unlisted topics are unlimited"
        );
        c.rate_limits.topics.insert("t".into(), 0);
        l.replace(c);
        assert!(l.admit("t", 1_000).is_ok());
    }
}
