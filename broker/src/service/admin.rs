//! Cluster administration over `BrokerData`: meta writes (validated here,
//! forwarded to the meta leader when this broker is not it), routes and
//! fault injection.

use petrel_proto::pb::broker as bpb;
use petrel_proto::pb::broker::broker_data_client::BrokerDataClient;
use petrel_proto::{validate, PetrelError};
use tonic::{Request, Response as TResponse};

use super::{Service, R};
use crate::meta::topic_route;
use crate::node::{GroupHandle, Node};
use crate::types::{Command, META_GROUP};

const FORWARDED: &str = "x-petrel-forwarded";

/// Largest broker id (ids come from configuration, e.g. pod ordinals).
pub const MAX_BROKER_ID: u64 = u32::MAX as u64;

impl Service {
    async fn meta_write(
        &self,
        req: bpb::MetaWriteRequest,
    ) -> Result<bpb::MetaWriteResponse, PetrelError> {
        let meta = self.node.meta();
        let h = GroupHandle::new(meta.clone(), None);
        let map = self.node.map_rx.borrow().clone();
        let (cmd, name) = match req.op {
            None => return Err(PetrelError::InvalidArgument("empty meta write".into())),
            Some(bpb::meta_write_request::Op::CreateTopic(c)) => {
                let (spec, placements) =
                    map.plan_create_topic(&c, self.node.config.peers.keys().copied())?;
                (
                    Command::CreateTopic {
                        spec,
                        placements,
                        now_ms: petrel_proto::now_ms(),
                    },
                    c.name,
                )
            }
            Some(bpb::meta_write_request::Op::UpdateTopic(u)) => {
                let (target_queue_count, add) = map.plan_topic_growth(&u.name, u.queue_count)?;
                (
                    Command::UpdateTopic {
                        name: u.name.clone(),
                        retention_ms: u.retention_ms,
                        retention_bytes: u.retention_bytes,
                        target_queue_count,
                        add_queues: add,
                    },
                    u.name,
                )
            }
            Some(bpb::meta_write_request::Op::DeleteTopic(name)) => {
                validate::topic_name(&name)?;
                (Command::DeleteTopic { name: name.clone() }, name)
            }
            Some(bpb::meta_write_request::Op::RegisterBroker(b)) => {
                if b.id == 0 || b.id > MAX_BROKER_ID {
                    return Err(PetrelError::InvalidArgument(format!(
                        "broker id must be 1..={MAX_BROKER_ID}, got {}",
                        b.id
                    )));
                }
                validate_address(&b.address)?;
                match map.brokers.get(&b.id) {
                    // Registering again where it is: nothing to do.
                    Some(a) if *a == b.address => {}
                    // Only the broker itself may move its address; an
                    // operator typo must not redirect a live broker.
                    Some(a) if !b.self_register => {
                        return Err(PetrelError::AlreadyExists(format!(
                            "broker {} is already registered at {a}; drain and remove it before \
                             registering that id elsewhere",
                            b.id
                        )))
                    }
                    _ => {}
                }
                if let Some((other, _)) = map
                    .brokers
                    .iter()
                    .find(|(id, a)| **id != b.id && **a == b.address)
                {
                    return Err(PetrelError::AlreadyExists(format!(
                        "address {} is already broker {other}",
                        b.address
                    )));
                }
                (
                    Command::RegisterBroker {
                        id: b.id,
                        address: b.address,
                    },
                    String::new(),
                )
            }
            Some(bpb::meta_write_request::Op::DrainBroker(id)) => {
                let active = map.active_brokers().filter(|b| *b != id).count();
                let max_rf = map
                    .topics
                    .values()
                    .map(|t| t.spec.replication_factor as usize)
                    .max()
                    .unwrap_or(0);
                if map.brokers.contains_key(&id) && active < max_rf {
                    return Err(PetrelError::InvalidArgument(format!(
                        "cannot drain broker {id}: {active} other active brokers cannot hold \
                         replication factor {max_rf}; add a broker first"
                    )));
                }
                (Command::SetDraining { id, draining: true }, String::new())
            }
            Some(bpb::meta_write_request::Op::UndrainBroker(id)) => (
                Command::SetDraining {
                    id,
                    draining: false,
                },
                String::new(),
            ),
            Some(bpb::meta_write_request::Op::RemoveBroker(id)) => {
                (Command::RemoveBroker { id }, String::new())
            }
            Some(bpb::meta_write_request::Op::SettleReplicas(s)) => (
                Command::SettleReplicas {
                    group: s.group_id,
                    generation: s.generation,
                },
                String::new(),
            ),
            Some(bpb::meta_write_request::Op::Rebalance(_)) => {
                let moves = self.node.balance_round().await as u32;
                return Ok(bpb::MetaWriteResponse {
                    topic: None,
                    map_version: map.version,
                    moves,
                });
            }
        };
        let version = self
            .node
            .write(META_GROUP, &h, cmd)
            .await?
            .into_meta_version()?;
        let map = self.node.map_rx.borrow().clone();
        Ok(bpb::MetaWriteResponse {
            topic: map.topics.get(&name).map(topic_route),
            map_version: version,
            moves: 0,
        })
    }

