//! Transport settings every Petrel hop shares, so no request ever waits on
//! a fixed delay in the kernel or in HTTP/2 flow control.
//!
//! - **TCP_NODELAY on every socket**, accepted and dialed. tonic's
//!   `Server::builder().tcp_nodelay(true)` applies only to the listener
//!   tonic binds itself, not to a stream handed to `serve_with_incoming*`,
//!   so the broker and the proxy, which accept on their own listener, set it
//!   on each accepted stream. Without it, Nagle's
//!   algorithm meets the peer's delayed ACK and a lone request waits ~40 ms.
//! - **HTTP/2 windows that fit the largest batch.** hyper's defaults (64 KiB
//!   per stream on a client) make a 1 MiB replication batch or a 100-record
//!   send wait for WINDOW_UPDATE round trips. Windows are credit, not
//!   memory: nothing is allocated up front.

/// Initial HTTP/2 stream window, bytes (every client and server).
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Initial HTTP/2 connection window, bytes (every client and server).
pub const CONNECTION_WINDOW: u32 = 64 << 20;
