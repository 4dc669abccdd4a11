//! The connection layer: one lazily-connected gRPC channel per proxy
//! endpoint, and the retry loop every call goes through.
//!
//! ```text
//!  call ──▶ endpoint[current] ──retryable error──▶ current += 1, back off, retry
//!                 │                                   (until the request timeout)
//!                 └── ok / non-retryable error ──▶ returned to the caller
//! ```
//!
//! # Invariants
//! - A retry resends the identical request (the caller's closure clones one
//!   prepared request), so retried sends stay idempotent.
//! - Non-retryable errors ([`Error::is_retryable`] is false) are returned at
//!   once, never retried.

use crate::admin::Admin;
use crate::consumer::{PullConsumer, SimpleConsumerBuilder};
use crate::producer::ProducerBuilder;
use crate::{pb, Error, Result};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The gRPC client every call is made with (signed when the client has
/// credentials).
pub(crate) type Rpc = pb::petrel_client::PetrelClient<InterceptedService<Channel, Signer>>;

/// Signs each call with the user's key (see `petrel_proto::auth`): the
/// access key, the date, and a nonce unique to this client instance and
/// call. Without credentials, calls go unsigned.
#[derive(Clone)]
pub(crate) struct Signer {
    creds: Option<Arc<Credentials>>,
}

struct Credentials {
    access_key: String,
    key: [u8; 32],
    /// Names this client instance in nonces.
    instance: u64,
    calls: AtomicU64,
}

impl tonic::service::Interceptor for Signer {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let Some(c) = &self.creds else {
            return Ok(req);
        };
        let date = petrel_proto::now_ms();
        let nonce = format!(
            "{:x}-{}",
            c.instance,
            c.calls.fetch_add(1, Ordering::Relaxed)
        );
        let auth = petrel_proto::auth::authorization(&c.key, &c.access_key, date, &nonce);
        let md = req.metadata_mut();
        md.insert(
            petrel_proto::auth::DATE_HEADER,
            date.to_string().parse().expect("digits"),
        );
        md.insert(
            petrel_proto::auth::AUTHORIZATION_HEADER,
            auth.parse().map_err(|_| {
                tonic::Status::invalid_argument("the access key must be printable ASCII")
            })?,
        );
        Ok(req)
    }
}

/// Default total time budget of one call, retries included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to establish a TCP/HTTP2 connection to one proxy.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First back-off after a retryable error.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(20);
/// Longest back-off between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// HTTP/2 keep-alive ping interval: a hung (not closed) proxy connection is
/// detected within interval + timeout and the call fails over.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest gRPC message the client accepts or sends (read batches can be
/// large; the proxy enforces its own limit on requests).
const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// A handle to a Petrel cluster, through one or more proxies.
///
/// Cheap to clone (an `Arc` inside); all clones share the same connections.
/// Every call fails over between the configured proxy endpoints: on a
/// retryable error (unavailable, not-leader, timeout, or a transport failure)
/// it moves to the next endpoint and retries with capped exponential back-off
/// (20 ms doubling up to 500 ms) until the request timeout is spent. Other
/// errors are returned at once.
///
/// ```no_run
/// # async fn demo() -> petrel_sdk::Result<()> {
/// use petrel_sdk::Client;
/// let client = Client::connect(["127.0.0.1:7400", "127.0.0.1:7410"])?;
/// let cluster = client.admin().describe_cluster().await?;
/// println!("{} brokers", cluster.brokers.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<Proxy>,
    signer: Signer,
    /// Index (mod len) of the endpoint calls go to first.
    current: AtomicUsize,
    request_timeout: Duration,
    /// The runtime the client was built in; background tasks (the producer
    /// batcher) are spawned here, so building them never panics.
    runtime: tokio::runtime::Handle,
}

struct Proxy {
    uri: String,
    channel: Channel,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field(
                "endpoints",
                &self
                    .inner
                    .endpoints
                    .iter()
                    .map(|p| &p.uri)
                    .collect::<Vec<_>>(),
            )
            .field("request_timeout", &self.inner.request_timeout)
            .finish()
    }
}

