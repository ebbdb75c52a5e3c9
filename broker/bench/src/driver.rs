//! The load driver: an operation run from `--concurrency` tasks, a warm-up, then a measured
//! window (a duration or a count) with each completed operation's latency in a histogram; the
//! resulting [`Figures`], and the mean of several runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::args::BenchArgs;
use crate::target::{cpu_secs, rss_mb};

/// One scenario's figures.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Completed operations per second.
    pub ops_per_s: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// p90.
    pub p90_ms: f64,
    /// p99.
    pub p99_ms: f64,
    /// Max.
    pub max_ms: f64,
    /// Completed operations.
    pub ops: u64,
    /// Errors by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Broker CPU over the measured window, in cores (when the broker is a local process).
    pub broker_cores: Option<f64>,
    /// Broker resident memory after the run, MB.
    pub broker_rss_mb: Option<f64>,
    /// Revoke runs: watchers connected.
    pub watchers: usize,
    /// Revoke runs: p50/p99/max measured from the revoke call's start (ms).
    pub from_start_ms: Option<(f64, f64, f64)>,
}

/// Why one operation did not complete.
#[derive(Debug)]
pub(crate) enum OpError {
    /// A failed call, by gRPC code (or a short reason).
    Failed(String),
    /// Nothing left to do (the attest scenario ran out of join tokens).
    Exhausted,
}

pub(crate) fn code(e: tonic::Status) -> OpError {
    OpError::Failed(format!("{:?}", e.code()))
}

pub(crate) fn sdk_code(e: sigil_sdk::SdkError) -> OpError {
    OpError::Failed(
        e.code()
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| format!("{:?}", e.kind())),
    )
}

pub(crate) fn histogram() -> Option<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).ok()
}

pub(crate) fn quantiles(h: &Option<Histogram<u64>>, f: &mut Figures) {
    let q = |p: f64| {
        h.as_ref()
            .map(|h| h.value_at_quantile(p) as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    f.p50_ms = q(0.50);
    f.p90_ms = q(0.90);
    f.p99_ms = q(0.99);
    f.max_ms = h.as_ref().map(|h| h.max() as f64 / 1000.0).unwrap_or(0.0);
}

/// Runs `op` from `concurrency` tasks: `warmup`, then measures for `duration` (or until
/// `count` operations completed), recording each completed operation's latency.
pub(crate) async fn drive<F, Fut>(
    name: &str,
    a: &BenchArgs,
    pid: Option<u32>,
    (warmup, duration): (Duration, Duration),
    op: F,
) -> Figures
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), OpError>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let exhausted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(a.concurrency);
    for i in 0..a.concurrency {
        let (stop, measuring, done, exhausted, op) = (
            stop.clone(),
            measuring.clone(),
            done.clone(),
            exhausted.clone(),
            op.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = i as u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = op(i, n).await;
                n += 1;
                if matches!(r, Err(OpError::Exhausted)) {
                    exhausted.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match r {
                    Ok(()) => {
                        if let Some(h) = h.as_mut() {
                            let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(OpError::Failed(c)) => *errors.entry(c).or_default() += 1,
                    Err(OpError::Exhausted) => {}
                }
            }
            (h, errors)
        }));
    }
    let bar = if a.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.set_message(format!("{name}: warming up"));
    let all_gone = |x: &AtomicU64| x.load(Ordering::Relaxed) as usize >= a.concurrency;
    let warm = Instant::now();
    while warm.elapsed() < warmup && !all_gone(&exhausted) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bar.tick();
    }
    measuring.store(true, Ordering::SeqCst);
    let cpu0 = pid.and_then(cpu_secs);
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = done.load(Ordering::Relaxed);
        let over = match a.count {
            Some(c) => n >= c,
            None => started.elapsed() >= duration,
        };
        if over || all_gone(&exhausted) {
            break;
        }
        bar.set_message(format!(
            "{name}: {n} ops, {:.0}/s",
            n as f64 / started.elapsed().as_secs_f64()
        ));
        bar.tick();
    }
    measuring.store(false, Ordering::SeqCst);
    let elapsed = started.elapsed();
    let cpu1 = pid.and_then(cpu_secs);
    stop.store(true, Ordering::SeqCst);
    bar.finish_and_clear();
    let mut hist = histogram();
    let mut errors = BTreeMap::new();
    for t in tasks {
        if let Ok((h, e)) = t.await {
            if let (Some(all), Some(h)) = (hist.as_mut(), h) {
                let _ = all.add(h);
            }
            for (k, v) in e {
                *errors.entry(k).or_default() += v;
            }
        }
    }
    let ops = done.load(Ordering::Relaxed);
    let mut f = Figures {
        ops_per_s: ops as f64 / elapsed.as_secs_f64(),
        ops,
        errors,
        broker_cores: cpu0.zip(cpu1).map(|(a, b)| (b - a) / elapsed.as_secs_f64()),
        broker_rss_mb: pid.and_then(rss_mb),
        ..Figures::default()
    };
    quantiles(&hist, &mut f);
    f
}

/// Mean throughput and percentiles of several runs of one scenario; the worst maximum; errors
/// and operations summed.
pub(crate) fn mean(runs: &[Figures]) -> Figures {
    let n = runs.len().max(1) as f64;
    let avg = |f: fn(&Figures) -> f64| runs.iter().map(f).sum::<f64>() / n;
    let cores: Vec<f64> = runs.iter().filter_map(|f| f.broker_cores).collect();
    let mut errors = BTreeMap::new();
    for f in runs {
        for (k, v) in &f.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
    }
    Figures {
        ops_per_s: avg(|f| f.ops_per_s),
        p50_ms: avg(|f| f.p50_ms),
        p90_ms: avg(|f| f.p90_ms),
        p99_ms: avg(|f| f.p99_ms),
        max_ms: runs.iter().map(|f| f.max_ms).fold(0.0, f64::max),
        ops: runs.iter().map(|f| f.ops).sum(),
        errors,
        broker_cores: (!cores.is_empty()).then(|| cores.iter().sum::<f64>() / cores.len() as f64),
        broker_rss_mb: runs.iter().filter_map(|f| f.broker_rss_mb).reduce(f64::max),
        watchers: 0,
        from_start_ms: None,
    }
}
