//! `petrel-bench idle`: what a cluster costs with nothing to do.
//!
//! Creates a topic of `--queues` queues (RF `--replicas`) and waits until
//! every queue has a leader, waits `--settle-secs` for elections,
//! rebalancing and compactions to calm down, then measures the CPU time of
//! the server processes over `--window-secs` with no traffic at all. Every
//! other topic on the cluster counts too: the figure is the idle cost of the
//! whole cluster.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use petrel_sdk::{Admin, Client, Error as PetrelError, TopicSpec};
use serde::Serialize;

use crate::cpu::CpuSampler;

/// Longest wait for the topic to exist with a leader on every queue.
const CREATE_BUDGET: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Topic to create (an existing one with `--queues` queues is fine).
    #[arg(long, default_value = "idle")]
    pub topic: String,
    /// Queues of the topic.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub queues: u32,
    /// Replicas of the topic.
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Time budget of each request including retries, in ms (creating
    /// 1,000 queues takes a while).
    #[arg(long, default_value_t = 120_000)]
    pub timeout_ms: u64,
    /// Seconds to wait after every queue has a leader, before measuring.
    #[arg(long, default_value_t = 10)]
    pub settle_secs: u64,
    /// Seconds over which the CPU time is measured.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub window_secs: u64,
}

#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub workload: &'static str,
    pub queues: u32,
    /// Wall-clock length of the measuring window.
    pub seconds: f64,
    /// CPU seconds of the server processes per wall-clock second; null when
    /// no server process could be read.
    pub server_cpu_cores: Option<f64>,
    pub server_cpu_percent_of_core: Option<f64>,
    /// Server processes measured.
    pub server_pids: usize,
}

/// Creates the topic (retrying while the cluster is unavailable or slow)
/// and waits until it describes with `queues` queues that all have a
/// leader.
async fn create_and_wait(admin: &Admin, a: &IdleArgs) -> anyhow::Result<()> {
    let spec = TopicSpec::new(a.topic.clone())
        .queues(a.queues)
        .replicas(a.replicas);
    let started = Instant::now();
    loop {
        match admin.create_topic(spec.clone()).await {
            Ok(_) | Err(PetrelError::AlreadyExists(_)) => break,
            Err(e @ (PetrelError::Unavailable(_) | PetrelError::Timeout(_))) => {
                eprintln!("idle: creating {}: {e}; retrying", a.topic);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("creating topic {}", a.topic)),
        }
    }
    let mut last_report = Instant::now();
    loop {
        match admin.describe_topic(a.topic.clone()).await {
            Ok(info) => {
                let led = info.queues.iter().filter(|q| q.leader != 0).count();
                let configured = info.config.as_ref().map_or(a.queues, |c| c.queue_count);
                anyhow::ensure!(
                    configured == a.queues,
                    "topic {} already exists with {configured} queues, not {}",
                    a.topic,
                    a.queues
                );
                if info.queues.len() == a.queues as usize && led == info.queues.len() {
                    eprintln!(
                        "idle: {} queues have a leader after {:.1} s",
                        a.queues,
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                if last_report.elapsed() >= Duration::from_secs(5) {
                    eprintln!(
                        "idle: {led} of {} queues have a leader ({} described)",
                        a.queues,
                        info.queues.len()
                    );
                    last_report = Instant::now();
                }
            }
            Err(e @ (PetrelError::Unavailable(_) | PetrelError::Timeout(_))) => {
                eprintln!("idle: describing {}: {e}; retrying", a.topic);
            }
            Err(e) => return Err(e).with_context(|| format!("describing topic {}", a.topic)),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the measurement against the proxies at `endpoint`, measuring `pids`
/// (or every server process found on this machine).
pub async fn run(
    a: &IdleArgs,
    endpoint: &[String],
    pids: Option<&[u32]>,
) -> anyhow::Result<IdleReport> {
    let client = Client::builder(endpoint.to_vec())
        .request_timeout(Duration::from_millis(a.timeout_ms))
        .build()
        .context("connecting")?;
    tokio::time::timeout(CREATE_BUDGET, create_and_wait(&client.admin(), a))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "topic {} did not get a leader on all {} queues within {CREATE_BUDGET:?}",
                a.topic,
                a.queues
            )
        })??;
    eprintln!("idle: settling for {} s", a.settle_secs);
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    let sampler = CpuSampler::start(pids);
    if sampler.pids() == 0 {
        eprintln!("idle: no server process to measure; CPU fields will be null");
    }
    eprintln!(
        "idle: measuring {} server processes for {} s",
        sampler.pids(),
        a.window_secs
    );
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.window_secs)).await;
    let usage = sampler.finish();
    Ok(IdleReport {
        workload: "idle",
        queues: a.queues,
        seconds: usage.map_or_else(|| window.elapsed().as_secs_f64(), |u| u.wall_seconds),
        server_cpu_cores: usage.map(|u| u.cores()),
        server_cpu_percent_of_core: usage.map(|u| u.cores() * 100.0),
        server_pids: usage.map_or(0, |u| u.pids),
    })
}