    pub(super) async fn handle_meta_write(
        &self,
        req: Request<bpb::MetaWriteRequest>,
    ) -> R<bpb::MetaWriteResponse> {
        let forwarded = req.metadata().get(FORWARDED).is_some();
        let req = req.into_inner();
        let meta = self.node.meta();
        match Node::leader_of(&meta) {
            Some(l) if l == self.node.id => Ok(TResponse::new(self.meta_write(req).await?)),
            Some(l) if !forwarded => {
                let addr = self.node.broker_addr(l)?;
                let ch = self.node.pool.channel(l, &addr)?;
                let mut r = Request::new(req);
                r.metadata_mut()
                    .insert(FORWARDED, "1".parse().expect("ascii"));
                r.set_timeout(crate::node::WRITE_TIMEOUT);
                let resp = BrokerDataClient::new(ch).meta_write(r).await?;
                Ok(resp)
            }
            other => Err(PetrelError::NotLeader {
                group: META_GROUP,
                leader: other,
            }
            .into()),
        }
    }

    pub(super) async fn handle_routes(
        &self,
        req: Request<bpb::RoutesRequest>,
    ) -> R<bpb::RoutesResponse> {
        let known = req.into_inner().known_map_version;
        let map = self.node.map_rx.borrow().clone();
        let mut r = self.node.routes_response(&map);
        if known != 0 && known == r.map_version {
            r.brokers.clear();
            r.topics.clear();
            r.map_unchanged = true;
        }
        Ok(TResponse::new(r))
    }

    pub(super) async fn handle_inject_fault(
        &self,
        req: Request<bpb::InjectFaultRequest>,
    ) -> R<bpb::InjectFaultResponse> {
        if !cfg!(feature = "fault-injection") || !self.node.config.fault_injection {
            return Err(PetrelError::InvalidArgument(
                "fault injection is disabled (a test build started with --fault-injection only)"
                    .into(),
            )
            .into());
        }
        let blocked = req.into_inner().blocked;
        tracing::warn!(
            ?blocked,
            "fault injection: Raft traffic to these brokers is dropped"
        );
        self.node.pool.set_blocked(&blocked);
        Ok(TResponse::new(bpb::InjectFaultResponse {}))
    }
}

/// One `HOST:PORT`: a DNS name, IPv4 or `[IPv6]` host and a port.
fn validate_address(a: &str) -> Result<(), PetrelError> {
    let ok = !a.is_empty()
        && a.len() <= 255
        && a.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(PetrelError::InvalidArgument(format!(
            "invalid broker address {a:?}: expected HOST:PORT"
        )))
    }
}
