//! How the servers write their logs: human-readable text (coloured only
//! when stderr is a terminal, so files and pipes under systemd or
//! Kubernetes get no escape codes) or one JSON object per line for log
//! collectors (`--log-format json`).

use std::io::IsTerminal;

use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Output format of the log lines on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected text or json"
            )),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// The formatting layer for `format`, writing to stderr, without
/// openraft's per-call vote failures (see [`OpenraftNoise`]).
pub fn layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(OpenraftNoise)
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(false)
            .with_filter(OpenraftNoise)
            .boxed(),
    }
}

/// openraft logs every vote request that did not reach a peer at ERROR
/// ("while requesting vote", once per peer per election): a cluster
/// whose brokers start a second apart prints them on every start, and a
/// broker cut off prints them every election. The Raft transport logs
/// unreachable peers itself, once per run of failures, so these go.
pub struct OpenraftNoise;

impl OpenraftNoise {
    fn is_noise(event: &tracing::Event<'_>) -> bool {
        if !event.metadata().target().starts_with("openraft") {
            return false;
        }
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}").starts_with("while requesting vote");
                }
            }
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                if f.name() == "message" {
                    self.0 = v.starts_with("while requesting vote");
                }
            }
        }
        let mut m = Message(false);
        event.record(&mut m);
        m.0
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for OpenraftNoise {
    fn enabled(
        &self,
        _: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        !Self::is_noise(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_print_back() {
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(f.to_string().parse::<LogFormat>().unwrap(), f);
        }
        assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
        let e = "xml".parse::<LogFormat>().unwrap_err();
        assert!(e.contains("text or json"), "{e}");
    }

    #[test]
    fn openraft_vote_failures_are_dropped_and_nothing_else() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || w.clone())
                .with_filter(OpenraftNoise),
        );
        tracing::subscriber::with_default(sub, || {
            tracing::error!(target: "openraft::core::raft_core", error = "Unreachable", target_node = 3, "while requesting vote");
            tracing::error!(target: "openraft::core::raft_core", "storage error: disk full");
            tracing::error!(target: "petrel_broker", "while requesting vote, ours");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!out.contains("Unreachable"), "{out}");
        assert!(out.contains("disk full"), "{out}");
        assert!(out.contains("ours"), "{out}");
    }
}
