//! Petrel's wire protocol: a pure codec.
//!
//! ```text
//!  sdk ──petrel.v1.Petrel──▶ proxy ──petrel.broker.v1.BrokerData──▶ broker
//!                                       broker ◀─RaftTransport─▶ broker
//! ```
//!
//! This crate holds the `.proto` files and their generated code (`pb`), the
//! typed error carried on every RPC ([`PetrelError`]), the stored record
//! encoding with its CRC32 ([`record`]), message ids ([`MessageId`]), receipt
//! handles ([`receipt`]) and input validation ([`validate`]). It does no I/O.
//!
//! # Invariants
//! - Error codes on the wire (`pb::ErrorCode`) are never renumbered or reused.
//! - A record's encoding is CRC-checked on every decode; a mismatch is
//!   [`PetrelError::Corrupt`], never silently returned.

pub mod auth;
pub mod error;
pub mod filter;
pub mod ids;
pub mod receipt;
pub mod record;
pub mod rmq_auth;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;
pub mod validate;

pub use error::PetrelError;
pub use ids::MessageId;

/// Generated protobuf and gRPC code. `pb::*` is the client API
/// (`petrel.v1`), `pb::broker` the internal broker API (`petrel.broker.v1`).
pub mod pb {
    #[allow(clippy::all)]
    pub mod petrel {
        pub mod v1 {
            tonic::include_proto!("petrel.v1");
        }
        pub mod broker {
            pub mod v1 {
                tonic::include_proto!("petrel.broker.v1");
            }
        }
    }

    pub use petrel::v1::*;

    /// The internal broker API.
    pub mod broker {
        pub use super::petrel::broker::v1::*;
    }

    /// RocketMQ 5's client protocol (`apache.rocketmq.v2`), which the proxy
    /// also serves so that RocketMQ clients work against Petrel.
    #[allow(clippy::all)]
    pub mod rocketmq {
        tonic::include_proto!("apache.rocketmq.v2");
    }

    /// Encoded `FileDescriptorSet` of every Petrel proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/petrel_descriptor.bin"));
}

/// Current time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
