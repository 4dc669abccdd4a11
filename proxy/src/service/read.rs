//! Reading a queue by offset, without a group's leases: `Read`,
//! `OffsetForTime`, and a group's committed position (`CommitOffset`,
//! `GetOffset`).

use std::sync::Arc;

use petrel_proto::pb;
use petrel_proto::pb::broker as bpb;
use petrel_proto::{validate, PetrelError};
use tonic::{Request, Response};

use super::{Inner, R};
use crate::auth::{Action, Resource};

pub(super) async fn read(s: &Arc<Inner>, req: Request<pb::ReadRequest>) -> R<pb::ReadResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[(Resource::Topic(&req.get_ref().topic), Action::Subscribe)],
    )?;
    let req = req.into_inner();
    let t = s.topic(&req.topic).await?;
    let group = Inner::group_of(&t, req.queue)?;
    let breq = bpb::BrokerReadRequest {
        group_id: group,
        offset: req.offset,
        max_bytes: req.max_bytes,
        max_messages: req.max_messages,
    };
    let resp = s
        .on_leader(group, |_, _, mut c| async move {
            c.read(breq)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| PetrelError::from_status(&s))
        })
        .await?;
    let mut records = Vec::with_capacity(resp.records.len());
    for r in &resp.records {
        records.push(s.to_record(&req.topic, req.queue, r.offset, &r.encoded)?);
    }
    let next_offset = records.last().map(|r| r.offset + 1).unwrap_or(req.offset);
    Ok(Response::new(pb::ReadResponse {
        records,
        next_offset,
        start_offset: resp.start_offset,
        end_offset: resp.end_offset,
    }))
}

pub(super) async fn offset_for_time(
    s: &Arc<Inner>,
    req: Request<pb::OffsetForTimeRequest>,
) -> R<pb::OffsetForTimeResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[(Resource::Topic(&req.get_ref().topic), Action::Subscribe)],
    )?;
    let req = req.into_inner();
    let t = s.topic(&req.topic).await?;
    let group = Inner::group_of(&t, req.queue)?;
    let breq = bpb::BrokerOffsetForTimeRequest {
        group_id: group,
        timestamp_ms: req.timestamp_ms,
    };
    let r = s
        .on_leader(group, |_, _, mut c| async move {
            c.offset_for_time(breq)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| PetrelError::from_status(&s))
        })
        .await?;
    Ok(Response::new(pb::OffsetForTimeResponse {
        offset: r.offset,
    }))
}

pub(super) async fn commit_offset(
    s: &Arc<Inner>,
    req: Request<pb::CommitOffsetRequest>,
) -> R<pb::CommitOffsetResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[
            (Resource::Topic(&req.get_ref().topic), Action::Subscribe),
            (Resource::Group(&req.get_ref().group), Action::Subscribe),
        ],
    )?;
    let req = req.into_inner();
    validate::group_name(&req.group)?;
    let t = s.topic(&req.topic).await?;
    let group = Inner::group_of(&t, req.queue)?;
    let breq = bpb::BrokerCommitOffsetRequest {
        group_id: group,
        consumer_group: req.group.clone(),
        offset: req.offset,
    };
    s.on_leader(group, |_, _, mut c| {
        let breq = breq.clone();
        async move {
            c.commit_offset(breq)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| PetrelError::from_status(&s))
        }
    })
    .await?;
    Ok(Response::new(pb::CommitOffsetResponse {}))
}

pub(super) async fn get_offset(
    s: &Arc<Inner>,
    req: Request<pb::GetOffsetRequest>,
) -> R<pb::GetOffsetResponse> {
    let _call = Inner::enter(
        s,
        &req,
        &[
            (Resource::Topic(&req.get_ref().topic), Action::Subscribe),
            (Resource::Group(&req.get_ref().group), Action::Subscribe),
        ],
    )?;
    let req = req.into_inner();
    validate::group_name(&req.group)?;
    let t = s.topic(&req.topic).await?;
    let group = Inner::group_of(&t, req.queue)?;
    let mut stats = s.stats(vec![group], &req.group).await;
    let st = stats
        .remove(&group)
        .unwrap_or_else(|| Err(PetrelError::Internal("no stats".into())))?;
    let committed = st
        .consumer_groups
        .iter()
        .find(|c| c.name == req.group)
        .map(|c| c.committed_offset)
        .unwrap_or(st.start_offset);
    Ok(Response::new(pb::GetOffsetResponse {
        committed_offset: committed,
        start_offset: st.start_offset,
        end_offset: st.end_offset,
    }))
}
