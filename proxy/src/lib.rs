//! Petrel proxy: the stateless front end.
//!
//! ```text
//!  sdk ──petrel.v1.Petrel──▶ service.rs ──validate, pick queue──▶ batcher.rs (per leader)
//!                                │                                  │
//!                                └── routes.rs (cached route table) ◀┘ BrokerData RPCs
//! ```
//!
//! # Invariants
//! - The proxy keeps no consumer state: leases, offsets and retry schedules
//!   live in brokers; receipt handles carry what an ack needs to be routed.
//! - The queue a send goes to is a pure function of the request (key hash,
//!   or producer id + first sequence), so a retried request lands in the
//!   same queue and is de-duplicated there.

pub mod auth;
pub mod batcher;
pub mod config;
pub mod limits;
pub mod rocketmq;
pub mod routes;
pub mod service;

pub use config::{ProxyArgs, ProxyConfig};
use petrel_proto::pb::petrel_server::PetrelServer;
use petrel_proto::pb::rocketmq::messaging_service_server::MessagingServiceServer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// Largest client message accepted (a send batch).
pub const MAX_CLIENT_MESSAGE: usize = 64 << 20;

/// Serves the client API on `listener` until `shutdown` is cancelled, then
/// drains: turns not-ready, ends open long-polls and transaction-check
/// streams (clients come back through another proxy), keeps serving for
/// `drain_delay`, stops taking connections (HTTP/2 GOAWAY) and finishes
/// in-flight requests within `shutdown_grace`.
pub async fn run(
    config: ProxyConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let auth = Arc::new(match &config.auth {
        config::AuthMode::Anonymous => {
            tracing::warn!(
                "anonymous access: anyone who reaches this proxy may do anything (use --auth-file in production)"
            );
            auth::Auth::anonymous()
        }
        config::AuthMode::File { text, .. } => {
            auth::Auth::from_text(text).map_err(|e| anyhow::anyhow!("auth file: {e}"))?
        }
    });
    if let config::AuthMode::File { path, text } = &config.auth {
        let (a, stop) = (auth.clone(), shutdown.child_token());
        tokio::spawn(petrel_admin::watch_config(
            path.clone(),
            Some(text.clone()),
            petrel_admin::CONFIG_POLL,
            "petrel_proxy_auth",
            async move { stop.cancelled().await },
            move |text, _| a.reload(text),
        ));
    }
    let cluster_tls = match &config.cluster_tls {
        Some(f) => Some(
            petrel_proto::tls::ClientTls::load(f.clone())
                .map_err(|e| anyhow::anyhow!("cluster TLS: {e}"))?,
        ),
        None => None,
    };
    let client_tls = match &config.tls {
        Some(f) => Some(
            petrel_proto::tls::ServerTls::load(f.clone(), petrel_proto::tls::ClientAuth::Optional)
                .map_err(|e| anyhow::anyhow!("TLS: {e}"))?,
        ),
        None => None,
    };
    let router = routes::Router::new(config.brokers.clone(), cluster_tls);
    tokio::spawn(
        router
            .clone()
            .run(config.route_refresh, shutdown.child_token()),
    );
    let draining = Arc::new(AtomicBool::new(false));
    if let Some(a) = config.admin_listen {
        let l = petrel_admin::bind(a).await?;
        let admin_tls = match &config.admin_tls {
            Some((cert, key)) => Some(
                petrel_proto::tls::ServerTls::load_http1(cert.clone(), key.clone())
                    .map_err(|e| anyhow::anyhow!("--admin-tls-cert: {e}"))?,
            ),
            None => None,
        };
        let (r, d) = (router.clone(), draining.clone());
        let ready: petrel_admin::Readiness = Arc::new(move || {
            if d.load(Ordering::Acquire) {
                return Err("draining".into());
            }
            r.table().readiness()
        });
        let stop = shutdown.clone();
        tokio::spawn(async move {
            // The admin endpoint outlives the drain by the grace period at
            // most (the process exits after it).
            if let Err(e) = petrel_admin::serve(l, ready, admin_tls, async move {
                stop.cancelled().await;
                std::future::pending::<()>().await
            })
            .await
            {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        });
    }
    tokio::spawn(listen_overflow_loop(shutdown.child_token()));
    // Series that would otherwise appear only at their first event.
    metrics::gauge!("petrel_proxy_draining").set(0.0);
    metrics::counter!("petrel_proxy_accept_errors_total").increment(0);
    metrics::counter!("petrel_proxy_connections_accepted_total").increment(0);
    for limit in ["receives_per_client", "requests_per_client", "receive_rate"] {
        metrics::counter!("petrel_proxy_limit_refusals_total", "limit" => limit).increment(0);
    }
    let (drain_delay, grace) = (config.drain_delay, config.shutdown_grace);
    let rocketmq_listen = config.rocketmq_listen;
    let max_streams = config.max_streams_per_connection;
    let limiter = Arc::new(limits::Limiter::new(config.runtime.clone()));
    if let Some(path) = config.config_path.clone() {
        let (l, hook, flag_log, started) = (
            limiter.clone(),
            config.set_log.clone(),
            config.flag_log.clone(),
            config.file_static.clone(),
        );
        let stop = shutdown.child_token();
        tokio::spawn(petrel_admin::watch_config(
            path,
            config.config_text.clone(),
            petrel_admin::CONFIG_POLL,
            "petrel_proxy",
            async move { stop.cancelled().await },
            move |text, _| apply_runtime(text, &l, hook.as_ref(), flag_log.as_deref(), &started),
        ));
    }
    let streams_stop = CancellationToken::new();
    let svc = service::ProxyService::new(
        config,
        router,
        streams_stop.clone(),
        draining.clone(),
        limiter,
        auth,
    );
    // Count accepted connections (and failed accepts), so a full accept
    // backlog or refused connections show up in /metrics.
    fn count<T, E>(c: &Result<T, E>) {
        match c {
            Ok(_) => metrics::counter!("petrel_proxy_connections_accepted_total").increment(1),
            Err(_) => metrics::counter!("petrel_proxy_accept_errors_total").increment(1),
        }
    }
    let drain = Drain {
        shutdown,
        draining,
        streams_stop,
        drain_delay,
        grace,
        max_streams,
    };
    // The second port (--rocketmq-listen) feeds the same server.
    let second = match rocketmq_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("--rocketmq-listen: cannot listen on {a}: {e}"))?,
        ),
        None => None,
    };
    match client_tls {
        Some(tls) => {
            let incoming = tls.clone().incoming(listener, "petrel_proxy");
            let mut incoming = futures::StreamExt::boxed(incoming);
            if let Some(l) = second {
                incoming =
                    futures::StreamExt::boxed(incoming.merge(tls.incoming(l, "petrel_proxy")));
            }
            let incoming = incoming.map(move |c| {
                count(&c);
                c
            });
            serve_until(svc, incoming, drain).await
        }
        None => {
            let mut incoming =
                futures::StreamExt::boxed(tokio_stream::wrappers::TcpListenerStream::new(listener));
            if let Some(l) = second {
                incoming = futures::StreamExt::boxed(
                    incoming.merge(tokio_stream::wrappers::TcpListenerStream::new(l)),
                );
            }
            let incoming = incoming.map(move |c| {
                count(&c);
                if let Ok(s) = &c {
                    // tonic's `tcp_nodelay` does not reach streams passed in
                    // (see `petrel_proto::transport`).
                    let _ = s.set_nodelay(true);
                }
                c
            });
            serve_until(svc, incoming, drain).await
        }
    }
}

