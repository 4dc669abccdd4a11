//! The proxy's cached route table: topics and their queue groups from the
//! cluster map, and which broker leads each group. Refreshed from every
//! known broker periodically and at once when a request meets a stale
//! leader; a not-leader hint updates it immediately.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::broker_data_client::BrokerDataClient;
use petrel_proto::PetrelError;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Largest gRPC message exchanged with brokers.
pub const MAX_BROKER_MESSAGE: usize = 64 << 20;
const ROUTES_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub map_version: u64,
    pub brokers: HashMap<u64, String>,
    /// Shared between refreshes while the map version stays the same.
    pub topics: Arc<HashMap<String, bpb::TopicRoute>>,
    /// group → (leader broker, term)
    pub leaders: HashMap<u64, (u64, u64)>,
    pub meta_leader: u64,
    /// Brokers that answered the last refresh.
    pub reachable: HashMap<u64, bool>,
    /// Brokers being drained.
    pub draining: std::collections::HashSet<u64>,
    /// Voters of the meta group (as its leader reports them).
    pub meta_voters: Vec<u64>,
}

impl RouteTable {
    pub fn topic(&self, name: &str) -> Option<&bpb::TopicRoute> {
        self.topics.get(name)
    }

    /// Ready to route: some broker answered and the meta group has a leader.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.reachable.values().any(|r| *r) {
            return Err("no broker reachable yet".into());
        }
        if self.meta_leader == 0 {
            return Err("no meta leader known yet".into());
        }
        Ok(())
    }
}

/// Shared channels to brokers, by address.
#[derive(Clone, Default)]
pub struct Channels {
    /// Per broker address: the TLS generation it was dialed with, and the
    /// channel.
    by_addr: Arc<DashMap<String, (u64, Channel)>>,
    /// Mutual TLS to brokers (the proxy's cluster certificate and CA).
    tls: Option<Arc<petrel_proto::tls::ClientTls>>,
}

impl Channels {
    pub fn client(&self, addr: &str) -> Result<BrokerDataClient<Channel>, PetrelError> {
        let gen = self.tls.as_ref().map_or(0, |t| t.generation());
        let cached = self
            .by_addr
            .get(addr)
            .filter(|c| c.0 == gen)
            .map(|c| c.1.clone());
        let ch = match cached {
            Some(c) => c,
            None => {
                let bad = |e: &dyn std::fmt::Display| {
                    PetrelError::Internal(format!("bad broker address {addr:?}: {e}"))
                };
                let mut ep =
                    Endpoint::from_shared(petrel_proto::tls::uri(addr, self.tls.is_some()))
                        .map_err(|e| bad(&e))?;
                if let Some(t) = &self.tls {
                    ep = ep.tls_config(t.config()).map_err(|e| bad(&e))?;
                }
                let ch = ep
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .initial_stream_window_size(petrel_proto::transport::STREAM_WINDOW)
                    .initial_connection_window_size(petrel_proto::transport::CONNECTION_WINDOW)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                self.by_addr.insert(addr.to_string(), (gen, ch.clone()));
                ch
            }
        };
        Ok(BrokerDataClient::new(ch)
            .max_decoding_message_size(MAX_BROKER_MESSAGE)
            .max_encoding_message_size(MAX_BROKER_MESSAGE))
    }
}

pub struct Router {
    seeds: Vec<String>,
    table: RwLock<Arc<RouteTable>>,
    pub channels: Channels,
    wake: Notify,
    refreshed: Notify,
}

impl Router {
    pub fn new(seeds: Vec<String>, tls: Option<Arc<petrel_proto::tls::ClientTls>>) -> Arc<Self> {
        Arc::new(Self {
            seeds,
            table: RwLock::new(Arc::new(RouteTable::default())),
            channels: Channels {
                tls,
                ..Channels::default()
            },
            wake: Notify::new(),
            refreshed: Notify::new(),
        })
    }

