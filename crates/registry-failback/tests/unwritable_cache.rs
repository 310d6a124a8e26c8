//! A cache file that cannot be written (its directory cannot be created): the registry works,
//! one warning is logged, and the saves back off instead of retrying at every change. Alone
//! in its test binary, because it counts log events with a process-wide subscriber.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use registry_core::testkit::{Recorder, consumer, provider, unique_service};
use registry_core::{MemoryRegistry, Registry, Source, Url};
use registry_failback::FailbackRegistry;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

const DEADLINE: Duration = Duration::from_secs(10);

/// Counts the save attempts and warnings about one cache file.
#[derive(Default)]
struct Counter {
    file: Mutex<String>,
    attempts: AtomicUsize,
    warnings: AtomicUsize,
}

#[derive(Default)]
struct Fields {
    message: String,
    file: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "file" => self.file = format!("{value:?}"),
            _ => {}
        }
    }
}

struct Layer(Arc<Counter>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        if f.file != *self.0.file.lock().unwrap() {
            return;
        }
        if f.message == "saving the registry cache" {
            self.0.attempts.fetch_add(1, Ordering::SeqCst);
        }
        if *event.metadata().level() == tracing::Level::WARN {
            eprintln!("warning: {} ({})", f.message, f.file);
            self.0.warnings.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_cache_is_one_warning_and_no_busy_retry() {
    let counter = Arc::new(Counter::default());
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(Layer(counter.clone())),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the cache directory should be: no one (root included) can make it.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"").unwrap();
    let file = blocker.join("cache").join("registry.json");
    *counter.file.lock().unwrap() = file.display().to_string();

    let store = unique_service("unwritable").replace('.', "-");
    let url: Url = format!("memory://{store}?file={}&file.debounce=10", file.display())
        .parse()
        .unwrap();
    let handle = MemoryRegistry::new(url.clone());
    let fb = FailbackRegistry::new(Arc::new(MemoryRegistry::new(url))).unwrap();
    let s = unique_service("unwritable");
    let rec = Recorder::new();
    fb.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap();
    let mine = provider(&s, 200, "");
    fb.register(&mine).await.unwrap();

    // Changes for 1.5 s, each one seen live by the subscriber: with a 10 ms debounce a
    // writer that retried at every change would try about 100 times.
    let start = Instant::now();
    let mut want = vec![mine.clone()];
    let mut n = 1u32;
    while start.elapsed() < Duration::from_millis(1500) {
        let p: Url = format!(
            "dubbo://10.0.1.1:{}/{s}?interface={s}&side=provider",
            20000 + n
        )
        .parse()
        .unwrap();
        handle.register(&p).await.unwrap();
        want.push(p);
        rec.wait_for_entries(&s, "providers", &want, DEADLINE).await;
        n += 1;
        // Paced like real changes; the debounce (10 ms) ends between most of them.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let latest = rec.latest(&s, "providers").unwrap();
    assert_eq!(latest.source, Source::Live);
    assert!(
        handle
            .lookup(&consumer(&s, ""))
            .await
            .unwrap()
            .contains(&mine)
    );
    fb.destroy().await;

    let attempts = counter.attempts.load(Ordering::SeqCst);
    let warnings = counter.warnings.load(Ordering::SeqCst);
    eprintln!(
        "{} changes in {:?}: {attempts} save attempts, {warnings} warnings",
        n - 1,
        start.elapsed()
    );
    assert!(n > 10, "enough changes to tell a backoff from a busy retry");
    assert_eq!(warnings, 1, "one warning");
    // The first save, one retry after 1 s, and the final save at destroy.
    assert!((1..=4).contains(&attempts), "{attempts} attempts");
    assert!(!file.exists());
}
