//! `petrel-broker`: parses flags, sets up logging, runs the broker until
//! SIGINT/SIGTERM.

use clap::Parser;
use petrel_broker::BrokerArgs;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let args = BrokerArgs::parse();
    let print = args.print_config;
    let config = match args.resolve() {
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
    if let Err(e) = petrel_broker::run(config, listener, shutdown).await {
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
