//! Metrics of the reliability layer, through the [`metrics`] facade.
//!
//! Nothing is exported unless the application installs a recorder (for example
//! `metrics-exporter-prometheus`, as `registryctl --metrics` does); without one every call here
//! is a no-op. Names and labels follow Prometheus conventions: `snake_case`, a `registry_`
//! prefix, counters end in `_total`, durations are histograms in seconds, states are label
//! values of one gauge. Every label has a bounded set of values — no URL, service, host or
//! listener ever becomes a label:
//!
//! | label | values |
//! | --- | --- |
//! | `scheme` | the backend's scheme (`etcd`, `zookeeper`, `memory`, ...): one per linked backend |
//! | `state` | `ok`, `retrying`, `given_up` |
//! | `operation` | `register`, `unregister`, `subscribe`, `unsubscribe` |
//! | `source` | `live`, `cache` |
//! | `outcome` | `complete`, `partial` (some intents went to the retry queue) |
//!
//! Gauges aggregate over every registry of a scheme in the process: [`IntentGauges`] adds and
//! removes its own counts instead of setting the gauge, so two `etcd://` registries add up.
//! The README's "Metrics" table lists the same names.

use std::sync::Mutex;
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use registry_core::Source;

/// Gauge: registration intents, by `scheme` and `state`.
pub const REGISTRATIONS: &str = "registry_registrations";
/// Gauge: subscriptions, by `scheme` and `state`.
pub const SUBSCRIPTIONS: &str = "registry_subscriptions";
/// Counter: failed backend operations put in (or kept in) the retry queue, by `scheme` and
/// `operation`. One per failed attempt.
pub const RETRIES: &str = "registry_retries_total";
/// Counter: retry tasks that gave up (`retry.times` exhausted or a non-retryable error), by
/// `scheme` and `operation`.
pub const GIVE_UPS: &str = "registry_give_ups_total";
/// Counter: confirmation passes (an intent in place applied again while a write of unknown
/// outcome may still land, CONTRACT §6.1), by `scheme` and `operation`.
pub const CONFIRMATIONS: &str = "registry_confirmations_total";
/// Counter: recoveries after a new backend session, by `scheme` and `outcome`.
pub const RECOVERIES: &str = "registry_recoveries_total";
/// Histogram, seconds: how long a recovery took to re-register and re-subscribe everything,
/// by `scheme`.
pub const RECOVERY_DURATION: &str = "registry_recovery_duration_seconds";
/// Counter: lists handed to listeners, by `scheme` and `source`.
pub const NOTIFICATIONS: &str = "registry_notifications_total";
/// Histogram, seconds: from the backend event (the change seen by the client) to the
/// listener's call, by `scheme`.
pub const NOTIFICATION_DELAY: &str = "registry_notification_delay_seconds";
/// Counter: backend sessions lost (ZooKeeper session expiry, etcd lease loss), by `scheme`.
pub const SESSION_LOSSES: &str = "registry_session_losses_total";
/// Counter: connections lost, by `scheme`.
pub const DISCONNECTS: &str = "registry_disconnects_total";
/// Counter: connections back within the same session, by `scheme`.
pub const RECONNECTS: &str = "registry_reconnects_total";

/// Label: the backend scheme.
pub const LABEL_SCHEME: &str = "scheme";
/// Label: the health of an intent (`ok`, `retrying`, `given_up`).
pub const LABEL_STATE: &str = "state";
/// Label: the backend operation.
pub const LABEL_OPERATION: &str = "operation";
/// Label: where a list came from (`live`, `cache`).
pub const LABEL_SOURCE: &str = "source";
/// Label: how a recovery ended (`complete`, `partial`).
pub const LABEL_OUTCOME: &str = "outcome";

