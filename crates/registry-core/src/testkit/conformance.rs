//! The conformance suite: one public async function per behaviour of CONTRACT §3 and §4.
//! Each function panics with a message that says what was expected when the backend does not
//! behave. Every function uses its own service names, so they can share one real server.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::recorder::{Recorder, wait_until};
use super::unique_service;
use crate::error::Error;
use crate::registry::Registry;
use crate::url::{
    CONFIGURATORS_CATEGORY, CONSUMERS_CATEGORY, PROVIDERS_CATEGORY, ROUTERS_CATEGORY, Url,
};

/// What the suite needs from a backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A new registry instance, with its own session, on the backend under test. Do not
    /// return a cached instance: several tests destroy theirs.
    async fn registry(&self) -> Arc<dyn Registry>;

    /// How long to wait for a condition before failing.
    fn deadline(&self) -> Duration {
        Duration::from_secs(15)
    }
}

/// A Dubbo-style provider URL of about 300 bytes, the `i`th of a large list (host
/// `10.<i>` spread over three octets, `pid` 10000 + `i`).
pub fn dubbo_provider(service: &str, i: u32) -> Url {
    dubbo_provider_of("large-list-provider", service, i)
}

/// [`dubbo_provider`] of the application `application`.
pub fn dubbo_provider_of(application: &str, service: &str, i: u32) -> Url {
    format!(
        "dubbo://10.{}.{}.{}:20880/{service}?anyhost=true&application={application}\
         &deprecated=false&dubbo=2.0.2&dynamic=true&generic=false&interface={service}\
         &methods=sayHello,sayHelloAsync,sayGoodbye&pid={}&release=3.2.0&side=provider\
         &timestamp=1700000000000",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff,
        10_000 + i
    )
    .parse()
    .unwrap_or_else(|e| panic!("bad provider URL: {e}"))
}

/// A Dubbo-like provider URL of `service` on host `10.0.0.<n>`, with `extra` parameters
/// (`"group=a&version=1.0"`).
pub fn provider(service: &str, n: u8, extra: &str) -> Url {
    let mut s = format!(
        "dubbo://10.0.0.{n}:20880/{service}?anyhost=true&application=kit-provider&deprecated=false\
         &dubbo=2.0.2&generic=false&interface={service}&methods=sayHello,sayHelloAsync&release=&side=provider"
    );
    if !extra.is_empty() {
        s.push('&');
        s.push_str(extra);
    }
    parse(&s)
}

/// A subscription URL for `service` with `extra` parameters (`"category=providers,routers"`).
pub fn consumer(service: &str, extra: &str) -> Url {
    let mut s = format!(
        "consumer://10.0.0.250/{service}?application=kit-consumer&interface={service}&side=consumer"
    );
    if !extra.is_empty() {
        s.push('&');
        s.push_str(extra);
    }
    parse(&s)
}

fn parse(s: &str) -> Url {
    Url::parse(s).unwrap_or_else(|e| panic!("the kit built a bad URL: {e}"))
}

fn ok<T>(what: &str, r: crate::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

fn sorted(mut v: Vec<Url>) -> Vec<Url> {
    v.sort_by_cached_key(Url::to_full_string);
    v
}

/// §3 register: registering the same URL twice leaves one entry, and another registry
/// instance sees it.
pub async fn register_is_idempotent(h: &dyn Harness) {
    let s = unique_service("idem");
    let a = h.registry().await;
    let b = h.registry().await;
    let p = provider(&s, 1, "");
    ok("register", a.register(&p).await);
    ok("register again", a.register(&p).await);
    let seen = ok("lookup", b.lookup(&consumer(&s, "")).await);
    assert_eq!(seen, vec![p.clone()], "one entry after registering twice");
    let rec = Recorder::new();
    ok(
        "subscribe",
        b.subscribe(&consumer(&s, ""), rec.listener()).await,
    );
    assert_eq!(
        rec.latest_entries(&s, PROVIDERS_CATEGORY),
        Some(vec![p.clone()]),
        "the first notification holds the entry once"
    );
    ok("unregister", a.unregister(&p).await);
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &[], h.deadline())
        .await;
    a.destroy().await;
    b.destroy().await;
}

