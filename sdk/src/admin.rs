//! Topic, group and cluster administration.

use crate::client::Client;
use crate::{pb, Result};
use std::time::Duration;

/// Default queue count of a new topic.
pub const DEFAULT_QUEUES: u32 = 8;
/// Default replication factor of a new topic.
pub const DEFAULT_REPLICAS: u32 = 3;

/// What to create; defaults: 8 queues, 3 replicas, NORMAL messages, kept
/// forever.
///
/// ```no_run
/// use petrel_sdk::TopicSpec;
/// use std::time::Duration;
/// let spec = TopicSpec::new("orders")
///     .queues(16)
///     .replicas(3)
///     .retention(Duration::from_secs(7 * 24 * 3600))
///     .retention_bytes(100 << 30);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub queues: u32,
    pub replicas: u32,
    pub message_type: pb::MessageType,
    /// Zero = keep forever.
    pub retention: Duration,
    /// Zero = no size limit.
    pub retention_bytes: u64,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            queues: DEFAULT_QUEUES,
            replicas: DEFAULT_REPLICAS,
            message_type: pb::MessageType::Normal,
            retention: Duration::ZERO,
            retention_bytes: 0,
        }
    }

    pub fn queues(mut self, n: u32) -> Self {
        self.queues = n;
        self
    }

    pub fn replicas(mut self, n: u32) -> Self {
        self.replicas = n;
        self
    }

    pub fn message_type(mut self, t: pb::MessageType) -> Self {
        self.message_type = t;
        self
    }

    /// How long records are kept (zero = forever).
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }

    /// Most bytes kept per queue (zero = no limit).
    pub fn retention_bytes(mut self, n: u64) -> Self {
        self.retention_bytes = n;
        self
    }

    pub fn to_config(&self) -> pb::TopicConfig {
        pb::TopicConfig {
            name: self.name.clone(),
            queue_count: self.queues,
            replication_factor: self.replicas,
            message_type: self.message_type as i32,
            retention_ms: u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX),
            retention_bytes: self.retention_bytes,
        }
    }
}

/// Administration calls; from [`Client::admin`].
///
/// Calls are retried on retryable errors like every other call; a create
/// whose first attempt succeeded but whose answer was lost comes back as
/// `AlreadyExists` on the retry.
///
/// ```no_run
/// # async fn demo(client: petrel_sdk::Client) -> petrel_sdk::Result<()> {
/// use petrel_sdk::TopicSpec;
/// let admin = client.admin();
/// let info = admin.create_topic(TopicSpec::new("orders").queues(4)).await?;
/// println!("{} queues", info.queues.len());
/// for t in admin.list_topics().await?.topics {
///     println!("{:?}", t.config);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

macro_rules! unary {
    ($self:ident, $method:ident, $req:expr) => {{
        let req = $req;
        $self
            .client
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.$method(req).await.map(|r| r.into_inner()) }
            })
            .await
    }};
}

impl Admin {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    pub async fn create_topic(&self, spec: TopicSpec) -> Result<pb::TopicInfo> {
        unary!(
            self,
            create_topic,
            pb::CreateTopicRequest {
                config: Some(spec.to_config()),
            }
        )
    }

    pub async fn update_topic(&self, request: pb::UpdateTopicRequest) -> Result<pb::TopicInfo> {
        unary!(self, update_topic, request)
    }

    pub async fn delete_topic(&self, name: impl Into<String>) -> Result<pb::DeleteTopicResponse> {
        unary!(
            self,
            delete_topic,
            pb::DeleteTopicRequest { name: name.into() }
        )
    }

    pub async fn list_topics(&self) -> Result<pb::ListTopicsResponse> {
        unary!(self, list_topics, pb::ListTopicsRequest {})
    }

    pub async fn describe_topic(&self, name: impl Into<String>) -> Result<pb::TopicInfo> {
        unary!(
            self,
            describe_topic,
            pb::DescribeTopicRequest { name: name.into() }
        )
    }

    pub async fn list_groups(&self) -> Result<pb::ListGroupsResponse> {
        unary!(self, list_groups, pb::ListGroupsRequest {})
    }

    /// A stored record by message id, with its state in every consumer
    /// group (`NotFound` once retention removed it). The id is Petrel's
    /// (`TOPIC/QUEUE/OFFSET`) or the one a RocketMQ client gave the message
    /// (looked up in every topic the caller may describe; see
    /// [`Admin::get_message_in`] to name the topic).
    pub async fn get_message(
        &self,
        message_id: impl Into<String>,
    ) -> Result<pb::GetMessageResponse> {
        self.get_message_in("", message_id).await
    }

