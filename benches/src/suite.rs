//! `petrel-bench suite`: every workload against a cluster of its own.
//!
//! Starts a [`LocalCluster`] (3 brokers + 1 proxy, separate processes from
//! the binaries beside this one, default flags), waits until it accepts a
//! topic (a 1-queue topic `suite-RUN-ready`), then runs the [`plan`] in
//! order, each step measuring the CPU of exactly the cluster's processes.
//! Each step's JSON report is printed on stdout as it completes; at the end
//! a Markdown table of all of them goes to stderr and to stdout.
//!
//! Every step but `consume` uses a fresh topic of 8 queues, RF 3, that it
//! creates; `consume` reads back what `produce` wrote. `drain` fills its
//! topic and drains it; `e2e` publishes at a fixed rate while receiving. `idle` runs last on
//! its own topic, so the topics of the earlier steps (idle by then) are part
//! of the idle cost it measures.
//!
//! To add a workload: a [`Step`] variant, its [`Step::label`] and
//! [`Step::run`] arms (returning an [`Outcome`]), and an entry in [`plan`].

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use petrel_sdk::{Client, TopicSpec};
use serde::Serialize;

use crate::cluster::{LocalCluster, READY_TIMEOUT};
use crate::drain::DrainArgs;
use crate::e2e::E2eArgs;
use crate::idle::{IdleArgs, IdleReport};
use crate::{Common, ConsumeArgs, ProduceArgs, PublishArgs, Report};

#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// First port to use (proxy; brokers on the next three).
    #[arg(long, default_value_t = 7700)]
    base_port: u16,
    /// Directory for the brokers' data and the processes' logs [default: a
    /// fresh temporary directory, removed at the end].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Smaller counts: a smoke test of the suite, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Queues of the idle step's topic [default: 1000; 200 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    idle_queues: Option<u32>,
}

/// One step of the suite.
#[derive(Debug, Clone)]
pub enum Step {
    Publish(PublishArgs),
    Produce(ProduceArgs),
    Consume(ConsumeArgs),
    Drain(DrainArgs),
    E2e(E2eArgs),
    Idle(IdleArgs),
}

/// What a step produced: its JSON report line and its table row.
#[derive(Debug)]
pub struct Outcome {
    pub json: String,
    pub row: Row,
}

impl Outcome {
    fn new(report: &impl Serialize, row: Row) -> anyhow::Result<Self> {
        Ok(Self {
            json: serde_json::to_string(report)?,
            row,
        })
    }
}

impl Step {
    /// The step's name in the table.
    pub fn label(&self) -> String {
        match self {
            Step::Publish(a) => format!("publish, {} in flight", a.inflight),
            Step::Produce(a) => format!("produce, batch {}, {} in flight", a.batch, a.inflight),
            Step::Consume(a) => format!("consume, batch {}, {} receivers", a.batch, a.inflight),
            Step::Drain(a) => format!("drain, batch {}, {} receivers", a.batch, a.inflight),
            Step::E2e(a) => format!("e2e at {}/s", thousands(a.rate as f64)),
            Step::Idle(a) => format!("idle, {} queues", a.queues),
        }
    }

    /// Runs the step against the proxies at `endpoint`, measuring the CPU
    /// of the processes `pids`.
    pub async fn run(&self, endpoint: &[String], pids: &[u32]) -> anyhow::Result<Outcome> {
        let label = self.label();
        let pids = Some(pids);
        match self {
            Step::Publish(a) => {
                let r = crate::publish(a, endpoint, pids).await?;
                Outcome::new(&r, Row::load(label, &r))
            }
            Step::Produce(a) => {
                let r = crate::produce(a, endpoint, pids).await?;
                Outcome::new(&r, Row::load(label, &r))
            }
            Step::Consume(a) => {
                let r = crate::consume(a, endpoint, pids).await?;
                Outcome::new(&r, Row::load(label, &r))
            }
            Step::Drain(a) => {
                let r = crate::drain::run(a, endpoint, pids).await?;
                Outcome::new(&r, Row::load(label, &r))
            }
            Step::E2e(a) => {
                let r = crate::e2e::run(a, endpoint, pids).await?;
                Outcome::new(&r, Row::load(label, &r))
            }
            Step::Idle(a) => {
                let r = crate::idle::run(a, endpoint, pids).await?;
                Outcome::new(&r, Row::idle(label, &r))
            }
        }
    }
}

