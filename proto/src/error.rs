//! The typed error every Petrel RPC can return, and its one mapping to and
//! from `tonic::Status`. The stable code travels as an encoded
//! [`pb::ErrorDetail`] in the status details, so a caller can branch on it
//! (and on a not-leader hint) without parsing text.

use crate::pb;
use prost::Message;

/// An error as seen at a Petrel API boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PetrelError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("broker is not the leader of group {group} (leader hint: {leader:?})")]
    NotLeader { group: u64, leader: Option<u64> },
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("offset out of range: {0}")]
    OffsetOutOfRange(String),
    #[error("receipt handle expired: {0}")]
    ReceiptExpired(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// The message does not fit the topic's type (e.g. a delayed message
    /// sent to a NORMAL topic, or a FIFO message without a message group).
    #[error("wrong message type: {0}")]
    WrongMessageType(String),
    /// A subscription's tag or SQL expression does not parse; the message
    /// names the position.
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
    /// A proxy's rate limit refused the request for now; retryable.
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// The call carries no valid credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller may not do this; the message names the resource and
    /// the action.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A configured cap was reached (consumer groups per queue, ...); the
    /// message names the cap and how to make room.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
}

impl PetrelError {
    /// The stable wire code.
    pub fn code(&self) -> pb::ErrorCode {
        use pb::ErrorCode as C;
        match self {
            Self::NotFound(_) => C::NotFound,
            Self::InvalidArgument(_) => C::InvalidArgument,
            Self::NotLeader { .. } => C::NotLeader,
            Self::TooLarge(_) => C::TooLarge,
            Self::Unavailable(_) => C::Unavailable,
            Self::Corrupt(_) => C::Corrupt,
            Self::AlreadyExists(_) => C::AlreadyExists,
            Self::OffsetOutOfRange(_) => C::OffsetOutOfRange,
            Self::ReceiptExpired(_) => C::ReceiptExpired,
            Self::Internal(_) => C::Internal,
            Self::Timeout(_) => C::Timeout,
            Self::WrongMessageType(_) => C::WrongMessageType,
            Self::InvalidFilter(_) => C::InvalidFilter,
            Self::RateLimited(_) => C::RateLimited,
            Self::Unauthenticated(_) => C::Unauthenticated,
            Self::PermissionDenied(_) => C::PermissionDenied,
            Self::LimitExceeded(_) => C::LimitExceeded,
        }
    }

    /// A short, stable name for the code (used by the CLI's `--json`).
    pub fn code_name(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::NotLeader { .. } => "not_leader",
            Self::TooLarge(_) => "too_large",
            Self::Unavailable(_) => "unavailable",
            Self::Corrupt(_) => "corrupt",
            Self::AlreadyExists(_) => "already_exists",
            Self::OffsetOutOfRange(_) => "offset_out_of_range",
            Self::ReceiptExpired(_) => "receipt_expired",
            Self::Internal(_) => "internal",
            Self::Timeout(_) => "timeout",
            Self::WrongMessageType(_) => "wrong_message_type",
            Self::InvalidFilter(_) => "invalid_filter",
            Self::RateLimited(_) => "rate_limited",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::LimitExceeded(_) => "limit_exceeded",
        }
    }

    /// Whether retrying the same request (possibly elsewhere) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotLeader { .. } | Self::Unavailable(_) | Self::Timeout(_) | Self::RateLimited(_)
        )
    }

    fn message(&self) -> String {
        match self {
            Self::NotLeader { group, leader } => {
                format!("not leader of group {group} (hint {leader:?})")
            }
            Self::NotFound(m)
            | Self::InvalidArgument(m)
            | Self::TooLarge(m)
            | Self::Unavailable(m)
            | Self::Corrupt(m)
            | Self::AlreadyExists(m)
            | Self::OffsetOutOfRange(m)
            | Self::ReceiptExpired(m)
            | Self::Internal(m)
            | Self::Timeout(m)
            | Self::WrongMessageType(m)
            | Self::InvalidFilter(m)
            | Self::RateLimited(m)
            | Self::Unauthenticated(m)
            | Self::PermissionDenied(m)
            | Self::LimitExceeded(m) => m.clone(),
        }
    }

    pub fn to_detail(&self) -> pb::ErrorDetail {
        let (leader_hint, group_id) = match self {
            Self::NotLeader { group, leader } => (leader.unwrap_or(0), *group),
            _ => (0, 0),
        };
        pb::ErrorDetail {
            code: self.code() as i32,
            message: self.message(),
            leader_hint,
            group_id,
        }
    }

    pub fn from_detail(d: &pb::ErrorDetail) -> Self {
        use pb::ErrorCode as C;
        let m = if d.message.trim().is_empty() {
            "the server gave no details".to_string()
        } else {
            d.message.clone()
        };
        match C::try_from(d.code).unwrap_or(C::Unspecified) {
            C::NotFound => Self::NotFound(m),
            C::InvalidArgument => Self::InvalidArgument(m),
            C::NotLeader => Self::NotLeader {
                group: d.group_id,
                leader: (d.leader_hint != 0).then_some(d.leader_hint),
            },
            C::TooLarge => Self::TooLarge(m),
            C::Unavailable => Self::Unavailable(m),
            C::Corrupt => Self::Corrupt(m),
            C::AlreadyExists => Self::AlreadyExists(m),
            C::OffsetOutOfRange => Self::OffsetOutOfRange(m),
            C::ReceiptExpired => Self::ReceiptExpired(m),
            C::Timeout => Self::Timeout(m),
            C::WrongMessageType => Self::WrongMessageType(m),
            C::InvalidFilter => Self::InvalidFilter(m),
            C::RateLimited => Self::RateLimited(m),
            C::Unauthenticated => Self::Unauthenticated(m),
            C::PermissionDenied => Self::PermissionDenied(m),
            C::LimitExceeded => Self::LimitExceeded(m),
            C::Internal | C::Unspecified => Self::Internal(m),
        }
    }

    /// Status for this error, carrying the encoded detail.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            Self::NotFound(_) => Code::NotFound,
            Self::InvalidArgument(_) | Self::WrongMessageType(_) | Self::InvalidFilter(_) => {
                Code::InvalidArgument
            }
            Self::NotLeader { .. } | Self::Unavailable(_) => Code::Unavailable,
            Self::TooLarge(_) | Self::RateLimited(_) | Self::LimitExceeded(_) => {
                Code::ResourceExhausted
            }
            Self::Corrupt(_) => Code::DataLoss,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::OffsetOutOfRange(_) => Code::OutOfRange,
            Self::ReceiptExpired(_) => Code::FailedPrecondition,
            Self::Internal(_) => Code::Internal,
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
        };
        tonic::Status::with_details(
            code,
            self.to_string(),
            self.to_detail().encode_to_vec().into(),
        )
    }

    /// Recovers the typed error from a status: from its detail when present,
    /// else from the gRPC code (transport failures become `Unavailable`).
    pub fn from_status(s: &tonic::Status) -> Self {
        if !s.details().is_empty() {
            if let Ok(d) = pb::ErrorDetail::decode(s.details()) {
                if d.code != 0 {
                    return Self::from_detail(&d);
                }
            }
        }
        use tonic::Code;
        let m = s.message().to_string();
        // A status without a message (from a server or layer that is not
        // Petrel's) still says what happened.
        let m = if m.trim().is_empty() {
            match s.code() {
                Code::Unimplemented => String::new(),
                c => format!("the server answered {c:?} without a message"),
            }
        } else {
            m
        };
        match s.code() {
            // Petrel's proxies serve every call of this SDK: an endpoint
            // that does not is something else (a broker's port, another
            // gRPC service, an older proxy).
            Code::Unimplemented => Self::Internal(format!(
                "the endpoint does not serve this call: is it a Petrel proxy of this \
                 version (not a broker's port or another gRPC service)?{}",
                if m.is_empty() {
                    String::new()
                } else {
                    format!(" (server said: {m})")
                }
            )),
            Code::NotFound => Self::NotFound(m),
            Code::InvalidArgument => Self::InvalidArgument(m),
            Code::ResourceExhausted => Self::TooLarge(m),
            Code::DataLoss => Self::Corrupt(m),
            Code::AlreadyExists => Self::AlreadyExists(m),
            // Our own out-of-range errors carry a detail; a bare one is a
            // transport message-size limit.
            Code::OutOfRange => Self::TooLarge(m),
            Code::FailedPrecondition => Self::ReceiptExpired(m),
            Code::DeadlineExceeded => Self::Timeout(m),
            Code::Unauthenticated => Self::Unauthenticated(m),
            Code::PermissionDenied => Self::PermissionDenied(m),
            Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Aborted => {
                Self::Unavailable(if m.is_empty() {
                    format!("{:?}", s.code())
                } else {
                    m
                })
            }
            _ => Self::Internal(m),
        }
    }
}

