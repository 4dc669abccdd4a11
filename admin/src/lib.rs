//! What the Petrel servers (broker, proxy, `petrel dev`) run besides their
//! RPC services: the admin HTTP endpoint every process serves on its own
//! port, the per-RPC metrics behind it, the config file watcher, and the
//! log output ([`logging`]).
//!
//! ```text
//!  GET /metrics  Prometheus text format (the process-wide `metrics` recorder)
//!  GET /healthz  200 "ok" while the process runs
//!  GET /readyz   200 "ready", or 503 with the reason it is not
//! ```
//!
//! A crate of its own rather than a feature of `petrel-proto`: it is
//! server I/O (an HTTP server, signals, file polling, a log subscriber),
//! and the protocol crate the SDK links stays a codec.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

pub mod logging;

/// Why a process is not ready, or `Ok` when it is.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets (seconds) for every `*_seconds` histogram.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the process-wide Prometheus recorder (once; later calls return
/// the same handle). If another recorder was installed first, metrics are
/// not exported and `/metrics` is empty.
pub fn recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let b = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("non-empty buckets");
            match b.install_recorder() {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    ready: Readiness,
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves:
/// HTTPS when `tls` is given (its certificate re-read when it changes).
pub async fn serve(
    listener: TcpListener,
    ready: Readiness,
    tls: Option<Arc<petrel_proto::tls::ServerTls>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AdminState {
        metrics: recorder(),
        ready,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    // Our own accept loop rather than `axum::serve`, for two bounds a port
    // that anyone on the network can reach needs: a request head must
    // arrive within ADMIN_HEADER_TIMEOUT (a half-sent request does not hold
    // a connection forever), and at most ADMIN_MAX_CONNECTIONS are open
    // (idle scrapers cannot use up the process's file descriptors).
    let limit = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Over the bound: close it at once rather than queue it.
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let http = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .clone();
            match acceptor {
                None => {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = http.serve_connection(io, service).await;
                }
                Some(a) => {
                    // The handshake shares the request head's time bound.
                    match tokio::time::timeout(ADMIN_HEADER_TIMEOUT, a.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let io = hyper_util::rt::TokioIo::new(s);
                            let _ = http.serve_connection(io, service).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "admin TLS handshake failed"),
                        Err(_) => tracing::debug!("admin TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// How long a client may take to send a request head on the admin port.
pub const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most admin connections open at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 128;

/// Binds `addr` (a clear error names it) and installs the recorder, so
/// metrics recorded from now on (before the endpoint task runs) are kept.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    recorder();
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("admin endpoint cannot listen on {addr}: {e}"),
        )
    })
}

async fn metrics(State(s): State<AdminState>) -> String {
    s.metrics.render()
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    match (s.ready)() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Times and counts every gRPC call by method, on the server side:
/// `{prefix}_rpc_duration_seconds{rpc}` (until the response body ends, so a
/// streaming call or a long-poll counts its whole length),
/// `{prefix}_rpc_errors_total{rpc,code,petrel_code}` (gRPC status of a
/// failed call, from the head or the trailers, and Petrel's stable code
/// from its error detail), `{prefix}_inflight_requests`.
#[derive(Debug, Clone, Copy)]
pub struct RpcMetricsLayer {
    pub prefix: &'static str,
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            prefix: self.prefix,
        }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    prefix: &'static str,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// One call being measured; recorded once, when its body ends or is
/// dropped (a client that goes away still ends the call).
struct CallMetrics {
    prefix: &'static str,
    rpc: String,
    start: std::time::Instant,
    inflight: metrics::Gauge,
    /// The error status seen so far (head or trailers).
    failed: Option<tonic::Status>,
    done: bool,
}

impl CallMetrics {
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let prefix = self.prefix;
        self.inflight.decrement(1.0);
        // A path no service implements gets one label, so callers cannot
        // make a new series per made-up method name.
        if self
            .failed
            .as_ref()
            .is_some_and(|s| s.code() == tonic::Code::Unimplemented)
        {
            self.rpc = "unknown".to_string();
        }
        metrics::histogram!(format!("{prefix}_rpc_duration_seconds"), "rpc" => self.rpc.clone())
            .record(self.start.elapsed().as_secs_f64());
        if let Some(s) = self.failed.take() {
            let code = format!("{:?}", s.code());
            let petrel = petrel_proto::PetrelError::from_status(&s).code_name();
            metrics::counter!(
                format!("{prefix}_rpc_errors_total"),
                "rpc" => self.rpc.clone(),
                "code" => code,
                "petrel_code" => petrel
            )
            .increment(1);
        }
    }

    fn see(&mut self, headers: &http::HeaderMap) {
        if let Some(s) = tonic::Status::from_header_map(headers) {
            if s.code() != tonic::Code::Ok {
                self.failed = Some(s);
            }
        }
    }
}

impl Drop for CallMetrics {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A response body that finishes its call's metrics when it ends.
pub struct MeteredBody<B> {
    inner: std::pin::Pin<Box<B>>,
    call: CallMetrics,
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let r = this.inner.as_mut().poll_frame(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref() {
                    this.call.see(t);
                }
            }
            std::task::Poll::Ready(Some(Err(_))) => {
                this.call.failed = Some(tonic::Status::unknown("response body failed"));
                this.call.finish();
            }
            std::task::Poll::Ready(None) => this.call.finish(),
            std::task::Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let prefix = self.prefix;
        let inflight = metrics::gauge!(format!("{prefix}_inflight_requests"));
        inflight.increment(1.0);
        let mut call = CallMetrics {
            prefix,
            rpc,
            start: std::time::Instant::now(),
            inflight,
            failed: None,
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    call.see(resp.headers());
                    Ok(resp.map(|b| MeteredBody {
                        inner: Box::pin(b),
                        call,
                    }))
                }
                Err(e) => {
                    call.failed = Some(tonic::Status::unknown("service failed"));
                    call.finish();
                    Err(e)
                }
            }
        })
    }
}