/// §3 register: URLs that differ only in their parameters are separate entries.
pub async fn urls_differing_in_parameters_coexist(h: &dyn Harness) {
    let s = unique_service("coexist");
    let r = h.registry().await;
    let p1 = provider(&s, 1, "weight=100");
    let p2 = provider(&s, 1, "weight=200");
    ok("register", r.register(&p1).await);
    ok("register", r.register(&p2).await);
    let seen = sorted(ok("lookup", r.lookup(&consumer(&s, "")).await));
    assert_eq!(seen, sorted(vec![p1.clone(), p2.clone()]));
    ok("unregister", r.unregister(&p1).await);
    assert_eq!(ok("lookup", r.lookup(&consumer(&s, "")).await), vec![p2]);
    r.destroy().await;
}

/// §3 subscribe and §4.2: subscribe returns after the first notification, which covers every
/// category of the subscription, one notification per category, in the listed order.
pub async fn first_notification_covers_all_categories_in_order(h: &dyn Harness) {
    let s = unique_service("first");
    let r = h.registry().await;
    let p = provider(&s, 1, "");
    let route = parse(&format!(
        "route://0.0.0.0/{s}?category=routers&dynamic=false&name=kit&rule=cond"
    ));
    ok("register", r.register(&p).await);
    ok("register", r.register(&route).await);
    let rec = Recorder::new();
    ok(
        "subscribe",
        r.subscribe(
            &consumer(&s, "category=routers,providers,configurators"),
            rec.listener(),
        )
        .await,
    );
    let got = rec.all();
    assert!(
        got.len() >= 3,
        "subscribe returned before the first notification of every category: {got:?}"
    );
    let cats: Vec<&str> = got[..3].iter().map(|n| n.category.as_str()).collect();
    assert_eq!(
        cats,
        [ROUTERS_CATEGORY, PROVIDERS_CATEGORY, CONFIGURATORS_CATEGORY]
    );
    assert_eq!(got[0].urls.to_vec(), vec![route.clone()]);
    assert_eq!(got[1].urls.to_vec(), vec![p.clone()]);
    assert!(got[2].is_empty(), "an empty category is an empty:// marker");
    for n in &got[..3] {
        assert_eq!(n.service, s);
        assert_eq!(n.source, crate::Source::Live);
    }
    ok("unregister", r.unregister(&route).await);
    r.destroy().await;
}

/// §4.4: an empty category is notified as one `empty://` marker: the subscription URL with
/// protocol `empty` and `category=<category>`; the list is never empty.
pub async fn empty_category_is_a_marker(h: &dyn Harness) {
    let s = unique_service("empty");
    let r = h.registry().await;
    let sub = consumer(&s, "");
    let rec = Recorder::new();
    ok("subscribe", r.subscribe(&sub, rec.listener()).await);
    let first = rec
        .latest(&s, PROVIDERS_CATEGORY)
        .expect("a first notification");
    assert_eq!(first.urls.len(), 1);
    let marker = &first.urls[0];
    assert_eq!(marker.protocol(), "empty");
    assert_eq!(marker.parameter("category"), Some(PROVIDERS_CATEGORY));
    assert_eq!(marker.service_interface(), s);
    let p = provider(&s, 1, "");
    ok("register", r.register(&p).await);
    rec.wait_for_entries(
        &s,
        PROVIDERS_CATEGORY,
        std::slice::from_ref(&p),
        h.deadline(),
    )
    .await;
    ok("unregister", r.unregister(&p).await);
    rec.wait_for(
        "the empty marker after the last provider left",
        h.deadline(),
        |all| {
            all.last().is_some_and(|n| {
                n.urls.len() == 1 && n.urls[0].is_empty_marker() && n.category == PROVIDERS_CATEGORY
            })
        },
    )
    .await;
    assert!(
        rec.all().iter().all(|n| !n.urls.is_empty()),
        "no notification is an empty list"
    );
    r.destroy().await;
}

