//! The error a replicated command's apply decides. Its own leaf module: the
//! state machines (`queue.rs`, `meta.rs`) return it and `types.rs` carries
//! it in responses, so none of them has to import another for it.

use serde::{Deserialize, Serialize};

/// An error decided by applying a command (deterministic on every replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyError {
    NotFound(String),
    AlreadyExists(String),
    InvalidArgument(String),
    ReceiptExpired(String),
    WrongGroupKind,
    /// A checkpoint of a leadership term that is over (not applied).
    StaleTerm(String),
}

impl From<ApplyError> for petrel_proto::PetrelError {
    fn from(e: ApplyError) -> Self {
        use petrel_proto::PetrelError as P;
        match e {
            ApplyError::NotFound(m) => P::NotFound(m),
            ApplyError::AlreadyExists(m) => P::AlreadyExists(m),
            ApplyError::InvalidArgument(m) => P::InvalidArgument(m),
            ApplyError::ReceiptExpired(m) => P::ReceiptExpired(m),
            ApplyError::StaleTerm(m) => P::Unavailable(m),
            ApplyError::WrongGroupKind => {
                P::Internal("command sent to the wrong kind of group".into())
            }
        }
    }
}
