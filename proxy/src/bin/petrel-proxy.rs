//! `petrel-proxy`: parses flags, sets up logging, serves until SIGINT/SIGTERM.

use clap::Parser;
use petrel_proxy::ProxyArgs;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let config = match ProxyArgs::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("petrel-proxy: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("petrel-proxy: cannot listen on {}: {e}", config.listen);
            std::process::exit(1);
        }
    };
    tracing::info!(listen = %config.listen, brokers = ?config.brokers, "starting proxy");
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        s.cancel();
    });
    if let Err(e) = petrel_proxy::run(config, listener, shutdown).await {
        eprintln!("petrel-proxy: {e:#}");
        std::process::exit(1);
    }
}