/// §2.2 and §4.3: a subscription only hears about its categories; categories are tokens
/// (`routers` does not match `router`), `*` means all four and `-x` excludes `x`.
pub async fn categories_are_filtered(h: &dyn Harness) {
    let s = unique_service("cats");
    let r = h.registry().await;
    let p = provider(&s, 1, "");
    let c = parse(&format!(
        "consumer://10.0.0.7/{s}?category=consumers&interface={s}&side=consumer"
    ));
    let route = parse(&format!("route://0.0.0.0/{s}?category=routers&name=r1"));
    let odd = parse(&format!("route://0.0.0.0/{s}?category=router&name=r2"));
    for u in [&p, &c, &route, &odd] {
        ok("register", r.register(u).await);
    }
    let only_providers = Recorder::new();
    ok(
        "subscribe",
        r.subscribe(&consumer(&s, ""), only_providers.listener())
            .await,
    );
    let routers = Recorder::new();
    ok(
        "subscribe",
        r.subscribe(&consumer(&s, "category=routers"), routers.listener())
            .await,
    );
    let all = Recorder::new();
    ok(
        "subscribe",
        r.subscribe(&consumer(&s, "category=*"), all.listener())
            .await,
    );
    let not_consumers = Recorder::new();
    ok(
        "subscribe",
        r.subscribe(
            &consumer(&s, "category=-consumers"),
            not_consumers.listener(),
        )
        .await,
    );

    assert_eq!(
        only_providers.latest_entries(&s, PROVIDERS_CATEGORY),
        Some(vec![p.clone()])
    );
    assert!(
        only_providers
            .all()
            .iter()
            .all(|n| n.category == PROVIDERS_CATEGORY)
    );
    assert_eq!(
        routers.latest_entries(&s, ROUTERS_CATEGORY),
        Some(vec![route.clone()]),
        "`router` is not `routers`"
    );
    assert!(routers.all().iter().all(|n| n.category == ROUTERS_CATEGORY));
    let cats: Vec<String> = all
        .all()
        .iter()
        .take(4)
        .map(|n| n.category.clone())
        .collect();
    assert_eq!(
        cats,
        [
            PROVIDERS_CATEGORY,
            CONSUMERS_CATEGORY,
            ROUTERS_CATEGORY,
            CONFIGURATORS_CATEGORY
        ]
    );
    assert_eq!(
        all.latest_entries(&s, CONSUMERS_CATEGORY),
        Some(vec![c.clone()])
    );
    let cats: Vec<String> = not_consumers
        .all()
        .iter()
        .take(3)
        .map(|n| n.category.clone())
        .collect();
    assert_eq!(
        cats,
        [PROVIDERS_CATEGORY, ROUTERS_CATEGORY, CONFIGURATORS_CATEGORY]
    );

    // A change of another category does not notify a providers-only subscription.
    let before = only_providers.len();
    ok("unregister", r.unregister(&c).await);
    all.wait_for_entries(&s, CONSUMERS_CATEGORY, &[], h.deadline())
        .await;
    let p2 = provider(&s, 2, "");
    ok("register", r.register(&p2).await);
    only_providers
        .wait_for_entries(
            &s,
            PROVIDERS_CATEGORY,
            &[p.clone(), p2.clone()],
            h.deadline(),
        )
        .await;
    assert_eq!(
        only_providers.len(),
        before + 1,
        "only the providers change was notified"
    );
    for u in [&p, &p2, &route, &odd] {
        ok("unregister", r.unregister(u).await);
    }
    r.destroy().await;
}

/// §2.3–2.6: enabled, group (including comma lists and `*`), version and classifier.
pub async fn group_version_classifier_matching(h: &dyn Harness) {
    let s = unique_service("match");
    let r = h.registry().await;
    let a = provider(&s, 1, "group=a&version=1.0");
    let b = provider(&s, 2, "group=b&version=1.0");
    let none = provider(&s, 3, "version=1.0");
    let v2 = provider(&s, 4, "group=a&version=2.0");
    let cls = provider(&s, 5, "group=a&version=1.0&classifier=x");
    let off = provider(&s, 6, "group=a&version=1.0&enabled=false");
    for u in [&a, &b, &none, &v2, &cls, &off] {
        ok("register", r.register(u).await);
    }
    let cases: Vec<(&str, Vec<&Url>)> = vec![
        ("group=a&version=1.0", vec![&a, &cls]),
        ("group=a,b&version=1.0", vec![&a, &b, &cls]),
        ("group=*&version=*", vec![&a, &b, &none, &v2, &cls]),
        ("version=1.0", vec![&none]),
        ("group=a&version=1.0&classifier=x", vec![&cls]),
        ("group=a&version=2.0", vec![&v2]),
        ("group=a&version=1.0&enabled=*", vec![&a, &cls, &off]),
        ("group=c&version=1.0", vec![]),
    ];
    for (query, want) in cases {
        let want = sorted(want.into_iter().cloned().collect());
        let q = consumer(&s, query);
        assert_eq!(
            sorted(ok("lookup", r.lookup(&q).await)),
            want,
            "lookup {query}"
        );
        let rec = Recorder::new();
        ok("subscribe", r.subscribe(&q, rec.listener()).await);
        assert_eq!(
            rec.latest_entries(&s, PROVIDERS_CATEGORY),
            Some(want),
            "subscribe {query}"
        );
        ok("unsubscribe", r.unsubscribe(&q, &rec.listener()).await);
    }
    for u in [&a, &b, &none, &v2, &cls, &off] {
        ok("unregister", r.unregister(u).await);
    }
    r.destroy().await;
}

