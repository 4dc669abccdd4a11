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

pub mod batcher;
pub mod config;
pub mod limits;
pub mod routes;
pub mod service;

pub use config::{ProxyArgs, ProxyConfig};
use petrel_proto::pb::petrel_server::PetrelServer;
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
    if config.receipt_secret == config::DEV_RECEIPT_SECRET {
        tracing::warn!("using the development receipt secret; set --receipt-secret in production");
    }
    let router = routes::Router::new(config.brokers.clone());
    tokio::spawn(
        router
            .clone()
            .run(config.route_refresh, shutdown.child_token()),
    );
    let draining = Arc::new(AtomicBool::new(false));
    if let Some(a) = config.admin_listen {
        let l = petrel_proto::admin::bind(a).await?;
        let (r, d) = (router.clone(), draining.clone());
        let ready: petrel_proto::admin::Readiness = Arc::new(move || {
            if d.load(Ordering::Acquire) {
                return Err("draining".into());
            }
            r.table().readiness()
        });
        let stop = shutdown.clone();
        tokio::spawn(async move {
            // The admin endpoint outlives the drain by the grace period at
            // most (the process exits after it).
            if let Err(e) = petrel_proto::admin::serve(l, ready, async move {
                stop.cancelled().await;
                std::future::pending::<()>().await
            })
            .await
            {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        });
    }
    let (drain_delay, grace) = (config.drain_delay, config.shutdown_grace);
    let limiter = Arc::new(limits::Limiter::new(config.runtime.clone()));
    if let Some(path) = config.config_path.clone() {
        tokio::spawn(reload_on_sighup(
            path,
            limiter.clone(),
            config.set_log.clone(),
            shutdown.child_token(),
        ));
    }
    let streams_stop = CancellationToken::new();
    let svc = service::ProxyService::new(
        config,
        router,
        streams_stop.clone(),
        draining.clone(),
        limiter,
    );
    // Count accepted connections (and failed accepts), so a full accept
    // backlog or refused connections show up in /metrics.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|c| {
        match &c {
            Ok(_) => metrics::counter!("petrel_proxy_connections_accepted_total").increment(1),
            Err(_) => metrics::counter!("petrel_proxy_accept_errors_total").increment(1),
        }
        c
    });
    let server_stop = CancellationToken::new();
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .layer(petrel_proto::admin::RpcMetricsLayer {
            prefix: "petrel_proxy",
        })
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

/// Re-reads `path` on every SIGHUP: a valid file replaces the runtime
/// settings (rate limits, log filter) at once, without touching any
/// connection; an invalid one is rejected with a logged reason and the
/// running settings stay.
async fn reload_on_sighup(
    path: std::path::PathBuf,
    limiter: Arc<limits::Limiter>,
    set_log: Option<config::LogHook>,
    stop: CancellationToken,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot install a SIGHUP handler; config reload disabled");
            return;
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                s = hup.recv() => if s.is_none() { return },
            }
            match limits::RuntimeConfig::load(&path) {
                Ok(c) => {
                    if let (Some(l), Some(hook)) = (&c.log, &set_log) {
                        if let Err(e) = (hook.0)(l) {
                            metrics::counter!("petrel_proxy_config_reload_errors_total")
                                .increment(1);
                            tracing::error!(error = %e, "config reload rejected; keeping the previous configuration");
                            continue;
                        }
                    }
                    limiter.replace(c);
                    metrics::counter!("petrel_proxy_config_reloads_total").increment(1);
                    tracing::info!(path = %path.display(), "configuration reloaded");
                }
                Err(e) => {
                    metrics::counter!("petrel_proxy_config_reload_errors_total").increment(1);
                    tracing::error!(error = %e, "config reload rejected; keeping the previous configuration");
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, limiter, set_log);
        stop.cancelled().await;
    }
}