impl From<PetrelError> for tonic::Status {
    fn from(e: PetrelError) -> Self {
        e.to_status()
    }
}

impl From<tonic::Status> for PetrelError {
    fn from(s: tonic::Status) -> Self {
        Self::from_status(&s)
    }
}

impl From<&pb::ErrorDetail> for PetrelError {
    fn from(d: &pb::ErrorDetail) -> Self {
        Self::from_detail(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words after an error's "code: " prefix.
    fn words(e: &PetrelError) -> String {
        let t = e.to_string();
        t.split_once(": ").map(|(_, m)| m.to_string()).unwrap_or(t)
    }

    #[test]
    fn every_error_code_says_something_even_when_the_server_said_nothing() {
        // Petrel's own codes, as details with an empty message.
        for code in 0..64 {
            let Ok(c) = pb::ErrorCode::try_from(code) else {
                continue;
            };
            let e = PetrelError::from_detail(&pb::ErrorDetail {
                code: c as i32,
                message: String::new(),
                leader_hint: 0,
                group_id: 7,
            });
            assert!(!words(&e).trim().is_empty(), "{c:?}: {e:?}");
            assert!(!e.to_string().trim_end().ends_with(':'), "{c:?}: {e}");
        }
        // Bare gRPC statuses without a message (another server, a proxy
        // in front, a broker's port).
        for code in 1..=16 {
            let s = tonic::Status::new(tonic::Code::from(code), "");
            let e = PetrelError::from_status(&s);
            assert!(!words(&e).trim().is_empty(), "{:?}: {e:?}", s.code());
        }
        let wrong = PetrelError::from_status(&tonic::Status::unimplemented(""));
        assert!(wrong.to_string().contains("Petrel proxy"), "{wrong}");
        assert!(wrong.to_string().contains("broker"), "{wrong}");
    }

    #[test]
    fn status_round_trip_keeps_code_and_hint() {
        let cases = [
            PetrelError::NotLeader {
                group: 7,
                leader: Some(3),
            },
            PetrelError::NotLeader {
                group: 7,
                leader: None,
            },
            PetrelError::Corrupt("queue 1 offset 9".into()),
            PetrelError::TooLarge("x".into()),
            PetrelError::ReceiptExpired("y".into()),
        ];
        for e in cases {
            assert_eq!(PetrelError::from_status(&e.to_status()), e);
        }
    }

    #[test]
    fn plain_transport_status_maps_to_unavailable() {
        let s = tonic::Status::unavailable("connection refused");
        assert!(PetrelError::from_status(&s).is_retryable());
    }
}