/// §3 subscribe: `interface=*` sees the services present at subscribe time and services
/// that appear later, each notified under its own name.
pub async fn wildcard_interface_sees_later_services(h: &dyn Harness) {
    let before = unique_service("wild");
    let later = unique_service("wild");
    let r = h.registry().await;
    let p0 = provider(&before, 1, "");
    ok("register", r.register(&p0).await);
    let rec = Recorder::new();
    let sub = parse(
        "consumer://10.0.0.250/*?interface=*&group=*&version=*&classifier=*&category=providers",
    );
    ok("subscribe", r.subscribe(&sub, rec.listener()).await);
    assert_eq!(
        rec.latest_entries(&before, PROVIDERS_CATEGORY),
        Some(vec![p0.clone()]),
        "a service present at subscribe time is in the first notifications"
    );
    let p1 = provider(&later, 1, "");
    ok("register", r.register(&p1).await);
    rec.wait_for_entries(
        &later,
        PROVIDERS_CATEGORY,
        std::slice::from_ref(&p1),
        h.deadline(),
    )
    .await;
    ok("unregister", r.unregister(&p1).await);
    rec.wait_for_entries(&later, PROVIDERS_CATEGORY, &[], h.deadline())
        .await;
    ok("unsubscribe", r.unsubscribe(&sub, &rec.listener()).await);
    ok("unregister", r.unregister(&p0).await);
    r.destroy().await;
}

/// §3 subscribe: the same (URL, listener) twice is one subscription; listeners are told
/// apart by identity.
pub async fn same_listener_twice_is_one_subscription(h: &dyn Harness) {
    let s = unique_service("twice");
    let r = h.registry().await;
    let q = consumer(&s, "");
    let rec = Recorder::new();
    ok("subscribe", r.subscribe(&q, rec.listener()).await);
    ok("subscribe again", r.subscribe(&q, rec.listener()).await);
    let p1 = provider(&s, 1, "");
    ok("register", r.register(&p1).await);
    rec.wait_for_entries(
        &s,
        PROVIDERS_CATEGORY,
        std::slice::from_ref(&p1),
        h.deadline(),
    )
    .await;
    let p2 = provider(&s, 2, "");
    ok("register", r.register(&p2).await);
    rec.wait_for_entries(
        &s,
        PROVIDERS_CATEGORY,
        &[p1.clone(), p2.clone()],
        h.deadline(),
    )
    .await;
    let with_p1_only = rec
        .all()
        .iter()
        .filter(|n| n.entries().cloned().collect::<Vec<_>>() == vec![p1.clone()])
        .count();
    assert_eq!(with_p1_only, 1, "one subscription delivers each list once");
    ok("unsubscribe", r.unsubscribe(&q, &rec.listener()).await);
    ok("unregister", r.unregister(&p1).await);
    ok("unregister", r.unregister(&p2).await);
    r.destroy().await;
}