/// The steps of a suite run; topic names are prefixed with `suite-RUN-`.
pub fn plan(a: &SuiteArgs, run: &str) -> Vec<Step> {
    let n = |full: u64, quick: u64| if a.quick { quick } else { full };
    let common = |name: &str| Common {
        topic: format!("suite-{run}-{name}"),
        create_topic: true,
        queues: 8,
        replicas: 3,
        timeout_ms: 30_000,
    };
    let produced = n(300_000, 50_000);
    vec![
        Step::Publish(PublishArgs {
            common: common("publish1"),
            size: 1024,
            count: n(2_000, 500),
            inflight: 1,
        }),
        Step::Publish(PublishArgs {
            common: common("publish128"),
            size: 1024,
            count: n(100_000, 20_000),
            inflight: 128,
        }),
        Step::Produce(ProduceArgs {
            common: common("produce"),
            size: 1024,
            count: produced,
            inflight: 32,
            batch: 100,
        }),
        Step::Consume(ConsumeArgs {
            common: Common {
                create_topic: false,
                ..common("produce")
            },
            group: "suite".into(),
            count: produced,
            inflight: 8,
            batch: 256,
            wait_ms: 1_000,
            invisible_ms: 30_000,
            idle_ms: 10_000,
        }),
        Step::Drain(DrainArgs {
            common: common("drain"),
            group: Some("suite".into()),
            size: 1024,
            count: n(300_000, 50_000),
            batch: 256,
            inflight: 8,
            fill_batch: 100,
            fill_inflight: 32,
            idle_ms: 10_000,
        }),
        Step::E2e(E2eArgs {
            common: common("e2e"),
            group: Some("suite".into()),
            rate: 5_000,
            seconds: n(10, 5),
            size: 1024,
            receivers: 4,
            batch: 64,
            max_outstanding: 10_000,
        }),
        Step::Idle(IdleArgs {
            topic: format!("suite-{run}-idle"),
            queues: a.idle_queues.unwrap_or(if a.quick { 200 } else { 1_000 }),
            replicas: 3,
            timeout_ms: 120_000,
            settle_secs: 15,
            window_secs: 20,
        }),
    ]
}

/// One line of the summary table; `None` is shown as `-`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub workload: String,
    pub records_per_sec: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub cpu_us_per_record: Option<f64>,
    pub cpu_cores: Option<f64>,
    pub errors: Option<u64>,
}

impl Row {
    fn load(workload: String, r: &Report) -> Self {
        Self {
            workload,
            records_per_sec: Some(r.records_per_sec),
            p50_ms: Some(r.p50_ms),
            p99_ms: Some(r.p99_ms),
            cpu_us_per_record: r.server_cpu_us_per_record,
            cpu_cores: r.server_cpu_cores,
            errors: Some(r.errors),
        }
    }

    fn idle(workload: String, r: &IdleReport) -> Self {
        Self {
            workload,
            records_per_sec: None,
            p50_ms: None,
            p99_ms: None,
            cpu_us_per_record: None,
            cpu_cores: r.server_cpu_cores,
            errors: None,
        }
    }
}

/// `1234567.8` -> `"1,234,568"`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// The rows as a Markdown table, columns padded for reading as text;
/// numbers right-aligned.
pub fn render_table(rows: &[Row]) -> String {
    const HEADER: [&str; 7] = [
        "workload",
        "records/s",
        "p50 ms",
        "p99 ms",
        "server CPU µs/record",
        "server CPU cores",
        "errors",
    ];
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or_else(|| "-".to_string(), f);
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.workload.clone(),
                opt(r.records_per_sec, &thousands),
                opt(r.p50_ms, &|x| format!("{x:.2}")),
                opt(r.p99_ms, &|x| format!("{x:.2}")),
                opt(r.cpu_us_per_record, &|x| format!("{x:.1}")),
                opt(r.cpu_cores, &|x| format!("{x:.2}")),
                r.errors.map_or_else(|| "-".to_string(), |e| e.to_string()),
            ]
        })
        .collect();
    let mut width = HEADER.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String; 7]| {
        let mut s = String::from("|");
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            let pad = " ".repeat(w - c.chars().count());
            if i == 0 {
                let _ = write!(s, " {c}{pad} |");
            } else {
                let _ = write!(s, " {pad}{c} |");
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&HEADER.map(String::from));
    out.push('|');
    for (i, w) in width.iter().enumerate() {
        let dashes = "-".repeat(*w);
        if i == 0 {
            let _ = write!(out, " {dashes} |");
        } else {
            // One dash fewer to make room for the alignment colon.
            let _ = write!(out, " {}: |", &dashes[1..]);
        }
    }
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

/// Runs the suite; Ctrl-C or SIGTERM stops it and still kills every
/// process it started.
pub async fn run(a: SuiteArgs) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = suite(a) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}

