//! `petrel-proxy`: parses flags, sets up logging, serves until SIGINT/SIGTERM.

use petrel_proxy::ProxyArgs;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let (args, explicit) = ProxyArgs::from_env();
    let print = args.print_config;
    let log_format = args.log_format;
    let text = match &args.config {
        Some(p) => match petrel_proxy::limits::read(p) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("petrel-proxy: {e}");
                std::process::exit(2);
            }
        },
        None => None,
    };
    let mut config = match args.resolve_with(text, &explicit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("petrel-proxy: {e}");
            std::process::exit(2);
        }
    };
    if print {
        print!("{}", config.to_toml());
        return;
    }
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(petrel_admin::logging::layer(log_format))
        .init();
    // SIGHUP may change the log filter (see `--config`).
    config.set_log = Some(petrel_proxy::config::LogHook(std::sync::Arc::new(
        move |l: &str| {
            let f = tracing_subscriber::EnvFilter::try_new(l).map_err(|e| e.to_string())?;
            handle.reload(f).map_err(|e| e.to_string())
        },
    )));
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