/// §3 unsubscribe: no notification reaches the listener after unsubscribe returns; unknown
/// subscriptions are ignored.
pub async fn unsubscribe_stops_notifications(h: &dyn Harness) {
    let s = unique_service("unsub");
    let r = h.registry().await;
    let q = consumer(&s, "");
    let gone = Recorder::new();
    let witness = Recorder::new();
    ok("subscribe", r.subscribe(&q, gone.listener()).await);
    ok("subscribe", r.subscribe(&q, witness.listener()).await);
    ok("unsubscribe", r.unsubscribe(&q, &gone.listener()).await);
    let count = gone.len();
    ok(
        "unsubscribe unknown",
        r.unsubscribe(&q, &gone.listener()).await,
    );
    ok(
        "unsubscribe unknown",
        r.unsubscribe(&consumer(&s, "group=x"), &witness.listener())
            .await,
    );
    let p1 = provider(&s, 1, "");
    let p2 = provider(&s, 2, "");
    ok("register", r.register(&p1).await);
    ok("register", r.register(&p2).await);
    witness
        .wait_for_entries(
            &s,
            PROVIDERS_CATEGORY,
            &[p1.clone(), p2.clone()],
            h.deadline(),
        )
        .await;
    assert_eq!(
        gone.len(),
        count,
        "a notification reached an unsubscribed listener"
    );
    ok("unregister", r.unregister(&p1).await);
    ok("unregister", r.unregister(&p2).await);
    r.destroy().await;
}

/// §3 lookup: one pull of the current matching URLs without markers, fresh on every call,
/// and no subscription left behind: nothing the lookup touched is notified later.
pub async fn lookup_is_a_pull_without_subscription(h: &dyn Harness) {
    let s = unique_service("lookup");
    let r = h.registry().await;
    assert_eq!(
        ok("lookup", r.lookup(&consumer(&s, "")).await),
        vec![],
        "nothing registered: empty, no marker"
    );
    let p1 = provider(&s, 1, "");
    let route = parse(&format!("route://0.0.0.0/{s}?category=routers&name=l"));
    ok("register", r.register(&p1).await);
    ok("register", r.register(&route).await);
    assert_eq!(
        ok("lookup", r.lookup(&consumer(&s, "")).await),
        vec![p1.clone()]
    );
    let both = sorted(ok(
        "lookup",
        r.lookup(&consumer(&s, "category=providers,routers")).await,
    ));
    assert_eq!(both, sorted(vec![p1.clone(), route.clone()]));
    let p2 = provider(&s, 2, "");
    ok("register", r.register(&p2).await);
    let fresh = sorted(ok("lookup", r.lookup(&consumer(&s, "")).await));
    assert_eq!(
        fresh,
        sorted(vec![p1.clone(), p2.clone()]),
        "lookup is not answered from a stale cache"
    );
    for u in [&p1, &p2, &route] {
        ok("unregister", r.unregister(u).await);
    }
    assert_eq!(ok("lookup", r.lookup(&consumer(&s, "")).await), vec![]);
    r.destroy().await;
}

/// §3 lookup with `interface=*`: one pull over every service (what `registryctl list` uses);
/// other services on a shared server may appear too.
pub async fn wildcard_lookup_finds_every_service(h: &dyn Harness) {
    let s1 = unique_service("wlook");
    let s2 = unique_service("wlook");
    let r = h.registry().await;
    let p1 = provider(&s1, 1, "group=a&version=1.0");
    let p2 = provider(&s2, 2, "");
    let c2 = parse(&format!(
        "consumer://10.0.0.7/{s2}?category=consumers&interface={s2}&side=consumer"
    ));
    for u in [&p1, &p2, &c2] {
        ok("register", r.register(u).await);
    }
    let all = parse(
        "consumer://10.0.0.250/*?interface=*&group=*&version=*&classifier=*&category=providers,consumers",
    );
    let found = ok("lookup", r.lookup(&all).await);
    for u in [&p1, &p2, &c2] {
        assert!(found.contains(u), "interface=* lookup misses {u}");
    }
    assert!(
        found.iter().all(|u| !u.is_empty_marker()),
        "no markers in a lookup"
    );
    let providers_only =
        parse("consumer://10.0.0.250/*?interface=*&group=*&version=*&classifier=*");
    let found = ok("lookup", r.lookup(&providers_only).await);
    assert!(found.contains(&p1) && found.contains(&p2) && !found.contains(&c2));
    for u in [&p1, &p2, &c2] {
        ok("unregister", r.unregister(u).await);
    }
    r.destroy().await;
}

