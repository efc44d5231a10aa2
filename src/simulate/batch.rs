//! Many devices through one step, a bounded number at once: [`drive`] hands the items to
//! `concurrency` worker tasks, records the latency of every success in one histogram, counts the
//! failures by [`DeviceFailure::reason`], and keeps what each success returned (an enrolled
//! device, an open connection). [`super::run`] and the fleet benchmark both use it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{DeviceFailure, SimError, SimReport};

/// Bounds of the latency histogram, in microseconds.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// How a batch runs.
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    /// Items in flight at once (at least 1).
    pub concurrency: usize,
    /// Stop handing out items once this many failed (the gateway is down or full): the rest
    /// are not tried, and [`Batch::untried`] counts them.
    pub stop_after_failures: Option<u64>,
    /// Advanced by one per item; its message shows the failures so far.
    pub progress: Option<ProgressBar>,
}

/// What one item's step returns when it succeeds.
#[derive(Debug)]
pub struct Completed<O> {
    pub value: O,
    /// The latency recorded for this item.
    pub latency: Duration,
}

/// Outcome of a batch.
#[derive(Debug)]
pub struct Batch<O> {
    /// Successes (`enrolled`), failures by reason, wall time and latency percentiles.
    pub report: SimReport,
    /// What the successes returned, in no particular order.
    pub values: Vec<O>,
    /// Items not tried because [`BatchOptions::stop_after_failures`] was reached.
    pub untried: usize,
}

/// What one worker saw.
struct Tally<O> {
    latencies: Histogram<u64>,
    failures: BTreeMap<String, u64>,
    values: Vec<O>,
}

fn new_histogram() -> Result<Histogram<u64>, SimError> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
        .map_err(|e| SimError::InvalidOptions(format!("latency histogram: {e}")))
}

/// State shared by the workers of one batch.
struct Shared<I, F> {
    queue: Mutex<std::vec::IntoIter<I>>,
    step: F,
    failed: AtomicU64,
    stop: AtomicBool,
    options: BatchOptions,
}

impl<I, F> Shared<I, F> {
    /// The next item, unless the batch was stopped.
    fn next(&self) -> Option<I> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        self.queue.lock().ok()?.next()
    }

    fn failed_once(&self) {
        let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(p) = &self.options.progress {
            p.set_message(format!("{n} failed"));
        }
        if self
            .options
            .stop_after_failures
            .is_some_and(|limit| n >= limit)
        {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// One worker: take items until none are left (or the batch stops).
async fn work<I, O, F, Fut>(shared: Arc<Shared<I, F>>, mut tally: Tally<O>) -> Tally<O>
where
    F: Fn(I) -> Fut,
    Fut: Future<Output = Result<Completed<O>, DeviceFailure>>,
{
    while let Some(item) = shared.next() {
        match (shared.step)(item).await {
            Ok(done) => {
                let us = u64::try_from(done.latency.as_micros()).unwrap_or(u64::MAX);
                tally.latencies.saturating_record(us.max(1));
                tally.values.push(done.value);
            }
            Err(failure) => {
                tracing::debug!(error = %failure, "simulated device failed");
                *tally.failures.entry(failure.reason()).or_default() += 1;
                shared.failed_once();
            }
        }
        if let Some(p) = &shared.options.progress {
            p.inc(1);
        }
    }
    tally
}

/// Run `step` on every item, at most `options.concurrency` at once.
pub async fn drive<I, O, F, Fut>(
    items: Vec<I>,
    options: BatchOptions,
    step: F,
) -> Result<Batch<O>, SimError>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Completed<O>, DeviceFailure>> + Send + 'static,
{
    if options.concurrency == 0 {
        return Err(SimError::InvalidOptions(
            "concurrency must be at least 1".into(),
        ));
    }
    let total = items.len();
    let workers = options.concurrency.min(total);
    let shared = Arc::new(Shared {
        queue: Mutex::new(items.into_iter()),
        step,
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        options,
    });
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let tally = Tally {
            latencies: new_histogram()?,
            failures: BTreeMap::new(),
            values: Vec::new(),
        };
        tasks.spawn(work(shared.clone(), tally));
    }
    let mut all = Tally {
        latencies: new_histogram()?,
        failures: BTreeMap::new(),
        values: Vec::with_capacity(total),
    };
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.map_err(|e| SimError::Task(e.to_string()))?;
        all.latencies
            .add(&tally.latencies)
            .map_err(|e| SimError::Task(format!("latency histogram: {e:?}")))?;
        for (reason, n) in tally.failures {
            *all.failures.entry(reason).or_default() += n;
        }
        all.values.extend(tally.values);
    }
    let report = report(&all, started.elapsed());
    let untried = total.saturating_sub(report.enrolled as usize + report.failed() as usize);
    Ok(Batch {
        report,
        values: all.values,
        untried,
    })
}

fn report<O>(tally: &Tally<O>, elapsed: Duration) -> SimReport {
    let latencies = &tally.latencies;
    let at = |q: f64| {
        if latencies.is_empty() {
            Duration::ZERO
        } else {
            Duration::from_micros(latencies.value_at_quantile(q))
        }
    };
    SimReport {
        enrolled: latencies.len(),
        failed_by_reason: tally.failures.clone(),
        elapsed,
        p50: at(0.5),
        p99: at(0.99),
        max: if latencies.is_empty() {
            Duration::ZERO
        } else {
            Duration::from_micros(latencies.max())
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::Phase;

    fn options(concurrency: usize, stop_after_failures: Option<u64>) -> BatchOptions {
        BatchOptions {
            concurrency,
            stop_after_failures,
            progress: None,
        }
    }

    #[tokio::test]
    async fn every_item_runs_and_values_latencies_and_failures_are_kept() {
        let batch = drive((0..10u64).collect(), options(3, None), |i| async move {
            if i % 5 == 4 {
                Err(DeviceFailure::Timeout {
                    phase: Phase::Config,
                })
            } else {
                Ok(Completed {
                    value: i,
                    latency: Duration::from_millis(i + 1),
                })
            }
        })
        .await
        .expect("runs");
        let mut values = batch.values;
        values.sort_unstable();
        assert_eq!(values, [0, 1, 2, 3, 5, 6, 7, 8]);
        assert_eq!(batch.report.enrolled, 8);
        assert_eq!(
            batch.report.failed_by_reason.get("timeout:config"),
            Some(&2)
        );
        assert_eq!(batch.untried, 0);
        assert!(batch.report.p50 <= batch.report.p99);
        assert!(batch.report.max >= Duration::from_millis(9));
    }

    #[tokio::test]
    async fn a_failure_limit_stops_the_batch() {
        let batch = drive((0..100u32).collect(), options(1, Some(3)), |_| async {
            Err::<Completed<()>, _>(DeviceFailure::Local("down".into()))
        })
        .await
        .expect("runs");
        assert_eq!(batch.report.failed(), 3);
        assert_eq!(batch.untried, 97);
    }

    #[tokio::test]
    async fn zero_concurrency_is_refused() {
        let outcome = drive(vec![1], options(0, None), |_| async {
            Ok(Completed {
                value: (),
                latency: Duration::ZERO,
            })
        })
        .await;
        assert!(matches!(outcome, Err(SimError::InvalidOptions(_))));
    }
}