/// Histogram buckets (seconds) suggested for [`NOTIFICATION_DELAY`]: 1 ms to 30 s.
pub const NOTIFICATION_DELAY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Histogram buckets (seconds) suggested for [`RECOVERY_DURATION`]: 10 ms to 2 min.
pub const RECOVERY_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A backend operation that can be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `register`
    Register,
    /// `unregister`
    Unregister,
    /// `subscribe`
    Subscribe,
    /// `unsubscribe`
    Unsubscribe,
}

impl Operation {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Register => "register",
            Operation::Unregister => "unregister",
            Operation::Subscribe => "subscribe",
            Operation::Unsubscribe => "unsubscribe",
        }
    }
}

/// Which intents an [`IntentGauges`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Intent {
    /// Registrations: [`REGISTRATIONS`].
    Registrations,
    /// Subscriptions: [`SUBSCRIPTIONS`].
    Subscriptions,
}

impl Intent {
    /// The gauge's name.
    pub fn metric_name(self) -> &'static str {
        match self {
            Intent::Registrations => REGISTRATIONS,
            Intent::Subscriptions => SUBSCRIPTIONS,
        }
    }
}

/// How many intents are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntentCounts {
    /// In place.
    pub ok: u64,
    /// In the retry queue.
    pub retrying: u64,
    /// Given up (until the next change or a new session).
    pub given_up: u64,
}

impl IntentCounts {
    fn by_state(self) -> [(&'static str, u64); 3] {
        [
            ("ok", self.ok),
            ("retrying", self.retrying),
            ("given_up", self.given_up),
        ]
    }
}

/// One registry's share of the [`REGISTRATIONS`] or [`SUBSCRIPTIONS`] gauge of its scheme.
///
/// [`IntentGauges::set`] publishes the difference to the counts set last, so several registries
/// of the same scheme add up; dropping it takes its counts back out (a destroyed registry holds
/// nothing).
#[derive(Debug)]
pub struct IntentGauges {
    intent: Intent,
    scheme: String,
    last: Mutex<IntentCounts>,
}

impl IntentGauges {
    /// This registry's share, starting at zero.
    pub fn new(intent: Intent, scheme: &str) -> IntentGauges {
        IntentGauges {
            intent,
            scheme: scheme.to_owned(),
            last: Mutex::new(IntentCounts::default()),
        }
    }

    /// Publishes this registry's current counts.
    pub fn set(&self, counts: IntentCounts) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        self.publish(*last, counts);
        *last = counts;
    }

    fn publish(&self, old: IntentCounts, new: IntentCounts) {
        for ((state, before), (_, now)) in old.by_state().into_iter().zip(new.by_state()) {
            if before == now {
                continue;
            }
            let g = gauge!(
                self.intent.metric_name(),
                LABEL_SCHEME => self.scheme.clone(),
                LABEL_STATE => state,
            );
            // Counts of intents stay far below 2^53: exact in f64.
            if now > before {
                g.increment((now - before) as f64);
            } else {
                g.decrement((before - now) as f64);
            }
        }
    }
}

impl Drop for IntentGauges {
    fn drop(&mut self) {
        let last = *self.last.get_mut().unwrap_or_else(|p| p.into_inner());
        self.publish(last, IntentCounts::default());
    }
}

/// A failed attempt of `op` that will be retried.
pub fn record_retry(scheme: &str, op: Operation) {
    counter!(RETRIES, LABEL_SCHEME => scheme.to_owned(), LABEL_OPERATION => op.as_str())
        .increment(1);
}

/// A confirmation pass of `op` (an intent in place applied again, CONTRACT §6.1).
pub fn record_confirmation(scheme: &str, op: Operation) {
    counter!(CONFIRMATIONS, LABEL_SCHEME => scheme.to_owned(), LABEL_OPERATION => op.as_str())
        .increment(1);
}

/// A retry of `op` gave up.
pub fn record_give_up(scheme: &str, op: Operation) {
    counter!(GIVE_UPS, LABEL_SCHEME => scheme.to_owned(), LABEL_OPERATION => op.as_str())
        .increment(1);
}