/// §3 unregister: removing what is not there is not an error.
pub async fn unregister_of_missing_url_is_ok(h: &dyn Harness) {
    let s = unique_service("missing");
    let r = h.registry().await;
    ok(
        "unregister of a missing URL",
        r.unregister(&provider(&s, 1, "")).await,
    );
    r.destroy().await;
}

/// §3 destroy: dynamic entries vanish, persistent ones stay, the instance is unavailable,
/// every operation returns `Destroyed`, and destroy is idempotent.
pub async fn destroy_removes_dynamic_keeps_persistent(h: &dyn Harness) {
    let s = unique_service("destroy");
    let a = h.registry().await;
    let b = h.registry().await;
    let dynamic = provider(&s, 1, "");
    let persistent = provider(&s, 2, "dynamic=false");
    ok("register", a.register(&dynamic).await);
    ok("register", a.register(&persistent).await);
    let rec = Recorder::new();
    let a_rec = Recorder::new();
    ok(
        "subscribe",
        b.subscribe(&consumer(&s, ""), rec.listener()).await,
    );
    ok(
        "subscribe",
        a.subscribe(&consumer(&s, ""), a_rec.listener()).await,
    );
    assert_eq!(
        rec.latest_entries(&s, PROVIDERS_CATEGORY),
        Some(sorted(vec![dynamic.clone(), persistent.clone()]))
    );
    a.destroy().await;
    assert!(!a.is_available(), "a destroyed registry is not available");
    a.destroy().await; // idempotent
    rec.wait_for_entries(
        &s,
        PROVIDERS_CATEGORY,
        std::slice::from_ref(&persistent),
        h.deadline(),
    )
    .await;
    let a_seen = a_rec.len();
    match a.register(&provider(&s, 3, "")).await {
        Err(Error::Destroyed { .. }) => {}
        other => panic!("register after destroy: expected Destroyed, got {other:?}"),
    }
    match a.lookup(&consumer(&s, "")).await {
        Err(Error::Destroyed { .. }) => {}
        other => panic!("lookup after destroy: expected Destroyed, got {other:?}"),
    }
    match a
        .subscribe(&consumer(&s, ""), Recorder::new().listener())
        .await
    {
        Err(Error::Destroyed { .. }) => {}
        other => panic!("subscribe after destroy: expected Destroyed, got {other:?}"),
    }
    let p4 = provider(&s, 4, "");
    ok("register", b.register(&p4).await);
    rec.wait_for_entries(
        &s,
        PROVIDERS_CATEGORY,
        &[persistent.clone(), p4.clone()],
        h.deadline(),
    )
    .await;
    assert_eq!(
        a_rec.len(),
        a_seen,
        "destroy dropped the destroyed registry's subscriptions"
    );
    ok("unregister", b.unregister(&persistent).await);
    ok("unregister", b.unregister(&p4).await);
    wait_until(
        "the persistent entry to be removed",
        h.deadline(),
        || async {
            b.lookup(&consumer(&s, ""))
                .await
                .is_ok_and(|l| l.is_empty())
        },
    )
    .await;
    b.destroy().await;
}

/// §4.1 and §4.5: under a burst of changes every notification is a full list, lists arrive
/// in the order of the changes (never an older state after a newer one), revisions never go
/// back, and the last list is the final state.
pub async fn notifications_are_ordered_under_a_burst(h: &dyn Harness) {
    const N: u8 = 30;
    let s = unique_service("burst");
    let r = h.registry().await;
    let w = h.registry().await;
    let rec = Recorder::new();
    ok(
        "subscribe",
        r.subscribe(&consumer(&s, ""), rec.listener()).await,
    );
    let ps: Vec<Url> = (1..=N).map(|i| provider(&s, i, "")).collect();
    for p in &ps {
        ok("register", w.register(p).await);
    }
    for p in &ps[..(N / 2) as usize] {
        ok("unregister", w.unregister(p).await);
    }
    let last_half = &ps[(N / 2) as usize..];
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, last_half, h.deadline())
        .await;

    // Position of a list in the history: {p1..pk} is k; {p(j+1)..pN} is N + j.
    let position = |list: &[Url]| -> Option<usize> {
        let set: std::collections::HashSet<&Url> = list.iter().collect();
        let n = N as usize;
        (0..=n)
            .find(|&k| set.len() == k && ps[..k].iter().all(|p| set.contains(p)))
            .or_else(|| {
                (1..=n)
                    .find(|&j| set.len() == n - j && ps[j..].iter().all(|p| set.contains(p)))
                    .map(|j| n + j)
            })
    };
    let mut last_pos = 0usize;
    let mut last_rev = 0u64;
    for n in rec
        .all()
        .iter()
        .filter(|n| n.category == PROVIDERS_CATEGORY)
    {
        let list: Vec<Url> = n.entries().cloned().collect();
        let pos = position(&list).unwrap_or_else(|| panic!("a list that never existed: {list:?}"));
        assert!(
            pos >= last_pos,
            "an older list ({pos}) after a newer one ({last_pos})"
        );
        assert!(
            n.revision >= last_rev,
            "revision went back: {} after {last_rev}",
            n.revision
        );
        last_pos = pos;
        last_rev = n.revision;
    }
    for p in last_half {
        ok("unregister", w.unregister(p).await);
    }
    r.destroy().await;
    w.destroy().await;
}