/// Configures a [`Client`].
///
/// ```no_run
/// # fn demo() -> petrel_sdk::Result<()> {
/// use std::time::Duration;
/// let client = petrel_sdk::Client::builder(["10.0.0.1:7400", "10.0.0.2:7400"])
///     .request_timeout(Duration::from_secs(10))
///     .connect_timeout(Duration::from_secs(1))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    request_timeout: Duration,
    connect_timeout: Duration,
    credentials: Option<(String, Redacted)>,
    /// PEM of the CA that signed the proxies' certificates (https).
    ca_certificate: Option<Vec<u8>>,
    /// PEM certificate and key presented to proxies that ask (mTLS).
    identity: Option<(Vec<u8>, Redacted)>,
}

/// A secret that `Debug` does not print.
#[derive(Clone)]
struct Redacted(String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl ClientBuilder {
    /// Total time budget of one call including all retries (default 30 s).
    /// Long-poll receives get their `wait` on top of this.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// Time allowed to connect to one proxy (default 3 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Trusts proxies whose certificate this CA (PEM) signed; needed for
    /// `https://` endpoints.
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_certificate = Some(pem.into());
        self
    }

    /// Presents this certificate and key (PEM) to proxies over TLS.
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        let key = String::from_utf8_lossy(&key_pem.into()).into_owned();
        self.identity = Some((cert_pem.into(), Redacted(key)));
        self
    }

    /// Signs every call as user `access_key` (see `petrel user add`). The
    /// secret never leaves this process: calls carry a signature made
    /// with a key derived from it.
    pub fn credentials(
        mut self,
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some((access_key.into(), Redacted(secret_key.into())));
        self
    }

    /// Validates the endpoints and creates the channels. Connections are
    /// made lazily, so a proxy that is down does not fail this call.
    ///
    /// Errors with [`Error::InvalidArgument`] on an empty list or an
    /// unparsable endpoint, and with [`Error::Internal`] when called outside
    /// a Tokio runtime.
    pub fn build(self) -> Result<Client> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidArgument(
                "no proxy endpoints given".to_string(),
            ));
        }
        let uris = self
            .endpoints
            .iter()
            .map(|e| normalize_endpoint(e))
            .collect::<Result<Vec<_>>>()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Internal("petrel_sdk::Client must be built inside a Tokio runtime".to_string())
        })?;
        let mut endpoints = Vec::with_capacity(uris.len());
        for uri in uris {
            let mut ep = Endpoint::from_shared(uri.clone())
                .map_err(|e| Error::InvalidArgument(format!("endpoint {uri:?}: {e}")))?;
            if uri.starts_with("https://") {
                let Some(ca) = &self.ca_certificate else {
                    return Err(Error::InvalidArgument(format!(
                        "endpoint {uri:?} is https: give the CA that signed the proxies' \
                         certificates (ca_certificate, or the CLI's --ca-cert)"
                    )));
                };
                let mut tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca.clone()));
                if let Some((cert, key)) = &self.identity {
                    tls = tls.identity(tonic::transport::Identity::from_pem(
                        cert.clone(),
                        key.0.clone(),
                    ));
                }
                ep = ep
                    .tls_config(tls)
                    .map_err(|e| Error::InvalidArgument(format!("endpoint {uri:?}: {e}")))?;
            }
            let ep = ep
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true)
                .initial_stream_window_size(petrel_proto::transport::STREAM_WINDOW)
                .initial_connection_window_size(petrel_proto::transport::CONNECTION_WINDOW)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            endpoints.push(Proxy {
                channel: ep.connect_lazy(),
                uri,
            });
        }
        let creds = match self.credentials {
            Some((ak, _)) if ak.is_empty() || !ak.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(Error::InvalidArgument(format!(
                    "access key {ak:?} must be non-empty printable ASCII"
                )))
            }
            Some((_, sk)) if sk.0.is_empty() => {
                return Err(Error::InvalidArgument(
                    "the secret key is empty".to_string(),
                ))
            }
            Some((ak, sk)) => Some(Arc::new(Credentials {
                key: petrel_proto::auth::signing_key(&ak, &sk.0),
                access_key: ak,
                instance: rand::random(),
                calls: AtomicU64::new(0),
            })),
            None => None,
        };
        // Spread clients over proxies: start at a random endpoint.
        let start = rand::random::<usize>() % endpoints.len();
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints,
                signer: Signer { creds },
                current: AtomicUsize::new(start),
                request_timeout: self.request_timeout,
                runtime,
            }),
        })
    }
}