/// A recovery after a new session ended after `duration`; `failed` intents went to the retry
/// queue.
pub fn record_recovery(scheme: &str, duration: Duration, failed: u64) {
    let outcome = if failed == 0 { "complete" } else { "partial" };
    counter!(RECOVERIES, LABEL_SCHEME => scheme.to_owned(), LABEL_OUTCOME => outcome).increment(1);
    histogram!(RECOVERY_DURATION, LABEL_SCHEME => scheme.to_owned()).record(duration.as_secs_f64());
}

/// A list was handed to a listener; `delay` is the time from the backend event to the
/// listener's call, when known (a cached list has none).
pub fn record_notification(scheme: &str, source: Source, delay: Option<Duration>) {
    counter!(NOTIFICATIONS, LABEL_SCHEME => scheme.to_owned(), LABEL_SOURCE => source.as_str())
        .increment(1);
    if let Some(d) = delay {
        histogram!(NOTIFICATION_DELAY, LABEL_SCHEME => scheme.to_owned()).record(d.as_secs_f64());
    }
}

/// The backend session was lost.
pub fn record_session_lost(scheme: &str) {
    counter!(SESSION_LOSSES, LABEL_SCHEME => scheme.to_owned()).increment(1);
}

/// The connection was lost.
pub fn record_disconnect(scheme: &str) {
    counter!(DISCONNECTS, LABEL_SCHEME => scheme.to_owned()).increment(1);
}

/// The connection came back within the same session.
pub fn record_reconnect(scheme: &str) {
    counter!(RECONNECTS, LABEL_SCHEME => scheme.to_owned()).increment(1);
}