/// Runs every function of the suite, in order, logging each name.
pub async fn run_all(h: &dyn Harness) {
    crate::__conformance_cases!(__conformance_run, h);
}

/// CONTRACT §3 register: one entry per identity. A URL registered again with another
/// `timestamp` replaces the entry (the node name / key of the old one included), and an
/// unregister with yet another timestamp removes it: no ghost is left.
pub async fn reregister_with_a_new_timestamp_replaces(h: &dyn Harness) {
    let s = unique_service("stamp");
    let a = h.registry().await;
    let b = h.registry().await;
    let v1 = provider(&s, 1, "timestamp=1000");
    let v2 = provider(&s, 1, "timestamp=2000");
    let v3 = provider(&s, 1, "timestamp=3000");
    let full = |urls: Vec<Url>| -> Vec<String> { urls.iter().map(Url::to_full_string).collect() };
    ok("register", a.register(&v1).await);
    ok("register with a new timestamp", a.register(&v2).await);
    let seen = ok("lookup", b.lookup(&consumer(&s, "")).await);
    assert_eq!(
        full(seen),
        vec![v2.to_full_string()],
        "a re-register with a new timestamp replaces the entry"
    );
    ok("unregister with another timestamp", a.unregister(&v3).await);
    let seen = ok("lookup", b.lookup(&consumer(&s, "")).await);
    assert!(
        seen.is_empty(),
        "no entry left after unregister: {:?}",
        full(seen)
    );
    a.destroy().await;
    b.destroy().await;
}

/// The one list of conformance cases; calls `$crate::$callback!{ [args] case, case, ... }`.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($callback:ident, $($arg:tt)*) => {
        $crate::$callback! {
            [$($arg)*]
            register_is_idempotent,
            reregister_with_a_new_timestamp_replaces,
            urls_differing_in_parameters_coexist,
            first_notification_covers_all_categories_in_order,
            empty_category_is_a_marker,
            categories_are_filtered,
            group_version_classifier_matching,
            wildcard_interface_sees_later_services,
            same_listener_twice_is_one_subscription,
            unsubscribe_stops_notifications,
            lookup_is_a_pull_without_subscription,
            wildcard_lookup_finds_every_service,
            unregister_of_missing_url_is_ok,
            destroy_removes_dynamic_keeps_persistent,
            notifications_are_ordered_under_a_burst,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_run {
    ([$h:expr] $($f:ident),* $(,)?) => {$(
        tracing::info!(case = stringify!($f), "conformance");
        $crate::testkit::$f($h).await;
    )*};
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test {
    ([$make:expr] $($f:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $f() {
            if let Some(harness) = ($make)(stringify!($f)) {
                $crate::testkit::$f(&harness).await;
            }
        }
    )*};
}

/// Expands to one `#[tokio::test]` per conformance function, so a backend's test file is:
///
/// ```ignore
/// registry_core::conformance_tests!(|case: &str| Some(MyHarness::new(case)));
/// ```
///
/// The expression is called with the case's name and returns `Option<impl Harness>`; `None`
/// skips the case (for example when the test server is not there). The calling crate needs
/// `tokio` with the `macros` and `rt-multi-thread` features as a dev-dependency.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::__conformance_cases!(__conformance_test, $make);
    };
}
