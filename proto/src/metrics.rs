//! Prometheus metrics: counters and latency histograms kept with atomics, rendered in the text
//! exposition format, and a minimal HTTP endpoint (`GET /metrics`) meant for loopback or an
//! internal network. Metric labels carry outcomes, reasons, sites and statuses only — never a
//! parameter value, a count of records, or anything about a patient.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Latency buckets (seconds).
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A histogram of durations.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_micros: AtomicU64,
}

/// A set of labelled counters and histograms.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(String, String), u64>>,
    histograms: Mutex<BTreeMap<(String, String), std::sync::Arc<Histogram>>>,
    gauges: Mutex<BTreeMap<(String, String), i64>>,
    help: Mutex<BTreeMap<String, (&'static str, &'static str)>>,
}

/// Renders labels `[("outcome", "released")]` as `{outcome="released"}`.
fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(name, value)| {
            let escaped = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{name}=\"{escaped}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    fn describe(&self, name: &str, kind: &'static str, help: &'static str) {
        self.help
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(name.to_string())
            .or_insert((kind, help));
    }

    /// Adds `by` to counter `name` with `pairs` as labels.
    pub fn count(&self, name: &str, help: &'static str, pairs: &[(&str, &str)], by: u64) {
        self.describe(name, "counter", help);
        *self
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry((name.to_string(), labels(pairs)))
            .or_insert(0) += by;
    }

    /// Sets gauge `name`.
    pub fn set(&self, name: &str, help: &'static str, pairs: &[(&str, &str)], value: i64) {
        self.describe(name, "gauge", help);
        self.gauges
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert((name.to_string(), labels(pairs)), value);
    }

    /// Records one duration in histogram `name`.
    pub fn observe(&self, name: &str, help: &'static str, pairs: &[(&str, &str)], took: Duration) {
        self.describe(name, "histogram", help);
        let histogram = std::sync::Arc::clone(
            self.histograms
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .entry((name.to_string(), labels(pairs)))
                .or_default(),
        );
        let seconds = took.as_secs_f64();
        for (bucket, bound) in histogram.buckets.iter().zip(BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        histogram.count.fetch_add(1, Ordering::Relaxed);
        histogram
            .sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let help = self
            .help
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut out = String::new();
        let header = |out: &mut String, name: &str| {
            if let Some((kind, text)) = help.get(name) {
                let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
            }
        };
        let mut last = String::new();
        let counters: Vec<((String, String), String)> = self
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(key, value)| (key.clone(), value.to_string()))
            .collect();
        let gauges: Vec<((String, String), String)> = self
            .gauges
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(key, value)| (key.clone(), value.to_string()))
            .collect();
        for ((name, labels), value) in counters.iter().chain(&gauges) {
            if *name != last {
                header(&mut out, name);
                last.clone_from(name);
            }
            let _ = writeln!(out, "{name}{labels} {value}");
        }
        for ((name, labels), histogram) in self
            .histograms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
        {
            if *name != last {
                header(&mut out, name);
                last.clone_from(name);
            }
            let inner = labels.trim_start_matches('{').trim_end_matches('}');
            let with = |extra: &str| {
                if inner.is_empty() {
                    format!("{{{extra}}}")
                } else {
                    format!("{{{inner},{extra}}}")
                }
            };
            for (bucket, bound) in histogram.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {}",
                    with(&format!("le=\"{bound}\"")),
                    bucket.load(Ordering::Relaxed)
                );
            }
            let count = histogram.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{} {count}", with("le=\"+Inf\""));
            let _ = writeln!(
                out,
                "{name}_sum{labels} {}",
                histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "{name}_count{labels} {count}");
        }
        out
    }
}

/// Serves `GET /metrics` (anything else: 404) on `listener` until the task is dropped. Meant
/// for loopback or an internal network: it carries no patient data, but no authentication
/// either.
pub async fn serve_metrics(
    listener: TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) {
    let render = std::sync::Arc::new(render);
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let render = std::sync::Arc::clone(&render);
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..read]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", render())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_render_in_the_exposition_format() {
        let metrics = Metrics::default();
        metrics.count(
            "fedq_queries_total",
            "Queries.",
            &[("outcome", "released")],
            2,
        );
        metrics.count(
            "fedq_queries_total",
            "Queries.",
            &[("outcome", "refused")],
            1,
        );
        metrics.set("fedq_overlap_memory_bytes", "Bytes.", &[], 4096);
        metrics.observe(
            "fedq_query_seconds",
            "Latency.",
            &[],
            Duration::from_millis(30),
        );
        let text = metrics.render();
        assert!(text.contains("# TYPE fedq_queries_total counter"));
        assert!(text.contains("fedq_queries_total{outcome=\"released\"} 2"));
        assert!(text.contains("fedq_queries_total{outcome=\"refused\"} 1"));
        assert!(text.contains("fedq_overlap_memory_bytes 4096"));
        assert!(text.contains("fedq_query_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("fedq_query_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("fedq_query_seconds_count 1"));
    }
}