/// Turns `host:port` or `http(s)://host:port[/]` into a URI tonic accepts.
pub(crate) fn normalize_endpoint(raw: &str) -> Result<String> {
    let bad = |why: &str| Error::InvalidArgument(format!("endpoint {raw:?}: {why}"));
    let s = raw.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let uri = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let uri = uri.trim_end_matches('/').to_string();
    let parsed: tonic::codegen::http::Uri = uri.parse().map_err(|e| bad(&format!("{e}")))?;
    match parsed.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("scheme must be http or https")),
    }
    let host = parsed.host().unwrap_or("");
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    if let Some(auth) = parsed.authority() {
        if let Some((_, port)) = auth.as_str().rsplit_once(':') {
            if !port.contains(']') && port.parse::<u16>().is_err() {
                return Err(bad("port must be 0..=65535"));
            }
        }
    }
    if parsed.path() != "/" && !parsed.path().is_empty() {
        return Err(bad("must not have a path"));
    }
    Ok(uri)
}

impl Client {
    /// Connects (lazily) to the given proxies with default settings.
    ///
    /// Endpoints look like `"127.0.0.1:7400"` or `"http://proxy:7400"`.
    ///
    /// ```no_run
    /// # fn demo() -> petrel_sdk::Result<()> {
    /// let client = petrel_sdk::Client::connect(["127.0.0.1:7400"])?;
    /// # Ok(()) }
    /// ```
    pub fn connect(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Result<Client> {
        Self::builder(endpoints).build()
    }

    /// A builder for a client with non-default timeouts.
    pub fn builder(endpoints: impl IntoIterator<Item = impl Into<String>>) -> ClientBuilder {
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            credentials: None,
            ca_certificate: None,
            identity: None,
        }
    }