    /// The broker addresses the proxy was started with (`--brokers`).
    pub fn seeds(&self) -> &[String] {
        &self.seeds
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks the refresher to refresh now (non-blocking).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Asks for a refresh and waits for it (bounded).
    pub async fn refresh_now(&self) {
        let done = self.refreshed.notified();
        self.poke();
        let _ = tokio::time::timeout(ROUTES_TIMEOUT * 2, done).await;
    }

    /// Records a not-leader hint.
    pub fn hint_leader(&self, group: u64, leader: u64) {
        let mut g = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut t = (**g).clone();
        let term = t.leaders.get(&group).map(|x| x.1).unwrap_or(0);
        t.leaders.insert(group, (leader, term));
        *g = Arc::new(t);
    }

    pub fn leader_addr(&self, group: u64) -> Option<(u64, String)> {
        let t = self.table();
        let (b, _) = t.leaders.get(&group)?;
        Some((*b, t.brokers.get(b)?.clone()))
    }

    pub async fn run(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        loop {
            self.refresh().await;
            self.refreshed.notify_waiters();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    async fn refresh(&self) {
        metrics::counter!("petrel_proxy_route_refreshes_total").increment(1);
        let old = self.table();
        let mut addrs: Vec<(Option<u64>, String)> =
            self.seeds.iter().map(|s| (None, s.clone())).collect();
        for (id, a) in &old.brokers {
            if !self.seeds.contains(a) {
                addrs.push((Some(*id), a.clone()));
            }
        }
        let known_map_version = old.map_version;
        let futs = addrs.iter().map(|(_, a)| {
            let c = self.channels.client(a);
            async move {
                let mut c = c?;
                let mut req = tonic::Request::new(bpb::RoutesRequest { known_map_version });
                req.set_timeout(ROUTES_TIMEOUT);
                match tokio::time::timeout(ROUTES_TIMEOUT, c.routes(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(s)) => Err(PetrelError::from_status(&s)),
                    Err(_) => Err(PetrelError::Timeout("routes".into())),
                }
            }
        });
        let results = futures::future::join_all(futs).await;
        let mut t = RouteTable::default();
        let mut best: Option<&bpb::RoutesResponse> = None;
        let mut any = false;
        for (r, (id, addr)) in results.iter().zip(&addrs) {
            match r {
                Ok(r) => {
                    any = true;
                    t.reachable.insert(r.broker_id, true);
                    if best.map(|b| r.map_version > b.map_version).unwrap_or(true) {
                        best = Some(r);
                    }
                    for c in &r.leading {
                        let cur = t.leaders.get(&c.group_id).map(|x| x.1);
                        if cur.map(|term| c.term >= term).unwrap_or(true) {
                            t.leaders.insert(c.group_id, (r.broker_id, c.term));
                        }
                    }
                    if r.meta_leader != 0 {
                        t.meta_leader = r.meta_leader;
                    }
                    if t.meta_voters.is_empty() || r.broker_id == r.meta_leader {
                        t.meta_voters = r.meta_voters.clone();
                    }
                }
                Err(e) => {
                    if let Some(id) = id {
                        t.reachable.insert(*id, false);
                    }
                    tracing::debug!(broker = %addr, error = %e, "route refresh failed");
                }
            }
        }
        if !any {
            // Keep the old table: better stale routes than none.
            return;
        }
        if let Some(b) = best.filter(|b| b.map_unchanged) {
            // Nobody has a newer map than ours: keep it.
            t.map_version = b.map_version;
            t.brokers = old.brokers.clone();
            t.draining = old.draining.clone();
            t.topics = old.topics.clone();
        } else if let Some(b) = best {
            t.map_version = b.map_version;
            t.brokers = b
                .brokers
                .iter()
                .map(|x| (x.id, x.address.clone()))
                .collect();
            t.draining = b
                .brokers
                .iter()
                .filter(|x| x.draining)
                .map(|x| x.id)
                .collect();
            t.topics = Arc::new(
                b.topics
                    .iter()
                    .filter_map(|tr| Some((tr.config.as_ref()?.name.clone(), tr.clone())))
                    .collect(),
            );
        }
        for id in t.brokers.keys() {
            t.reachable.entry(*id).or_insert(false);
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(t);
    }
}
