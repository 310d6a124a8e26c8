//! [`subscribe_stream`]: a subscription as a `Stream` of notifications.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_core::Stream;

use crate::error::Result;
use crate::registry::{Notification, NotifyListener, Registry, RegistryEvent};
use crate::url::Url;
use tokio::sync::broadcast;

#[derive(Default)]
struct Queue {
    items: VecDeque<Notification>,
    waker: Option<Waker>,
    /// The registry was destroyed: the stream ends after what is queued.
    ended: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
}

impl Shared {
    fn end(&self) {
        let waker = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.ended = true;
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl NotifyListener for Shared {
    fn notify(&self, n: Notification) {
        let waker = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            // Latest wins: a list not yet taken is replaced by the newer one of its category.
            match q
                .items
                .iter_mut()
                .find(|p| p.service == n.service && p.category == n.category)
            {
                Some(pending) => *pending = n,
                None => q.items.push_back(n),
            }
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// What dropping the stream unsubscribes.
type Subscription = (Arc<dyn Registry>, Url, Arc<dyn NotifyListener>);

/// The notifications of one subscription as a [`Stream`]. Dropping it unsubscribes (in the
/// background, on the runtime it was created on). A consumer slower than the changes gets
/// the latest list of each category, not every intermediate one. The stream ends (`None`)
/// after the registry is destroyed.
pub struct NotificationStream {
    shared: Arc<Shared>,
    subscription: Option<Subscription>,
    runtime: Option<tokio::runtime::Handle>,
    watcher: tokio::task::AbortHandle,
}

/// Subscribes to `url` on `registry` and returns the notifications as a stream. Like
/// [`Registry::subscribe`], it returns after the first notification of every category; those
/// are the first items of the stream.
///
/// ```
/// # async fn demo() -> registry_core::Result<()> {
/// use futures_util::StreamExt;
/// let registry = registry_core::get_registry("memory://stream-doc").await?;
/// let query = "consumer://10.0.0.2/com.foo.Greeter".parse()?;
/// let mut stream = registry_core::subscribe_stream(registry.clone(), query).await?;
/// let first = stream.next().await.expect("first notification");
/// assert!(first.is_empty()); // nothing registered yet: the `empty://` marker
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
pub async fn subscribe_stream(registry: Arc<dyn Registry>, url: Url) -> Result<NotificationStream> {
    let shared = Arc::new(Shared::default());
    let listener: Arc<dyn NotifyListener> = shared.clone();
    // Watch for the end before subscribing, so a destroy in between is not missed.
    let mut events = registry.events();
    let weak_registry = Arc::downgrade(&registry);
    let weak_shared = Arc::downgrade(&shared);
    let watcher = tokio::spawn(async move {
        loop {
            let ended = match events.recv().await {
                Ok(RegistryEvent::Destroyed) | Err(broadcast::error::RecvError::Closed) => true,
                Ok(_) => false,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    weak_registry.upgrade().is_none_or(|r| r.is_destroyed())
                }
            };
            if ended {
                if let Some(s) = weak_shared.upgrade() {
                    s.end();
                }
                return;
            }
        }
    })
    .abort_handle();
    if let Err(e) = registry.subscribe(&url, listener.clone()).await {
        watcher.abort();
        return Err(e);
    }
    if registry.is_destroyed() {
        shared.end();
    }
    Ok(NotificationStream {
        shared,
        subscription: Some((registry, url, listener)),
        runtime: tokio::runtime::Handle::try_current().ok(),
        watcher,
    })
}

impl NotificationStream {
    /// Unsubscribes now and waits for it; the stream then ends after what is queued.
    pub async fn unsubscribe(mut self) -> Result<()> {
        match self.subscription.take() {
            Some((reg, url, listener)) => reg.unsubscribe(&url, &listener).await,
            None => Ok(()),
        }
    }
}

impl Stream for NotificationStream {
    type Item = Notification;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        match q.items.pop_front() {
            Some(n) => Poll::Ready(Some(n)),
            None if q.ended => Poll::Ready(None),
            None => {
                q.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for NotificationStream {
    fn drop(&mut self) {
        self.watcher.abort();
        if let (Some((reg, url, listener)), Some(rt)) = (self.subscription.take(), &self.runtime) {
            rt.spawn(async move {
                if let Err(e) = reg.unsubscribe(&url, &listener).await {
                    tracing::debug!(url = %url.to_redacted_string(), error = %e, "unsubscribe of a dropped notification stream failed");
                }
            });
        }
    }
}
