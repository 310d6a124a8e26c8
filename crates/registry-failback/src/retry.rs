//! Backoff and the keys of the retry queue.
//!
//! One pending task per key: a registered URL, or a (subscription URL, listener) pair. A task
//! does not carry an operation: each attempt brings the backend to the application's *current*
//! intent for its key (register or unregister, subscribe or unsubscribe), so a register and an
//! unregister of the same URL can never race each other from the queue. Each pending task is a
//! tokio task sleeping on a tokio timer; it leaves the queue when it succeeds, gives up or is
//! cancelled, so an exhausted key can be retried again later (Dubbo #6810, #7665).

use std::time::Duration;

use rand::Rng;
use registry_core::Url;

/// What a retry task brings to its intent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum TaskKey {
    /// A registered (or unregistered) URL.
    Reg(Url),
    /// A (subscription URL, listener id) pair.
    Sub(Url, usize),
}

impl TaskKey {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            TaskKey::Reg(_) => "registration",
            TaskKey::Sub(..) => "subscription",
        }
    }

    pub(crate) fn url(&self) -> &Url {
        match self {
            TaskKey::Reg(u) | TaskKey::Sub(u, _) => u,
        }
    }
}

/// The ceiling of the wait before retry number `attempt` (1-based): `base`, doubling each
/// attempt, capped at `period`.
pub(crate) fn backoff_ceiling(attempt: u32, base: Duration, period: Duration) -> Duration {
    let shift = attempt.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << shift).min(period)
}

/// A uniformly random wait between `low` and `high`, in whole milliseconds when the span is
/// one or more (timers have millisecond resolution; whole milliseconds also make a run on a
/// paused clock repeatable from the seed of `rng`).
fn between(rng: &mut impl Rng, low: Duration, high: Duration) -> Duration {
    let span = high.saturating_sub(low);
    if span >= Duration::from_millis(1) {
        let ms = u64::try_from(span.as_millis()).unwrap_or(u64::MAX);
        low + Duration::from_millis(rng.random_range(0..=ms))
    } else {
        let nanos = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
        low + Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

/// Full jitter: a uniformly random wait between zero and the ceiling, so a fleet that lost
/// the same server does not retry in step (Dubbo #10181, Curator-441). Exponential backoff
/// with full jitter is a few lines; the randomness comes from `rand`.
pub(crate) fn backoff(
    rng: &mut impl Rng,
    attempt: u32,
    base: Duration,
    period: Duration,
) -> Duration {
    between(rng, Duration::ZERO, backoff_ceiling(attempt, base, period))
}

/// The wait before confirmation pass `n` (1-based) of an intent whose earlier write may
/// still land: between half and all of the ceiling of retry `n`, so passes come soon after
/// the intent is in place, then at most `period` apart, and a fleet does not make them in
/// step.
pub(crate) fn confirm_wait(
    rng: &mut impl Rng,
    n: u32,
    base: Duration,
    period: Duration,
) -> Duration {
    let ceiling = backoff_ceiling(n, base, period);
    between(rng, ceiling / 2, ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> rand::rngs::ThreadRng {
        rand::rng()
    }

    #[test]
    fn ceiling_doubles_up_to_the_period() {
        let (b, p) = (Duration::from_millis(100), Duration::from_millis(5000));
        let c: Vec<u128> = (1..=8)
            .map(|a| backoff_ceiling(a, b, p).as_millis())
            .collect();
        assert_eq!(c, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff_ceiling(u32::MAX, b, p), p);
    }

    #[test]
    fn confirmation_waits_stay_between_half_and_all_of_the_ceiling() {
        let (b, p) = (Duration::from_millis(100), Duration::from_millis(5000));
        for n in 1..=10 {
            let c = backoff_ceiling(n, b, p);
            for _ in 0..50 {
                let w = confirm_wait(&mut rng(), n, b, p);
                assert!(
                    w >= c / 2 && w <= c,
                    "pass {n}: {w:?} outside [{:?}, {c:?}]",
                    c / 2
                );
            }
        }
        assert!(confirm_wait(&mut rng(), u32::MAX, b, p) <= p);
    }

    #[test]
    fn jitter_stays_under_the_ceiling_and_varies() {
        let (b, p) = (Duration::from_millis(100), Duration::from_millis(5000));
        let waits: Vec<Duration> = (0..200).map(|_| backoff(&mut rng(), 3, b, p)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(400)));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 100, "full jitter spreads the waits");
        use rand::SeedableRng;
        let seeded = |seed| {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| backoff(&mut r, 5, b, p))
                .collect::<Vec<_>>()
        };
        assert_eq!(seeded(7), seeded(7), "a seed repeats the waits");
    }
}
