//! `petrel-broker`: parses flags, sets up logging, runs the broker until
//! SIGINT/SIGTERM, reloading its `--config` file on SIGHUP or change.

use clap::Parser;
use petrel_broker::BrokerArgs;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let args = BrokerArgs::parse();
    let print = args.print_config;
    let log_format = args.log_format;
    let config_text = match &args.config {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("petrel-broker: reading config file {}: {e}", p.display());
                std::process::exit(2);
            }
        },
        None => None,
    };
    let config = match args.clone().resolve_with(config_text.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("petrel-broker: {e}");
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
    let (filter, log_handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(petrel_admin::logging::layer(log_format))
        .init();
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("petrel-broker: cannot listen on {}: {e}", config.listen);
            std::process::exit(1);
        }
    };
    tracing::info!(id = config.id, listen = %config.listen, data_dir = %config.data_dir.display(), peers = ?config.peers, "starting broker");
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        s.cancel();
    });
    let (node, task) = match petrel_broker::spawn(config, listener, shutdown.clone()).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "broker failed");
            eprintln!("petrel-broker: {e:#}");
            std::process::exit(1);
        }
    };
    if let Some(path) = args.config.clone() {
        // Reload on SIGHUP and on a change of the file: flags and env
        // still win over it, exactly as at start.
        let weak = std::sync::Arc::downgrade(&node);
        let stop = shutdown.clone();
        tokio::spawn(petrel_admin::watch_config(
            path,
            config_text,
            petrel_admin::CONFIG_POLL,
            "petrel_broker",
            async move { stop.cancelled().await },
            move |text, _| {
                let Some(node) = weak.upgrade() else {
                    return Ok(());
                };
                let new = args
                    .clone()
                    .resolve_with(Some(text))
                    .map_err(|e| e.to_string())?;
                if new.log != node.runtime.log() {
                    let f = tracing_subscriber::EnvFilter::try_new(&new.log)
                        .map_err(|e| e.to_string())?;
                    log_handle.reload(f).map_err(|e| e.to_string())?;
                }
                let r = node.runtime.apply(&node.config, &new);
                if !r.applied.is_empty() {
                    tracing::info!(settings = ?r.applied, "runtime settings changed");
                }
                if !r.need_restart.is_empty() {
                    tracing::warn!(settings = ?r.need_restart, "config file changes settings that take effect only after a restart");
                }
                Ok(())
            },
        ));
    }
    let result = match task.await {
        Ok(r) => r,
        Err(e) => Err(e.into()),
    };
    drop(node);
    if let Err(e) = result {
        tracing::error!(error = %e, "broker failed");
        eprintln!("petrel-broker: {e:#}");
        std::process::exit(1);
    }
}

async fn wait_for_signal() {
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
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
