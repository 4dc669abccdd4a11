//! `petrel cluster`: describe the brokers and leadership, and the broker
//! admin calls (rebalance, add, drain, undrain, remove).

use super::format::id_or_dash;
use super::CliResult;
use crate::output::{json_line, line, Table};
use clap::Subcommand;
use petrel_sdk::Client;
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Show brokers (address, state, reachability, meta voter, leader and
    /// replica counts) and the meta-group leader.
    Describe,
    /// Balance queue leaderships over the brokers now (the controller also
    /// does it on its own every few seconds).
    Rebalance,
    /// Register a new broker; start it with `petrel-broker --join` (or
    /// `--peers`). New queues and moved replicas can then go to it.
    AddBroker {
        /// The new broker's id (a positive integer unused in the cluster).
        id: u64,
        /// Address the broker advertises, HOST:PORT.
        address: String,
    },
    /// Move every replica and leadership off a broker so it can be removed.
    /// Returns at once; `cluster describe` shows its counts fall to zero.
    Drain {
        /// Broker id.
        broker: u64,
    },
    /// Make a drained broker eligible for replicas and leaderships again.
    Undrain {
        /// Broker id.
        broker: u64,
    },
    /// Forget a broker that holds no replicas (drain it first).
    RemoveBroker {
        /// Broker id.
        broker: u64,
    },
}

pub(super) async fn cluster(client: &Client, json: bool) -> CliResult {
    let c = client.admin().describe_cluster().await?;
    if json {
        return Ok(json_line(&json!({
            "meta_leader": c.meta_leader,
            "topic_count": c.topic_count,
            "queue_count": c.queue_count,
            "map_version": c.map_version,
            "brokers": c.brokers.iter().map(|b| json!({
                "id": b.id,
                "address": b.address,
                "reachable": b.reachable,
                "leader_count": b.leader_count,
                "replica_count": b.replica_count,
                "state": b.state,
                "meta_voter": b.meta_voter,
            })).collect::<Vec<_>>(),
        }))?);
    }
    line(&format!(
        "meta leader: {}   topics: {}   queues: {}   map version: {}",
        id_or_dash(c.meta_leader),
        c.topic_count,
        c.queue_count,
        c.map_version
    ))?;
    line("")?;
    let mut tab = Table::new(&[
        "ID",
        "ADDRESS",
        "STATE",
        "REACHABLE",
        "META",
        "LEADERS",
        "REPLICAS",
    ]);
    for b in c.brokers {
        tab.row(vec![
            b.id.to_string(),
            b.address,
            b.state,
            if b.reachable { "yes" } else { "no" }.to_string(),
            if b.meta_voter { "voter" } else { "learner" }.to_string(),
            b.leader_count.to_string(),
            b.replica_count.to_string(),
        ]);
    }
    Ok(tab.print()?)
}

pub(super) async fn cluster_admin(client: &Client, cmd: ClusterCmd, json: bool) -> CliResult {
    let admin = client.admin();
    let (r, what) = match cmd {
        ClusterCmd::Describe => unreachable!("handled by cluster()"),
        ClusterCmd::Rebalance => (admin.rebalance().await?, "rebalance".to_string()),
        ClusterCmd::AddBroker { id, address } => (
            admin.add_broker(id, address.clone()).await?,
            format!("added broker {id} at {address}"),
        ),
        ClusterCmd::Drain { broker } => (
            admin.drain_broker(broker).await?,
            format!("draining broker {broker}"),
        ),
        ClusterCmd::Undrain { broker } => (
            admin.undrain_broker(broker).await?,
            format!("broker {broker} is active again"),
        ),
        ClusterCmd::RemoveBroker { broker } => (
            admin.remove_broker(broker).await?,
            format!("removed broker {broker}"),
        ),
    };
    if json {
        return Ok(json_line(&json!({
            "ok": true,
            "map_version": r.map_version,
            "moves": r.moves,
        }))?);
    }
    if what == "rebalance" {
        Ok(line(&format!("started {} leadership moves", r.moves))?)
    } else {
        Ok(line(&what)?)
    }
}