    /// The normalized proxy endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.endpoints.iter().map(|p| p.uri.clone()).collect()
    }

    /// The total time budget of one call.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// Spawns a background task on the client's runtime.
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        drop(self.inner.runtime.spawn(fut));
    }

    /// Starts building a [`Producer`](crate::Producer) for `topic`.
    pub fn producer(&self, topic: impl Into<String>) -> ProducerBuilder {
        ProducerBuilder::new(self.clone(), topic.into())
    }

    /// Starts building a pop-mode [`SimpleConsumer`](crate::SimpleConsumer).
    pub fn simple_consumer(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> SimpleConsumerBuilder {
        SimpleConsumerBuilder::new(self.clone(), topic.into(), group.into())
    }

    /// A consumer that calls a handler for each message, acking on success
    /// and nacking (with back-off) on failure.
    pub fn push_consumer(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> crate::push::PushConsumerBuilder {
        crate::push::PushConsumerBuilder::new(self.simple_consumer(topic, group))
    }

    /// An offset-mode consumer for replay and stream processing.
    pub fn pull_consumer(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> PullConsumer {
        PullConsumer::new(self.clone(), topic.into(), group.into())
    }

    /// Topic, group and cluster administration.
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }

    /// Runs `f` against the current endpoint, failing over and backing off on
    /// retryable errors until the request timeout (plus `extra`) is spent.
    /// `f` must issue the identical request on every attempt.
    ///
    /// When the budget runs out the last error is returned (a
    /// [`Error::Timeout`] if the last attempt itself was cut short).
    pub(crate) async fn call<T, F, Fut>(&self, extra: Duration, mut f: F) -> Result<T>
    where
        F: FnMut(Rpc) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let budget = self.inner.request_timeout.saturating_add(extra);
        let deadline = Instant::now() + budget;
        let n = self.inner.endpoints.len();
        let mut backoff = Backoff::new();
        loop {
            let idx = self.inner.current.load(Ordering::Relaxed) % n;
            let proxy = &self.inner.endpoints[idx];
            let client = pb::petrel_client::PetrelClient::with_interceptor(
                proxy.channel.clone(),
                self.inner.signer.clone(),
            )
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let err = match tokio::time::timeout(remaining, f(client)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) => match Error::from_status(&status) {
                    // Say which proxy could not be reached, and in words a
                    // user can act on when the transport failed.
                    Error::Unavailable(m) => Error::Unavailable(explain_unavailable(
                        &with_causes(&m, &status),
                        &proxy.uri,
                    )),
                    other => other,
                },
                Err(_) => Error::Timeout(format!(
                    "{} got no answer from {} within the {budget:?} request budget (the \
                     cluster may be busy or still starting: raise --timeout / \
                     request_timeout, or check `petrel cluster describe`)",
                    call_name::<T>(),
                    proxy.uri
                )),
            };
            if !err.is_retryable() {
                return Err(err);
            }
            // Move everyone off this endpoint unless someone already did.
            let _ = self.inner.current.compare_exchange(
                idx,
                (idx + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            let now = Instant::now();
            if now >= deadline {
                return Err(err);
            }
            let pause = backoff.next_delay().min(deadline - now);
            tracing::debug!(endpoint = %proxy.uri, error = %err, ?pause, "retrying");
            tokio::time::sleep(pause).await;
            if Instant::now() >= deadline {
                return Err(err);
            }
        }
    }
}

/// The call a response type answers, for messages: `ListTopicsResponse`
/// → "ListTopics".
fn call_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let short = full.split('<').next().unwrap_or(full);
    let short = short.rsplit("::").next().unwrap_or(short);
    short.strip_suffix("Response").unwrap_or(short)
}

/// `m` and the transport's causes under it (tonic's message is only the
/// outermost, e.g. "tcp connect error" without the "Connection refused").
fn with_causes(m: &str, status: &tonic::Status) -> String {
    let mut out = m.to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cause = c.source();
    }
    out
}

/// An `unavailable` message from the transport, said the way a user can
/// act on it: nothing listening, not a gRPC server, a TLS mismatch.
/// Server-side messages pass through with the proxy named.
pub(crate) fn explain_unavailable(m: &str, uri: &str) -> String {
    let lower = m.to_ascii_lowercase();
    let hint = if lower.contains("connection refused") {
        "nothing is listening there (connection refused): is a petrel-proxy running at \
         that address? `petrel dev` serves 127.0.0.1:7400"
    } else if lower.contains("invalid certificate")
        || lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
    {
        "the TLS handshake failed: https:// endpoints need the proxy's CA (--ca-cert), \
         and a plain proxy needs an endpoint without https://"
    } else if lower.contains("frame with invalid size")
        || lower.contains("invalid content-type")
        || lower.contains("h2 protocol error: http2 error")
    {
        "the server there does not speak gRPC over plain HTTP/2: is it a Petrel proxy \
         (a TLS proxy needs an https:// endpoint)?"
    } else if lower.contains("connection closed before message completed")
        || lower.contains("connection reset")
        || lower.contains("broken pipe")
    {
        "the server there closed the connection: a proxy shutting down, or not a Petrel \
         proxy (a TLS proxy needs an https:// endpoint)"
    } else if lower.contains("tcp connect error") || lower.contains("dns error") {
        "cannot connect to that address: check the host and port, and the network"
    } else {
        ""
    };
    if hint.is_empty() {
        format!("{m} (proxy {uri})")
    } else {
        format!("proxy {uri}: {hint} ({m})")
    }
}

