use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::registry::{Notification, NotifyListener};
use crate::url::Url;

/// A listener that records every notification and lets a test wait, with a deadline, until
/// what it recorded satisfies a condition.
///
/// Each `Arc<Recorder>` is one listener identity: pass `recorder.listener()` (the same `Arc`)
/// to both `subscribe` and `unsubscribe`.
pub struct Recorder {
    seen: Mutex<Vec<Notification>>,
    count: watch::Sender<usize>,
}

impl Recorder {
    /// A new recorder.
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
        })
    }

    /// This recorder as a listener (always the same identity).
    pub fn listener(self: &Arc<Self>) -> Arc<dyn NotifyListener> {
        self.clone()
    }

    /// Everything recorded, in order.
    pub fn all(&self) -> Vec<Notification> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many notifications were recorded.
    pub fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last notification of (`service`, `category`).
    pub fn latest(&self, service: &str, category: &str) -> Option<Notification> {
        self.all()
            .into_iter()
            .rev()
            .find(|n| n.service == service && n.category == category)
    }

    /// The entries (markers removed) of the last notification of (`service`, `category`),
    /// sorted by full string.
    pub fn latest_entries(&self, service: &str, category: &str) -> Option<Vec<Url>> {
        self.latest(service, category)
            .map(|n| sorted(n.entries().cloned().collect()))
    }

    /// Waits until `cond` holds on everything recorded; panics with `what` and the recorded
    /// notifications when `deadline` passes first.
    pub async fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        cond: impl Fn(&[Notification]) -> bool,
    ) {
        let mut rx = self.count.subscribe();
        let check = || cond(&self.seen.lock().unwrap_or_else(|p| p.into_inner()));
        let done = tokio::time::timeout(deadline, async {
            loop {
                if check() {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if done.is_err() || !check() {
            panic!(
                "timed out after {deadline:?} waiting for {what}; recorded: {:#?}",
                self.all()
                    .iter()
                    .map(|n| format!(
                        "{} {} r{} {:?}: {:?}",
                        n.service,
                        n.category,
                        n.revision,
                        n.source,
                        n.urls.iter().map(Url::to_full_string).collect::<Vec<_>>()
                    ))
                    .collect::<Vec<_>>()
            );
        }
    }

    /// Waits until the latest entries of (`service`, `category`) are exactly `expected`.
    pub async fn wait_for_entries(
        &self,
        service: &str,
        category: &str,
        expected: &[Url],
        deadline: Duration,
    ) {
        let want = sorted(expected.to_vec());
        self.wait_for(
            &format!("{service}/{category} to hold {want:?}"),
            deadline,
            |all| {
                all.iter()
                    .rev()
                    .find(|n| n.service == service && n.category == category)
                    .is_some_and(|n| sorted(n.entries().cloned().collect()) == want)
            },
        )
        .await;
    }
}

fn sorted(mut v: Vec<Url>) -> Vec<Url> {
    v.sort_by_cached_key(Url::to_full_string);
    v
}

impl NotifyListener for Recorder {
    fn notify(&self, n: Notification) {
        let len = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.push(n);
            seen.len()
        };
        self.count.send_replace(len);
    }
}

/// Polls `cond` (an async check, such as a lookup) until it returns true; panics with `what`
/// when `deadline` passes first. The poll interval starts at 5 ms and doubles to 200 ms.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