/// Largest header block (metadata) a call may carry.
const MAX_HEADER_BYTES: u32 = 16 << 10;
/// HTTP/2 keepalive ping interval and timeout on client connections.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(20);

/// What a drain needs (see [`run`]).
struct Drain {
    shutdown: CancellationToken,
    draining: Arc<AtomicBool>,
    streams_stop: CancellationToken,
    drain_delay: std::time::Duration,
    grace: std::time::Duration,
    max_streams: u32,
}

/// Serves `svc` on `incoming` until shutdown, then drains (see [`run`]).
async fn serve_until<S, IO, E>(
    svc: service::ProxyService,
    incoming: S,
    d: Drain,
) -> anyhow::Result<()>
where
    S: tokio_stream::Stream<Item = Result<IO, E>> + Send + 'static,
    IO: petrel_proto::tls::ServerIo,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Drain {
        shutdown,
        draining,
        streams_stop,
        drain_delay,
        grace,
        max_streams,
    } = d;
    let server_stop = CancellationToken::new();
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Bounds one connection's share: open calls, header bytes, and a
        // dead peer is noticed by keepalive pings.
        .max_concurrent_streams(max_streams)
        .http2_max_header_list_size(MAX_HEADER_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .initial_stream_window_size(Some(petrel_proto::transport::STREAM_WINDOW))
        .initial_connection_window_size(Some(petrel_proto::transport::CONNECTION_WINDOW))
        .layer(petrel_admin::RpcMetricsLayer {
            prefix: "petrel_proxy",
        })
        .add_service(
            MessagingServiceServer::new(rocketmq::RocketMqService::new(svc.clone(), svc.auth()))
                .max_decoding_message_size(MAX_CLIENT_MESSAGE)
                .max_encoding_message_size(MAX_CLIENT_MESSAGE),
        )
        .add_service(
            PetrelServer::new(svc)
                .max_decoding_message_size(MAX_CLIENT_MESSAGE)
                .max_encoding_message_size(MAX_CLIENT_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, server_stop.clone().cancelled_owned());
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => return Ok(r?),
        _ = shutdown.cancelled() => {}
    }
    tracing::info!(?drain_delay, ?grace, "draining");
    draining.store(true, Ordering::Release);
    metrics::gauge!("petrel_proxy_draining").set(1.0);
    streams_stop.cancel();
    tokio::select! {
        r = &mut serve => return Ok(r?),
        _ = tokio::time::sleep(drain_delay) => {}
    }
    server_stop.cancel();
    match tokio::time::timeout(grace, serve).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            tracing::warn!(
                ?grace,
                "in-flight requests still open after the grace period; exiting"
            );
            Ok(())
        }
    }
}

