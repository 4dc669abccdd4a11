//! The SDK against an in-process fake proxy: batching, sequence assignment,
//! idempotent retry (identical resend), failover and error passing.

// The tonic service trait fixes `Result<_, Status>` return types.
#![allow(clippy::result_large_err)]

use futures::Stream;
use petrel_sdk::{pb, Client, Error, Message};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Generous bound for calls against a local fake; never reached when passing.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct State {
    sends: Vec<pb::SendRequest>,
    /// Errors returned by the next Send calls, before succeeding.
    send_failures: VecDeque<Status>,
    next_offset: u64,
    acks: Vec<pb::AckRequest>,
}

#[derive(Clone, Default)]
struct Mock(Arc<Mutex<State>>);

type RecvStream = Pin<Box<dyn Stream<Item = Result<pb::ReceiveResponse, Status>> + Send>>;

fn unimpl<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("mock"))
}

fn rec(offset: u64) -> pb::Record {
    pb::Record {
        message_id: format!("t/0/{offset}"),
        topic: "t".into(),
        offset,
        body: format!("body {offset}").into(),
        attempt: 1,
        receipt_handle: format!("h{offset}"),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl pb::petrel_server::Petrel for Mock {
    async fn send(
        &self,
        r: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let req = r.into_inner();
        let mut s = self.0.lock().unwrap();
        s.sends.push(req.clone());
        if let Some(e) = s.send_failures.pop_front() {
            return Err(e);
        }
        let mut results = Vec::new();
        for _ in &req.messages {
            let offset = s.next_offset;
            s.next_offset += 1;
            results.push(pb::SendResult {
                message_id: format!("{}/0/{offset}", req.topic),
                queue: 0,
                offset,
                duplicate: false,
            });
        }
        Ok(Response::new(pb::SendResponse { results }))
    }

    type ReceiveStream = RecvStream;
    async fn receive(
        &self,
        r: Request<pb::ReceiveRequest>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let max = r.into_inner().max_messages as u64;
        // Two batches, then the stream ends.
        let batches: Vec<Result<pb::ReceiveResponse, Status>> = vec![
            Ok(pb::ReceiveResponse {
                records: vec![rec(0)],
            }),
            Ok(pb::ReceiveResponse {
                records: (1..max).map(rec).collect(),
            }),
        ];
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }
    async fn ack(&self, r: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let req = r.into_inner();
        let results = req
            .receipt_handles
            .iter()
            .map(|h| pb::Status {
                code: if h == "h1" {
                    pb::ErrorCode::ReceiptExpired as i32
                } else {
                    0
                },
                message: String::new(),
            })
            .collect();
        self.0.lock().unwrap().acks.push(req);
        Ok(Response::new(pb::AckResponse { results }))
    }
    async fn get_message(
        &self,
        _: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::GetMessageResponse>, Status> {
        Err(Status::unimplemented("not in the mock"))
    }
    async fn find_messages(
        &self,
        _: Request<pb::FindMessagesRequest>,
    ) -> Result<Response<pb::FindMessagesResponse>, Status> {
        Err(Status::unimplemented("not in the mock"))
    }
    async fn end_transaction(
        &self,
        _: Request<pb::EndTransactionRequest>,
    ) -> Result<Response<pb::EndTransactionResponse>, Status> {
        Err(Status::unimplemented("not in the mock"))
    }
    type WatchTransactionsStream =
        Pin<Box<dyn Stream<Item = Result<pb::TransactionCheck, Status>> + Send>>;
    async fn watch_transactions(
        &self,
        _: Request<pb::WatchTransactionsRequest>,
    ) -> Result<Response<Self::WatchTransactionsStream>, Status> {
        Err(Status::unimplemented("not in the mock"))
    }
    async fn nack(
        &self,
        _: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        Ok(Response::new(pb::NackResponse {
            redeliver_at_ms: 99,
        }))
    }
    async fn change_invisible_duration(
        &self,
        _: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Result<Response<pb::ChangeInvisibleDurationResponse>, Status> {
        Ok(Response::new(pb::ChangeInvisibleDurationResponse {
            receipt_handle: "new".into(),
            invisible_until_ms: 77,
        }))
    }
    async fn read(
        &self,
        _: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        unimpl()
    }
    async fn commit_offset(
        &self,
        _: Request<pb::CommitOffsetRequest>,
    ) -> Result<Response<pb::CommitOffsetResponse>, Status> {
        unimpl()
    }
    async fn get_offset(
        &self,
        _: Request<pb::GetOffsetRequest>,
    ) -> Result<Response<pb::GetOffsetResponse>, Status> {
        unimpl()
    }
    async fn create_topic(
        &self,
        _: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        unimpl()
    }
    async fn update_topic(
        &self,
        _: Request<pb::UpdateTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        unimpl()
    }
    async fn delete_topic(
        &self,
        _: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        unimpl()
    }
    async fn list_topics(
        &self,
        _: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        unimpl()
    }
    async fn describe_topic(
        &self,
        r: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::TopicInfo>, Status> {
        Err(Error::NotFound(format!("topic {:?} does not exist", r.into_inner().name)).into())
    }
    async fn list_groups(
        &self,
        _: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        unimpl()
    }
    async fn describe_group(
        &self,
        _: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        unimpl()
    }
    async fn delete_group(
        &self,
        _: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        unimpl()
    }
    async fn describe_cluster(
        &self,
        _: Request<pb::DescribeClusterRequest>,
    ) -> Result<Response<pb::ClusterInfo>, Status> {
        unimpl()
    }
    async fn offset_for_time(
        &self,
        _: Request<pb::OffsetForTimeRequest>,
    ) -> Result<Response<pb::OffsetForTimeResponse>, Status> {
        unimpl()
    }
    async fn admin_cluster(
        &self,
        _: Request<pb::AdminClusterRequest>,
    ) -> Result<Response<pb::AdminClusterResponse>, Status> {
        unimpl()
    }
}

/// Starts the mock on an ephemeral port; returns its state and address.
async fn start() -> (Mock, String) {
    let mock = Mock::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming =
        tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
    let svc = pb::petrel_server::PetrelServer::new(mock.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    (mock, addr)
}

/// An address nothing listens on (bound, then released).
async fn dead_addr() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().to_string()
}

fn client(endpoints: Vec<String>) -> Client {
    Client::builder(endpoints)
        .request_timeout(CALL_TIMEOUT)
        .build()
        .unwrap()
}

#[tokio::test]
async fn concurrent_sends_share_one_request_with_consecutive_sequences() {
    let (mock, addr) = start().await;
    let c = client(vec![addr]);
    let p = c
        .producer("t")
        .producer_id("p1")
        .linger(Duration::from_millis(200))
        .build();
    let sends: Vec<_> = (0..5)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.send(Message::new(format!("m{i}"))).await })
        })
        .collect();
    let mut offsets = Vec::new();
    for s in sends {
        offsets.push(s.await.unwrap().unwrap().offset);
    }
    offsets.sort();
    assert_eq!(offsets, vec![0, 1, 2, 3, 4]);
    let s = mock.0.lock().unwrap();
    assert_eq!(s.sends.len(), 1, "one batched request");
    let req = &s.sends[0];
    assert_eq!(req.producer_id, "p1");
    let seqs: Vec<u64> = req.messages.iter().map(|m| m.sequence).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn batch_limits_split_requests_and_receipts_match_callers() {
    let (mock, addr) = start().await;
    let c = client(vec![addr]);
    let p = c
        .producer("t")
        .linger(Duration::from_millis(100))
        .max_batch_messages(2)
        .build();
    let futs: Vec<_> = (0..5)
        .map(|i| p.send(Message::new(format!("m{i}"))))
        .collect();
    let receipts = futures::future::join_all(futs).await;
    p.flush().await;
    let s = mock.0.lock().unwrap();
    assert_eq!(
        s.sends.iter().map(|r| r.messages.len()).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    // Each caller got the result of its own message.
    for (i, r) in receipts.into_iter().enumerate() {
        let r = r.unwrap();
        let sent = s
            .sends
            .iter()
            .flat_map(|q| &q.messages)
            .nth(r.offset as usize)
            .unwrap();
        assert_eq!(&sent.body[..], format!("m{i}").as_bytes());
    }
}

#[tokio::test]
async fn retry_resends_the_identical_request() {
    let (mock, addr) = start().await;
    mock.0.lock().unwrap().send_failures.extend([
        Status::unavailable("proxy busy"),
        Error::NotLeader {
            group: 3,
            leader: Some(2),
        }
        .into(),
    ]);
    let c = client(vec![addr]);
    let p = c.producer("t").build();
    let r = p
        .send_batch(vec![Message::new("a"), Message::new("b").with_key("k")])
        .await
        .unwrap();
    assert_eq!(r.len(), 2);
    let s = mock.0.lock().unwrap();
    assert_eq!(s.sends.len(), 3);
    assert_eq!(s.sends[0], s.sends[1]);
    assert_eq!(s.sends[1], s.sends[2]);
    assert_eq!(s.sends[0].messages[1].sequence, 2);
}

#[tokio::test]
async fn fails_over_from_a_dead_proxy() {
    let (mock, addr) = start().await;
    let c = client(vec![dead_addr().await, addr.clone(), dead_addr().await]);
    for _ in 0..4 {
        c.producer("t")
            .build()
            .send(Message::new("x"))
            .await
            .unwrap();
    }
    assert_eq!(mock.0.lock().unwrap().sends.len(), 4);
}

#[tokio::test]
async fn non_retryable_errors_return_at_once() {
    let (mock, addr) = start().await;
    mock.0
        .lock()
        .unwrap()
        .send_failures
        .push_back(Error::TooLarge("too big".into()).into());
    let c = client(vec![addr]);
    let err = c
        .producer("t")
        .build()
        .send_batch(vec![Message::new("x")])
        .await
        .unwrap_err();
    assert_eq!(err, Error::TooLarge("too big".into()));
    assert_eq!(mock.0.lock().unwrap().sends.len(), 1);
    let err = c.admin().describe_topic("nope").await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("nope")),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalid_messages_fail_locally_without_a_request() {
    let (mock, addr) = start().await;
    let c = client(vec![addr]);
    let p = c.producer("t").build();
    let err = p
        .send(Message::new("x").with_key("k".repeat(5000)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    let err = c
        .producer("bad/topic")
        .build()
        .send(Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(mock.0.lock().unwrap().sends.is_empty());
}

#[tokio::test]
async fn receive_collects_every_streamed_batch_and_acks_map_per_handle() {
    let (mock, addr) = start().await;
    let c = client(vec![addr]);
    let consumer = c
        .simple_consumer("t", "g")
        .wait(Duration::from_millis(10))
        .build();
    let msgs = consumer.receive(3).await.unwrap();
    assert_eq!(
        msgs.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let acks = consumer.ack_many(&msgs).await.unwrap();
    assert_eq!(acks[0], Ok(()));
    assert!(matches!(acks[1], Err(Error::ReceiptExpired(_))));
    assert_eq!(acks[2], Ok(()));
    assert_eq!(mock.0.lock().unwrap().acks[0].group, "g");
    let moved = consumer
        .change_invisible_duration(&msgs[0], Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(moved.receipt_handle, "new");
    assert_eq!(moved.invisible_until_ms, 77);
    assert_eq!(moved.body, msgs[0].body);
}

#[tokio::test]
async fn closed_producer_rejects_sends() {
    let (_mock, addr) = start().await;
    let c = client(vec![addr]);
    let p = c.producer("t").build();
    let p2 = p.clone();
    p.close().await;
    assert!(matches!(
        p2.send(Message::new("x")).await,
        Err(Error::InvalidArgument(_))
    ));
}

/// Batching is self-clocking: with nothing in flight a send goes at once,
/// whatever the linger (a 10-minute linger would otherwise hold it).
#[tokio::test]
async fn a_lone_send_does_not_wait_for_the_linger() {
    let (mock, addr) = start().await;
    let c = client(vec![addr]);
    let p = c.producer("t").linger(Duration::from_secs(600)).build();
    for i in 0..3 {
        let r = tokio::time::timeout(Duration::from_secs(30), p.send(Message::new("x")))
            .await
            .expect("a lone send left without waiting for the linger")
            .unwrap();
        assert_eq!(r.offset, i);
    }
    assert_eq!(
        mock.0.lock().unwrap().sends.len(),
        3,
        "one request per send"
    );
}