    /// [`Admin::get_message`], looking a RocketMQ client's message id up in
    /// `topic` only (ignored for a Petrel id, which names its topic).
    pub async fn get_message_in(
        &self,
        topic: impl Into<String>,
        message_id: impl Into<String>,
    ) -> Result<pb::GetMessageResponse> {
        unary!(
            self,
            get_message,
            pb::GetMessageRequest {
                message_id: message_id.into(),
                topic: topic.into(),
            }
        )
    }

    /// Records of `topic` with `key`, oldest first (at most `max`, 0 = 100).
    pub async fn find_messages(
        &self,
        topic: impl Into<String>,
        key: impl Into<String>,
        max: u32,
    ) -> Result<Vec<crate::ReceivedMessage>> {
        let r: pb::FindMessagesResponse = unary!(
            self,
            find_messages,
            pb::FindMessagesRequest {
                topic: topic.into(),
                key: key.into(),
                max,
            }
        )?;
        Ok(r.records.into_iter().map(Into::into).collect())
    }

    pub async fn describe_group(
        &self,
        group: impl Into<String>,
    ) -> Result<pb::DescribeGroupResponse> {
        unary!(
            self,
            describe_group,
            pb::DescribeGroupRequest {
                group: group.into()
            }
        )
    }

    /// Deletes consumer group `group`'s state on every queue of `topic`
    /// (`None`: of every topic): its position, in-flight leases and dead
    /// letters not yet stored. Consumers still running recreate it at the
    /// queue's earliest record on their next receive.
    pub async fn delete_group(
        &self,
        group: impl Into<String>,
        topic: Option<String>,
    ) -> Result<pb::DeleteGroupResponse> {
        unary!(
            self,
            delete_group,
            pb::DeleteGroupRequest {
                group: group.into(),
                topic: topic.unwrap_or_default()
            }
        )
    }

    pub async fn describe_cluster(&self) -> Result<pb::ClusterInfo> {
        unary!(self, describe_cluster, pb::DescribeClusterRequest {})
    }

    async fn admin_cluster(
        &self,
        op: pb::admin_cluster_request::Op,
    ) -> Result<pb::AdminClusterResponse> {
        unary!(
            self,
            admin_cluster,
            pb::AdminClusterRequest { op: Some(op) }
        )
    }

    /// Registers broker `id` at `address` (HOST:PORT). Start the broker with
    /// `--join` (or `--peers`); the controller then moves replicas to it as
    /// other brokers drain, and new queues are placed on it.
    pub async fn add_broker(
        &self,
        id: u64,
        address: impl Into<String>,
    ) -> Result<pb::AdminClusterResponse> {
        self.admin_cluster(pb::admin_cluster_request::Op::AddBroker(
            pb::BrokerEndpoint {
                id,
                address: address.into(),
            },
        ))
        .await
    }

    /// Moves every replica and leadership off broker `id`, in the
    /// background; `describe_cluster` shows its counts fall to zero.
    pub async fn drain_broker(&self, id: u64) -> Result<pb::AdminClusterResponse> {
        self.admin_cluster(pb::admin_cluster_request::Op::DrainBroker(id))
            .await
    }

    /// Makes a drained broker eligible for replicas and leaderships again.
    pub async fn undrain_broker(&self, id: u64) -> Result<pb::AdminClusterResponse> {
        self.admin_cluster(pb::admin_cluster_request::Op::UndrainBroker(id))
            .await
    }

    /// Forgets broker `id`; refused while it still hosts replicas.
    pub async fn remove_broker(&self, id: u64) -> Result<pb::AdminClusterResponse> {
        self.admin_cluster(pb::admin_cluster_request::Op::RemoveBroker(id))
            .await
    }

    /// Asks the controller to balance leaderships now; returns the moves
    /// it started (0 when already balanced).
    pub async fn rebalance(&self) -> Result<pb::AdminClusterResponse> {
        self.admin_cluster(pb::admin_cluster_request::Op::Rebalance(true))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_defaults_and_config() {
        let c = TopicSpec::new("t")
            .queues(2)
            .retention(Duration::from_secs(60))
            .to_config();
        assert_eq!(c.name, "t");
        assert_eq!(c.queue_count, 2);
        assert_eq!(c.replication_factor, DEFAULT_REPLICAS);
        assert_eq!(c.message_type, pb::MessageType::Normal as i32);
        assert_eq!(c.retention_ms, 60_000);
        assert_eq!(c.retention_bytes, 0);
    }
}