/// Capped exponential back-off with jitter: 20 ms, 40 ms, ... 500 ms.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            next: INITIAL_BACKOFF,
        }
    }

    /// The delay before the next attempt; +0..25 % jitter, never above the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let jitter = base.as_millis() as u64 / 4;
        let extra = if jitter == 0 {
            0
        } else {
            rand::random::<u64>() % (jitter + 1)
        };
        (base + Duration::from_millis(extra)).min(MAX_BACKOFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_name_the_call() {
        assert_eq!(call_name::<pb::ListTopicsResponse>(), "ListTopics");
        assert_eq!(call_name::<pb::AckResponse>(), "Ack");
    }

    #[test]
    fn transport_failures_are_explained_in_words_a_user_can_act_on() {
        let uri = "http://127.0.0.1:7400";
        for (m, says) in [
            (
                "tcp connect error: Connection refused (os error 111)",
                "nothing is listening",
            ),
            (
                "h2 protocol error: http2 error: frame with invalid size",
                "does not speak gRPC",
            ),
            (
                "transport error: connection error: stream closed because of a broken pipe",
                "closed the connection",
            ),
            ("invalid peer certificate: UnknownIssuer", "TLS handshake"),
            (
                "tcp connect error: dns error: failed to lookup",
                "cannot connect",
            ),
        ] {
            let e = explain_unavailable(m, uri);
            assert!(e.contains(says), "{m:?} -> {e}");
            assert!(e.contains(uri) && e.contains(m), "{e}");
        }
        // A server's own message passes through, with the proxy named.
        let e = explain_unavailable("group 7 has no leader yet", uri);
        assert_eq!(e, "group 7 has no leader yet (proxy http://127.0.0.1:7400)");
    }

    #[test]
    fn endpoints_are_normalized() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:7400").unwrap(),
            "http://127.0.0.1:7400"
        );
        assert_eq!(
            normalize_endpoint(" http://proxy:7400/ ").unwrap(),
            "http://proxy:7400"
        );
        assert_eq!(
            normalize_endpoint("https://p.example.com").unwrap(),
            "https://p.example.com"
        );
        assert_eq!(
            normalize_endpoint("[::1]:7400").unwrap(),
            "http://[::1]:7400"
        );
    }

    #[test]
    fn bad_endpoints_are_invalid_argument() {
        for bad in [
            "",
            "   ",
            "http://",
            "ftp://x:1",
            "a b:1",
            "http://x:1/path",
            "x:99999999",
        ] {
            assert!(
                matches!(normalize_endpoint(bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn empty_endpoint_list_is_invalid_argument() {
        let r = Client::connect(Vec::<String>::new());
        assert!(matches!(r, Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn outside_a_runtime_is_an_error_not_a_panic() {
        assert!(matches!(
            Client::connect(["127.0.0.1:1"]),
            Err(Error::Internal(_))
        ));
    }

    #[tokio::test]
    async fn connect_is_lazy() {
        // Nothing listens on port 1; construction must still succeed.
        let c = Client::connect(["127.0.0.1:1", "http://127.0.0.1:2"]).unwrap();
        assert_eq!(c.endpoints().len(), 2);
    }

    #[tokio::test]
    async fn down_proxies_are_retried_until_the_budget_then_fail_retryable() {
        let c = Client::builder(["127.0.0.1:1", "127.0.0.1:2"])
            .request_timeout(Duration::from_millis(300))
            .connect_timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let err = c.admin().list_topics().await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new();
        let d: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= INITIAL_BACKOFF && d[0] <= INITIAL_BACKOFF * 5 / 4);
        assert!(d[1] >= INITIAL_BACKOFF * 2);
        assert!(d.iter().all(|x| *x <= MAX_BACKOFF));
        assert_eq!(*d.last().unwrap(), MAX_BACKOFF);
    }
}
