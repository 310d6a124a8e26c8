//! [`RegistryStatus`]: a snapshot of what a registry should have and how it is doing, so an
//! application can show its registration health.

use std::time::SystemTime;

use registry_core::{Source, Url};
use serde::Serialize;

/// The state of one intent (a registration, an unregistration or a subscription).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    /// In place in the backend.
    Ok,
    /// Failed; being retried.
    Retrying {
        /// Attempts made so far.
        attempt: u32,
        /// When the next attempt is due.
        next_attempt_at: Option<SystemTime>,
        /// The last error.
        last_error: String,
    },
    /// `retry.times` exhausted; not retried until the intent is made again or a new session
    /// restores it.
    GivenUp {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last_error: String,
    },
}

/// One registration or pending unregistration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IntentStatus {
    /// The URL.
    pub url: Url,
    /// Its state.
    pub health: Health,
}

/// One list a subscription was last told.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListStatus {
    /// The service.
    pub service: String,
    /// The category.
    pub category: String,
    /// Its revision.
    pub revision: u64,
    /// Live or cache.
    pub source: Source,
    /// Entries, markers excluded.
    pub entries: usize,
}

/// One subscription.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubscriptionStatus {
    /// The subscription URL.
    pub url: Url,
    /// Its state.
    pub health: Health,
    /// The lists last delivered to the listener.
    pub lists: Vec<ListStatus>,
}

/// A snapshot of a [`crate::FailbackRegistry`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegistryStatus {
    /// The registry (no password).
    pub registry: String,
    /// Connected to the backend now.
    pub available: bool,
    /// Destroyed.
    pub destroyed: bool,
    /// Every intended registration.
    pub registrations: Vec<IntentStatus>,
    /// Unregistrations that failed and are being retried (or gave up).
    pub unregistrations: Vec<IntentStatus>,
    /// Every subscription.
    pub subscriptions: Vec<SubscriptionStatus>,
    /// Intents in place whose retry task still confirms them (applies them again now and
    /// then, while a write of unknown outcome may still land; CONTRACT §6.1). They are
    /// [`Health::Ok`] and count as healthy.
    pub confirming: usize,
}

impl RegistryStatus {
    /// Whether every intent is in place.
    pub fn is_healthy(&self) -> bool {
        self.available
            && self.registrations.iter().all(|r| r.health == Health::Ok)
            && self.unregistrations.is_empty()
            && self.subscriptions.iter().all(|s| s.health == Health::Ok)
    }
}