/// Gives every metric above its help text and unit. Call it once after installing a recorder
/// (descriptions go to the recorder installed at the time of the call).
pub fn describe() {
    describe_gauge!(
        REGISTRATIONS,
        Unit::Count,
        "Registration intents by backend scheme and state (ok, retrying, given_up)"
    );
    describe_gauge!(
        SUBSCRIPTIONS,
        Unit::Count,
        "Subscriptions by backend scheme and state (ok, retrying, given_up)"
    );
    describe_counter!(
        RETRIES,
        Unit::Count,
        "Failed backend operations that will be retried, by scheme and operation"
    );
    describe_counter!(
        GIVE_UPS,
        Unit::Count,
        "Retries that gave up, by scheme and operation"
    );
    describe_counter!(
        CONFIRMATIONS,
        Unit::Count,
        "Confirmation passes of intents in place while a write of unknown outcome may still land, by scheme and operation"
    );
    describe_counter!(
        RECOVERIES,
        Unit::Count,
        "Recoveries after a new backend session, by scheme and outcome"
    );
    describe_histogram!(
        RECOVERY_DURATION,
        Unit::Seconds,
        "Time to restore every registration and subscription after a new session"
    );
    describe_counter!(
        NOTIFICATIONS,
        Unit::Count,
        "Lists handed to listeners, by scheme and source (live, cache)"
    );
    describe_histogram!(
        NOTIFICATION_DELAY,
        Unit::Seconds,
        "Time from the backend event to the listener's call"
    );
    describe_counter!(
        SESSION_LOSSES,
        Unit::Count,
        "Backend sessions lost (session expiry, lease loss)"
    );
    describe_counter!(DISCONNECTS, Unit::Count, "Backend connections lost");
    describe_counter!(
        RECONNECTS,
        Unit::Count,
        "Backend connections back within the same session"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

    /// The value of one sample of the Prometheus text rendering, e.g.
    /// `registry_retries_total{scheme="etcd",operation="register"}`.
    fn sample(recorder: &PrometheusRecorder, series: &str) -> Option<f64> {
        let text = recorder.handle().render();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().expect("a number"))
    }

    fn registrations(recorder: &PrometheusRecorder, state: &str) -> Option<f64> {
        sample(
            recorder,
            &format!("{REGISTRATIONS}{{scheme=\"etcd\",state=\"{state}\"}}"),
        )
    }

    #[test]
    fn intent_gauges_of_one_scheme_add_up_and_leave_with_their_registry() {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            let a = IntentGauges::new(Intent::Registrations, "etcd");
            let b = IntentGauges::new(Intent::Registrations, "etcd");
            a.set(IntentCounts {
                ok: 3,
                retrying: 1,
                given_up: 0,
            });
            b.set(IntentCounts {
                ok: 2,
                retrying: 0,
                given_up: 1,
            });
            assert_eq!(registrations(&recorder, "ok"), Some(5.0));
            assert_eq!(registrations(&recorder, "retrying"), Some(1.0));
            assert_eq!(registrations(&recorder, "given_up"), Some(1.0));
            // The retrying one is in place now.
            a.set(IntentCounts {
                ok: 4,
                retrying: 0,
                given_up: 0,
            });
            assert_eq!(registrations(&recorder, "ok"), Some(6.0));
            assert_eq!(registrations(&recorder, "retrying"), Some(0.0));
            drop(b);
            assert_eq!(registrations(&recorder, "ok"), Some(4.0));
            assert_eq!(registrations(&recorder, "given_up"), Some(0.0));
            drop(a);
            assert_eq!(registrations(&recorder, "ok"), Some(0.0));
        });
    }

    #[test]
    fn counters_and_histograms_carry_only_bounded_labels() {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            describe();
            record_retry("zookeeper", Operation::Subscribe);
            record_retry("zookeeper", Operation::Subscribe);
            record_give_up("zookeeper", Operation::Register);
            record_recovery("zookeeper", Duration::from_millis(250), 0);
            record_recovery("zookeeper", Duration::from_millis(50), 2);
            record_notification("zookeeper", Source::Live, Some(Duration::from_millis(4)));
            record_notification("zookeeper", Source::Cache, None);
            record_session_lost("zookeeper");
            record_disconnect("zookeeper");
            record_reconnect("zookeeper");
        });
        let z = "scheme=\"zookeeper\"";
        let at = |series: String| {
            sample(&recorder, &series)
                .unwrap_or_else(|| panic!("no sample {series} in:\n{}", recorder.handle().render()))
        };
        assert_eq!(at(format!("{RETRIES}{{{z},operation=\"subscribe\"}}")), 2.0);
        assert_eq!(at(format!("{GIVE_UPS}{{{z},operation=\"register\"}}")), 1.0);
        assert_eq!(at(format!("{RECOVERIES}{{{z},outcome=\"complete\"}}")), 1.0);
        assert_eq!(at(format!("{RECOVERIES}{{{z},outcome=\"partial\"}}")), 1.0);
        assert_eq!(at(format!("{NOTIFICATIONS}{{{z},source=\"live\"}}")), 1.0);
        assert_eq!(at(format!("{NOTIFICATIONS}{{{z},source=\"cache\"}}")), 1.0);
        assert_eq!(at(format!("{SESSION_LOSSES}{{{z}}}")), 1.0);
        assert_eq!(at(format!("{DISCONNECTS}{{{z}}}")), 1.0);
        assert_eq!(at(format!("{RECONNECTS}{{{z}}}")), 1.0);
        assert_eq!(at(format!("{RECOVERY_DURATION}_count{{{z}}}")), 2.0);
        assert!((at(format!("{RECOVERY_DURATION}_sum{{{z}}}")) - 0.3).abs() < 1e-9);
        // A cached list has no backend event, so no delay.
        assert_eq!(at(format!("{NOTIFICATION_DELAY}_count{{{z}}}")), 1.0);
        let text = recorder.handle().render();
        assert!(
            text.contains(&format!("# TYPE {RETRIES} counter")),
            "{text}"
        );
        assert!(
            text.contains(&format!("# HELP {SESSION_LOSSES} Backend sessions lost")),
            "{text}"
        );
    }
}