async fn suite(a: SuiteArgs) -> anyhow::Result<()> {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .to_string();
    let steps = plan(&a, &run);
    let mut cluster = LocalCluster::start(a.base_port, a.data_dir.clone())?;
    let endpoint = vec![cluster.endpoint()];
    eprintln!(
        "suite: cluster at {} (server pids {:?}), data and logs in {}",
        cluster.endpoint(),
        cluster.pids(),
        cluster.dir().display()
    );
    let client = Client::builder(endpoint.clone())
        .request_timeout(Duration::from_secs(30))
        .build()?;
    LocalCluster::create_topic_when_ready(
        &client.admin(),
        TopicSpec::new(format!("suite-{run}-ready"))
            .queues(1)
            .replicas(3),
        READY_TIMEOUT,
    )
    .await
    .context("waiting for the cluster to accept a topic")?;
    let mut rows = Vec::new();
    for step in &steps {
        let label = step.label();
        let outcome = async {
            cluster.check_running()?;
            eprintln!("suite: {label}");
            step.run(&endpoint, &cluster.pids()).await
        }
        .await
        .with_context(|| format!("suite step `{label}`"));
        match outcome {
            Ok(o) => {
                println!("{}", o.json);
                rows.push(o.row);
            }
            Err(e) => {
                cluster.keep_dir();
                eprintln!("suite: logs kept in {}", cluster.dir().display());
                if !rows.is_empty() {
                    eprint!(
                        "steps completed before the failure:\n{}",
                        render_table(&rows)
                    );
                }
                return Err(e);
            }
        }
    }
    let table = render_table(&rows);
    eprint!("\n{table}");
    print!("{table}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str) -> Row {
        Row {
            workload: name.into(),
            records_per_sec: Some(29403.4),
            p50_ms: Some(101.123),
            p99_ms: Some(200.2),
            cpu_us_per_record: Some(57.25),
            cpu_cores: Some(1.6834),
            errors: Some(0),
        }
    }

    #[test]
    fn table_is_markdown_with_dashes_for_missing_values() {
        let idle = Row {
            workload: "idle, 1000 queues".into(),
            records_per_sec: None,
            p50_ms: None,
            p99_ms: None,
            cpu_us_per_record: None,
            cpu_cores: Some(0.62),
            errors: None,
        };
        let t = render_table(&[row("produce"), idle]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert_eq!(
            lines[0],
            "| workload          | records/s | p50 ms | p99 ms | server CPU µs/record \
             | server CPU cores | errors |"
        );
        assert_eq!(
            lines[1],
            "| ----------------- | --------: | -----: | -----: | -------------------: \
             | ---------------: | -----: |"
        );
        assert_eq!(
            lines[2],
            "| produce           |    29,403 | 101.12 | 200.20 |                 57.2 \
             |             1.68 |      0 |"
        );
        assert_eq!(
            lines[3],
            "| idle, 1000 queues |         - |      - |      - |                    - \
             |             0.62 |      - |"
        );
        // Every line has the same number of cells.
        for l in &lines {
            assert_eq!(l.matches('|').count(), 8, "{l}");
        }
        assert!(t.ends_with('\n'));
    }

    #[test]
    fn table_of_no_rows_is_the_header() {
        assert_eq!(render_table(&[]).lines().count(), 2);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(999.6), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-1234.0), "-1,234");
    }

    #[test]
    fn plan_covers_every_workload_on_fresh_topics() {
        let a = SuiteArgs {
            base_port: 7700,
            data_dir: None,
            quick: true,
            idle_queues: None,
        };
        let steps = plan(&a, "1");
        let labels: Vec<String> = steps.iter().map(Step::label).collect();
        assert_eq!(
            labels,
            [
                "publish, 1 in flight",
                "publish, 128 in flight",
                "produce, batch 100, 32 in flight",
                "consume, batch 256, 8 receivers",
                "drain, batch 256, 8 receivers",
                "e2e at 5,000/s",
                "idle, 200 queues",
            ]
        );
        let (Step::Produce(p), Step::Consume(c)) = (&steps[2], &steps[3]) else {
            panic!("produce then consume");
        };
        assert_eq!(c.common.topic, p.common.topic);
        assert_eq!(c.count, p.count);
        assert!(!c.common.create_topic);
        let (Step::Drain(d), Step::E2e(e)) = (&steps[4], &steps[5]) else {
            panic!("drain then e2e after consume");
        };
        assert_eq!((d.count, d.batch, d.inflight), (50_000, 256, 8));
        assert_eq!((e.rate, e.seconds), (5_000, 5));
        // Fresh topics of their own.
        let topics: std::collections::HashSet<&str> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Publish(a) => Some(a.common.topic.as_str()),
                Step::Produce(a) => Some(a.common.topic.as_str()),
                Step::Drain(a) => Some(a.common.topic.as_str()),
                Step::E2e(a) => Some(a.common.topic.as_str()),
                Step::Idle(a) => Some(a.topic.as_str()),
                Step::Consume(_) => None,
            })
            .collect();
        assert_eq!(topics.len(), 6);
        assert!(d.common.create_topic && e.common.create_topic);
        let full = plan(
            &SuiteArgs {
                quick: false,
                idle_queues: Some(50),
                ..a
            },
            "1",
        );
        let Step::Idle(i) = &full[6] else {
            panic!("idle last");
        };
        let (Step::Drain(d), Step::E2e(e)) = (&full[4], &full[5]) else {
            panic!("drain then e2e");
        };
        assert_eq!(d.count, 300_000);
        assert_eq!(e.seconds, 10);
        assert_eq!(i.queues, 50);
        let Step::Produce(p) = &full[2] else {
            panic!("produce third");
        };
        assert_eq!(p.count, 300_000);
    }
}
