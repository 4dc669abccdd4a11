//! `petrel dev`: an embedded local cluster (N brokers + 1 proxy) in one
//! process, with all data under one directory. [`LocalCluster`] is also the
//! in-process harness the integration tests use.
//!
//! Ports: the proxy listens on `--port`, broker i on `--port + i`. Brokers
//! record each other's addresses in the cluster map, so a restart must use
//! the same ports (it does, given the same `--port`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use petrel_broker::BrokerArgs;
use petrel_proxy::ProxyConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long `petrel dev` waits for the cluster to elect its leaders.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Directory for all broker data (created if missing; reused on restart).
    #[arg(long, default_value = "./petrel-data")]
    pub data_dir: PathBuf,
    /// Number of brokers (1 to 9).
    #[arg(long, default_value_t = 3)]
    pub brokers: u32,
    /// Port of the proxy; broker i listens on PORT + i.
    #[arg(long, default_value_t = 7400)]
    pub port: u16,
    /// Serve the admin HTTP endpoint (/metrics, /healthz, /readyz) for the
    /// whole embedded cluster on 127.0.0.1:ADMIN_PORT [default: off].
    #[arg(long)]
    pub admin_port: Option<u16>,
}

/// Options for [`LocalCluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub data_dir: PathBuf,
    pub brokers: u32,
    /// Proxy port; 0 picks free ports for everything.
    pub port: u16,
    pub heartbeat_ms: Option<u64>,
    pub election_timeout_ms: Option<u64>,
    /// Brokers' `--transaction-check-ms` (default 5000).
    pub transaction_check_ms: Option<u64>,
}

impl ClusterOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            brokers: 3,
            port: 0,
            heartbeat_ms: None,
            election_timeout_ms: None,
            transaction_check_ms: None,
        }
    }
}

/// Brokers and a proxy running as tasks of the current tokio runtime.
pub struct LocalCluster {
    pub proxy_addr: SocketAddr,
    pub broker_addrs: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// The brokers, weakly: for readiness, never keeping one alive.
    nodes: Vec<std::sync::Weak<petrel_broker::Node>>,
}

async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port} (is another cluster running?)"))
}

impl LocalCluster {
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=9).contains(&opts.brokers), "--brokers must be 1..=9");
        std::fs::create_dir_all(&opts.data_dir)
            .with_context(|| format!("creating {}", opts.data_dir.display()))?;
        let proxy_l = bind(opts.port).await?;
        let mut broker_ls = Vec::new();
        for i in 1..=opts.brokers {
            let port = if opts.port == 0 {
                0
            } else {
                opts.port
                    .checked_add(i as u16)
                    .context("--port too high for the broker ports after it")?
            };
            broker_ls.push(bind(port).await?);
        }
        let broker_addrs: Vec<SocketAddr> = broker_ls
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<_, _>>()?;
        let peers = broker_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut nodes = Vec::new();
        for (i, l) in broker_ls.into_iter().enumerate() {
            let id = i as u64 + 1;
            let cfg = BrokerArgs {
                id: Some(id),
                data_dir: Some(broker_dir(&opts.data_dir, id)),
                listen: Some(broker_addrs[i]),
                peers: Some(peers.clone()),
                heartbeat_ms: opts.heartbeat_ms,
                election_timeout_ms: opts.election_timeout_ms,
                transaction_check_ms: opts.transaction_check_ms,
                ..Default::default()
            }
            .resolve()?;
            let (node, task) = petrel_broker::spawn_with(cfg, l, shutdown.clone(), false).await?;
            nodes.push(std::sync::Arc::downgrade(&node));
            tasks.push(task);
        }
        let proxy_addr = proxy_l.local_addr()?;
        let pcfg = ProxyConfig::new(
            proxy_addr,
            broker_addrs.iter().map(|a| a.to_string()).collect(),
        );
        let s = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            petrel_proxy::run(pcfg, proxy_l, s).await
        }));
        Ok(Self {
            proxy_addr,
            broker_addrs,
            data_dir: opts.data_dir,
            shutdown,
            tasks,
            nodes,
        })
    }

    /// Ready when every broker is ([`petrel_broker::Node::readiness`]).
    pub fn readiness(&self) -> Result<(), String> {
        nodes_ready(&self.nodes)
    }

    /// Serves the admin endpoint for the whole cluster on `port`
    /// (127.0.0.1) until the cluster stops.
    pub async fn serve_admin(&self, port: u16) -> anyhow::Result<()> {
        let l = petrel_admin::bind(([127, 0, 0, 1], port).into()).await?;
        let nodes = self.nodes.clone();
        let ready: petrel_admin::Readiness = std::sync::Arc::new(move || nodes_ready(&nodes));
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) =
                petrel_admin::serve(l, ready, None, async move { stop.cancelled().await }).await
            {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        });
        Ok(())
    }

    pub fn endpoint(&self) -> String {
        self.proxy_addr.to_string()
    }

    /// Waits until the meta group has a leader and every broker is
    /// registered and reachable through the proxy.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let client = petrel_sdk::Client::connect([self.endpoint()])?;
        let admin = client.admin();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(c) = admin.describe_cluster().await {
                if c.meta_leader != 0
                    && c.brokers.len() == self.broker_addrs.len()
                    && c.brokers.iter().all(|b| b.reachable)
                {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "cluster not ready after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every broker and the proxy and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn nodes_ready(nodes: &[std::sync::Weak<petrel_broker::Node>]) -> Result<(), String> {
    for (i, n) in nodes.iter().enumerate() {
        match n.upgrade() {
            Some(n) => n
                .readiness()
                .map_err(|e| format!("broker {}: {e}", i + 1))?,
            None => return Err(format!("broker {} stopped", i + 1)),
        }
    }
    Ok(())
}

pub fn broker_dir(data_dir: &Path, id: u64) -> PathBuf {
    data_dir.join(format!("broker-{id}"))
}

pub async fn run(args: DevArgs, json: bool) -> anyhow::Result<()> {
    let opts = ClusterOptions {
        data_dir: args.data_dir.clone(),
        brokers: args.brokers,
        port: args.port,
        heartbeat_ms: None,
        election_timeout_ms: None,
        transaction_check_ms: None,
    };
    if args.admin_port.is_some() {
        // Before the brokers start, so no metric recorded at start is lost.
        petrel_admin::recorder();
    }
    let cluster = LocalCluster::start(opts).await?;
    if let Some(p) = args.admin_port {
        cluster.serve_admin(p).await?;
    }
    cluster.wait_ready(READY_TIMEOUT).await?;
    let endpoint = cluster.endpoint();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "event": "ready",
                "endpoint": endpoint,
                "brokers": cluster.broker_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "data_dir": args.data_dir.display().to_string(),
                "auth": "anonymous",
            })
        );
    } else {
        println!("petrel dev cluster ready");
        println!("  proxy endpoint: {endpoint}");
        for (i, a) in cluster.broker_addrs.iter().enumerate() {
            println!(
                "  broker {}: {a}  data: {}",
                i + 1,
                broker_dir(&args.data_dir, i as u64 + 1).display()
            );
        }
        println!("  access: anonymous (no users, anyone on this machine may do anything; production proxies take --auth-file)");
        println!("try:  petrel --endpoint {endpoint} topic create demo --queues 4 --replicas 3");
        println!("Press Ctrl-C to stop (data is kept; run again to restart on it).");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    wait_for_signal().await;
    eprintln!("stopping...");
    cluster.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