/// How often [`watch_config`] looks at the file for a change. A Kubernetes
/// ConfigMap update swaps a symlink rather than writing the file, which
/// inotify-style watches on the file miss; reading a small file every
/// couple of seconds sees every kind of change.
pub const CONFIG_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a config reload ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadCause {
    /// SIGHUP: the file is re-applied even if it did not change.
    Signal,
    /// The file's contents changed.
    FileChanged,
}

/// Re-reads the config file at `path` on SIGHUP, and whenever its contents
/// change (checked every `poll`), and hands the text to `apply` until
/// `stop` resolves. `initial` is the text the process started with, so an
/// unchanged file is not re-applied. A rejected file (`apply` returns the
/// reason) is logged and counted in `{prefix}_config_reload_errors_total`,
/// and is not retried until it changes again or SIGHUP asks; the caller
/// keeps its running settings. Successes count in
/// `{prefix}_config_reloads_total`. Connections are never touched here.
pub async fn watch_config<F>(
    path: std::path::PathBuf,
    initial: Option<String>,
    poll: std::time::Duration,
    prefix: &'static str,
    stop: impl std::future::Future<Output = ()>,
    mut apply: F,
) where
    F: FnMut(&str, ReloadCause) -> Result<(), String>,
{
    #[cfg(unix)]
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot install a SIGHUP handler; reloading on file change only");
            None
        }
    };
    // Export both counters from the start, so a scrape sees 0 rather than
    // no series before the first reload.
    metrics::counter!(format!("{prefix}_config_reloads_total")).increment(0);
    metrics::counter!(format!("{prefix}_config_reload_errors_total")).increment(0);
    let mut seen = initial;
    let mut missing = false;
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        #[cfg(unix)]
        let signal = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signal = std::future::pending::<Option<()>>();
        let cause = tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => ReloadCause::FileChanged,
            s = signal => match s {
                Some(_) => ReloadCause::Signal,
                None => return,
            },
        };
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                // A file briefly missing (an editor's rename, a ConfigMap
                // swap) is not an error on a poll, but one gone for good
                // should not go unnoticed: warn once. A SIGHUP asked for it.
                if cause == ReloadCause::FileChanged && !missing {
                    missing = true;
                    tracing::warn!(path = %path.display(), error = %e, "config file unreadable; keeping the running configuration");
                }
                if cause == ReloadCause::Signal {
                    metrics::counter!(format!("{prefix}_config_reload_errors_total")).increment(1);
                    tracing::error!(path = %path.display(), error = %e, "config reload failed; keeping the running configuration");
                }
                continue;
            }
        };
        if missing {
            missing = false;
            tracing::info!(path = %path.display(), "config file readable again");
        }
        if cause == ReloadCause::FileChanged && seen.as_deref() == Some(text.as_str()) {
            continue;
        }
        seen = Some(text.clone());
        match apply(&text, cause) {
            Ok(()) => {
                metrics::counter!(format!("{prefix}_config_reloads_total")).increment(1);
                tracing::info!(path = %path.display(), ?cause, "configuration reloaded");
            }
            Err(e) => {
                metrics::counter!(format!("{prefix}_config_reload_errors_total")).increment(1);
                tracing::error!(path = %path.display(), ?cause, error = %e, "config reload rejected; keeping the running configuration");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_probes_and_drops_a_half_sent_request() {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let ready: Readiness = Arc::new(|| Err("warming up".into()));
        tokio::spawn(serve(l, ready, None, std::future::pending()));

        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        assert!(out.contains("not ready: warming up"), "{out}");

        // A request head that never completes is cut off.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(
            ADMIN_HEADER_TIMEOUT + std::time::Duration::from_secs(5),
            slow.read_to_end(&mut buf),
        )
        .await;
        assert!(r.is_ok(), "a half-sent request held its connection open");
    }
}