/// Applies a new `--config` text: a valid file replaces the runtime
/// settings (rate limits, log filter) at once, without touching any
/// connection, and names changed static settings as waiting for a restart;
/// an invalid one is refused with the reason (and
/// [`petrel_admin::watch_config`] logs it and keeps the running
/// settings).
fn apply_runtime(
    text: &str,
    limiter: &limits::Limiter,
    set_log: Option<&config::LogHook>,
    flag_log: Option<&str>,
    started: &config::FileStatic,
) -> Result<(), String> {
    let (fixed, c) = config::parse_file(text)?;
    if let Some(hook) = set_log {
        // A --log flag (or PETREL_LOG) wins over the file; a file that no
        // longer sets `log` goes back to the default.
        (hook.0)(flag_log.or(c.log.as_deref()).unwrap_or("info"))?;
    }
    limiter.replace(c);
    if fixed != *started {
        tracing::warn!(
            "the config file changes settings that take effect only after a restart (only log and rate_limits reload)"
        );
    }
    Ok(())
}

/// A full accept backlog never reaches the process: the kernel drops the
/// connection and counts it. Export those counters (per network namespace,
/// i.e. per pod on Kubernetes, host-wide on bare metal) every 5 s as
/// `petrel_proxy_listen_overflows_total` and `petrel_proxy_listen_drops_total`.
async fn listen_overflow_loop(stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(text) = tokio::fs::read_to_string("/proc/net/netstat").await else {
            return; // not Linux: nothing to export
        };
        for (name, metric) in [
            ("ListenOverflows", "petrel_proxy_listen_overflows_total"),
            ("ListenDrops", "petrel_proxy_listen_drops_total"),
        ] {
            if let Some(v) = netstat_value(&text, "TcpExt", name) {
                metrics::counter!(metric).absolute(v);
            }
        }
    }
}

/// One value of `/proc/net/netstat`, which pairs a header line of names
/// with a line of values under the same prefix (`TcpExt:`).
fn netstat_value(text: &str, section: &str, name: &str) -> Option<u64> {
    let prefix = format!("{section}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let i = names.split_whitespace().position(|n| n == name);
        if let Some(i) = i {
            return values.split_whitespace().nth(i)?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::netstat_value;

    #[test]
    fn reads_netstat_pairs_and_tolerates_garbage() {
        let t = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 17 19\nIpExt: InNoRoutes\nIpExt: 4\n";
        assert_eq!(netstat_value(t, "TcpExt", "ListenOverflows"), Some(17));
        assert_eq!(netstat_value(t, "TcpExt", "ListenDrops"), Some(19));
        assert_eq!(netstat_value(t, "IpExt", "InNoRoutes"), Some(4));
        assert_eq!(netstat_value(t, "TcpExt", "Nope"), None);
        assert_eq!(
            netstat_value("TcpExt: ListenDrops\n", "TcpExt", "ListenDrops"),
            None
        );
        assert_eq!(
            netstat_value("TcpExt: ListenDrops\nTcpExt: x\n", "TcpExt", "ListenDrops"),
            None
        );
        assert_eq!(netstat_value("", "TcpExt", "ListenDrops"), None);
    }
}
