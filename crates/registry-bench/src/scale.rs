//! Workload 7, scale: (a) many subscriptions of one large service in one registry, and one
//! change reaching every one of them; (b) one subscription of a very large service.
//!
//! Both measure only through the public `Registry` API, so they run unchanged on any backend
//! a factory returns. Where something does not work at the defaults (a message size limit,
//! a timeout, a server running out of memory) the workload reports what failed instead of
//! hanging: every wait has a deadline, and a failure becomes a row of the report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use registry_core::{Notification, NotifyListener, Registry, Url};

use crate::alloc::{allocated_bytes, cpu_ns, live_bytes};
use crate::raw::{Counted, Raw};
use crate::report::{Lat, Measurement, Summary, Unit};
use crate::util::{Track, category_path, consumer, entry_path, provider};
use crate::{Backend, Ctx};

/// The longest wait for one step (a subscribe, a change reaching one listener).
const DEADLINE: Duration = Duration::from_secs(60);
/// The longest wait for one subscribe of the very large service, or its raw read.
const BIG_DEADLINE: Duration = Duration::from_secs(120);
/// Quiet time before a heap reading and after a change (the tail of its work).
const SETTLE: Duration = Duration::from_millis(200);
/// Warm-up changes of (a).
const WARM: usize = 2;

/// Runs (a) `many` and (b) `big` on the backend of `ctx`; a part that fails is reported as a
/// failed row.
pub async fn scale(ctx: &mut Ctx, many_part: bool, big_part: bool) -> anyhow::Result<()> {
    let b = ctx.backend.name();
    let (subs, n, big_n) = (
        ctx.sizes.scale_subs,
        ctx.sizes.scale_providers,
        ctx.sizes.scale_big,
    );
    if !many_part {
        // Not asked for.
    } else if let Err(e) = many(ctx).await {
        let e = format!("{e:#}; {}", server_state(ctx.backend, &ctx.addr).await);
        tracing::error!(backend = b, error = %e, "scale (a) failed");
        ctx.push(Measurement::failed(
            b,
            "scale",
            format!("{subs} subscriptions of one {n}-provider service"),
            subs as u64,
            "",
            e,
        ));
    }
    if !big_part {
        // Not asked for.
    } else if let Err(e) = big(ctx).await {
        let e = format!("{e:#}; {}", server_state(ctx.backend, &ctx.addr).await);
        tracing::error!(backend = b, error = %e, "scale (b) failed");
        ctx.push(Measurement::failed(
            b,
            "scale",
            format!("one subscription of a {big_n}-provider service"),
            big_n as u64,
            "",
            e,
        ));
    }
    Ok(())
}

/// Whether the server still answers (ZooKeeper `ruok`, etcd `/health`), for failure reports:
/// a server that ran out of memory is gone.
async fn server_state(b: Backend, addr: &str) -> String {
    let (cmd, ok) = match b {
        Backend::Zookeeper => ("ruok", "imok"),
        Backend::Etcd => (
            "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
            "\"health\":\"true\"",
        ),
    };
    match crate::workloads::four_letter(addr, cmd).await {
        Ok(answer) if answer.contains(ok) => "the server still answers".to_owned(),
        Ok(answer) => format!("the server answers {:?}", answer.trim()),
        Err(e) => format!(
            "the server no longer answers ({e}): it may have died (its log is in its directory)"
        ),
    }
}

/// Consumer number `i` of `service`: the same query (interface, group, version, category) as
/// every other, differing only in parameters that take no part in matching (host, pid), as
/// separate references of one application would.
fn scale_consumer(service: &str, i: usize) -> Url {
    format!(
        "consumer://10.1.{}.{}/{service}?application=bench-consumer&side=consumer&pid={}",
        (i >> 8) & 0xff,
        i & 0xff,
        20_000 + i
    )
    .parse()
    .unwrap_or_else(|e| panic!("bad consumer URL: {e}"))
}

/// A listener that records the size of every list it is given, in constant time (a 10,000
/// entry list is not walked 1,000 times per change by the bench itself).
fn counting(track: &Arc<Track>) -> Arc<dyn NotifyListener> {
    let t = track.clone();
    Arc::new(move |n: Notification| {
        t.record(if n.is_empty() { 0 } else { n.urls.len() });
    })
}

/// Writes providers `0..n` of `service` with `writer`, 64 in flight.
async fn write_providers(
    b: Backend,
    writer: &Raw,
    group: &str,
    service: &str,
    n: usize,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let entries: Vec<(String, String)> = (0..n)
        .map(|i| {
            let u = provider(service, u32::try_from(i).unwrap_or(u32::MAX));
            (entry_path(group, &u), u.to_full_string())
        })
        .collect();
    writer
        .create_all(entries)
        .await
        .with_context(|| format!("writing the {n} providers of {service}"))?;
    tracing::info!(
        backend = b.name(),
        n,
        took_ms = t.elapsed().as_secs_f64() * 1e3,
        "scale: providers written"
    );
    Ok(())
}

/// (a): `scale_subs` subscriptions, in one registry, of one service with `scale_providers`
/// providers; then a provider is added and removed again, alternately, and each change is
/// timed to every listener.
async fn many(ctx: &mut Ctx) -> anyhow::Result<()> {
    let b = ctx.backend;
    let group = ctx.group("scale");
    let service = "org.bench.ScaleService";
    let cat = category_path(&group, service);
    let writer = Raw::connect(b, &ctx.addr).await?;
    writer.ensure_dir(&cat).await?;
    write_providers(b, &writer, &group, service, ctx.sizes.scale_providers).await?;
    let observer = Raw::connect(b, &ctx.addr).await?;
    let (raw_tracks, tasks) = observer
        .watch_many(&[(cat.clone(), Counted::Children)])
        .await?;
    let reg = ctx.ours(&group).await?;
    let result = many_on(ctx, &reg, &writer, &raw_tracks[0], &group, service).await;
    let t = Instant::now();
    if tokio::time::timeout(DEADLINE, reg.destroy()).await.is_err() {
        tracing::warn!(
            backend = b.name(),
            "scale: destroy did not return within 60 s"
        );
    }
    tracing::info!(
        backend = b.name(),
        took_ms = t.elapsed().as_secs_f64() * 1e3,
        "scale: destroyed the registry of (a)"
    );
    drop(tasks);
    observer.close().await;
    writer.close().await;
    result
}

async fn many_on(
    ctx: &mut Ctx,
    reg: &Arc<dyn Registry>,
    writer: &Raw,
    raw_track: &Arc<Track>,
    group: &str,
    service: &str,
) -> anyhow::Result<()> {
    let b = ctx.backend.name();
    let s = &ctx.sizes;
    let (subs, n, changes) = (s.scale_subs, s.scale_providers, s.scale_changes);
    let setup_budget = Duration::from_secs(s.scale_setup_secs);
    let heap_budget = i64::try_from(s.scale_heap_mib)
        .unwrap_or(i64::MAX)
        .saturating_mul(1 << 20);

    // Set-up: subscribe one at a time, each returning with the full list delivered.
    tokio::time::sleep(SETTLE).await;
    let heap0 = live_bytes();
    let setup_start = Instant::now();
    let mut sub_lat = Lat::new();
    let mut tracks: Vec<Arc<Track>> = Vec::with_capacity(subs);
    let mut listeners = Vec::with_capacity(subs);
    let mut stopped = None;
    for i in 0..subs {
        let held = live_bytes() - heap0;
        if held > heap_budget {
            let projected =
                held / i64::try_from(i.max(1)).unwrap_or(1) * i64::try_from(subs).unwrap_or(0);
            stopped = Some(format!(
                "set-up stopped at {i} of {subs} subscriptions: they held {} MiB of heap (budget {} MiB; {subs} would hold ~{} MiB)",
                held >> 20,
                heap_budget >> 20,
                projected >> 20
            ));
            break;
        }
        if setup_start.elapsed() > setup_budget {
            stopped = Some(format!(
                "set-up stopped at {i} of {subs} subscriptions: it had taken {:.0} s (budget {} s)",
                setup_start.elapsed().as_secs_f64(),
                setup_budget.as_secs()
            ));
            break;
        }
        let track = Track::new();
        let l = counting(&track);
        let u = scale_consumer(service, i);
        let t0 = Instant::now();
        tokio::time::timeout(DEADLINE, reg.subscribe(&u, l.clone()))
            .await
            .map_err(|_| anyhow!("subscription {i} did not return within {DEADLINE:?}"))?
            .with_context(|| format!("subscription {i}"))?;
        let returned = Instant::now();
        let delivered = track
            .wait(0, |c| c == n, DEADLINE)
            .await
            .with_context(|| format!("subscription {i} never held the {n} providers"))?;
        sub_lat.record(returned.max(delivered) - t0);
        tracks.push(track);
        listeners.push((u, l));
    }
    let k = tracks.len();
    let setup = setup_start.elapsed();
    tokio::time::sleep(SETTLE).await;
    let heap_subs = live_bytes() - heap0;
    if let Some(why) = &stopped {
        tracing::warn!(backend = b, "scale: {why}");
    }
    tracing::info!(
        backend = b,
        subscriptions = k,
        setup_s = setup.as_secs_f64(),
        heap_mib = heap_subs >> 20,
        "scale: subscriptions set up"
    );

    // Changes: provider `n` added, then removed, alternately.
    let extra = provider(service, u32::try_from(n).unwrap_or(u32::MAX));
    let (key, value) = (entry_path(group, &extra), extra.to_full_string());
    let (mut each, mut last_l, mut raw_l) = (Lat::new(), Lat::new(), Lat::new());
    let (mut cpu, mut alloc) = (Vec::new(), Vec::new());
    for c in 0..WARM + changes {
        let add = c % 2 == 0;
        let (want, raw_want) = if add { (n + 1, 1) } else { (n, 0) };
        let since: Vec<usize> = tracks.iter().map(|t| t.len()).collect();
        let since_raw = raw_track.len();
        let (alloc0, cpu0) = (allocated_bytes(), cpu_ns());
        let t0 = Instant::now();
        if add {
            writer.create(&key, &value).await?;
        } else {
            writer.delete(&key).await?;
        }
        let mut times = Vec::with_capacity(k);
        for (i, (t, since)) in tracks.iter().zip(&since).enumerate() {
            let at = t
                .wait(*since, |x| x == want, DEADLINE)
                .await
                .with_context(|| {
                    format!(
                        "change {c} (provider {}) did not reach listener {i} of {k}",
                        if add { "added" } else { "removed" }
                    )
                })?;
            times.push(at);
        }
        let raw_at = raw_track
            .wait(since_raw, |x| x == raw_want, DEADLINE)
            .await
            .with_context(|| format!("change {c} did not reach the raw watch"))?;
        tokio::time::sleep(SETTLE).await;
        let cpu_ms = cpu_ns().saturating_sub(cpu0) as f64 / 1e6;
        let allocated = (allocated_bytes() - alloc0) as f64;
        if c >= WARM {
            for at in &times {
                each.record(*at - t0);
            }
            last_l.record(times.iter().max().map_or(Duration::ZERO, |at| *at - t0));
            raw_l.record(raw_at - t0);
            cpu.push(cpu_ms);
            alloc.push(allocated);
        }
    }

    let size = k as u64;
    let stop_note = stopped
        .as_deref()
        .map(|s| format!("; {s}"))
        .unwrap_or_default();
    let method = format!(
        "{changes} changes (one provider added, then removed) after {WARM} warm-up; {k} subscriptions in one registry of one {n}-provider service"
    );
    ctx.push(
        Measurement::new(
            b,
            "scale",
            format!("change → each of the {k} listeners"),
            Unit::Ms,
            size,
            method.clone(),
            each.summary(Unit::Ms),
            Some(raw_l.summary(Unit::Ms)),
        )
        .note(format!(
            "one sample per listener and change ({k} × {changes}): from the write's start to that listener called with the changed list; raw = the same write's event on one raw watch of the path{stop_note}"
        )),
    );
    ctx.push(Measurement::new(
        b,
        "scale",
        format!("change → the last of the {k} listeners"),
        Unit::Ms,
        size,
        method.clone(),
        last_l.summary(Unit::Ms),
        Some(raw_l.summary(Unit::Ms)),
    ));
    ctx.push(
        Measurement::new(
            b,
            "scale",
            "process CPU per change",
            Unit::Ms,
            size,
            method.clone(),
            Summary::of_signed(&cpu),
            None,
        )
        .note("all threads, from the write to 200 ms after the last listener was called: the registry's work for one change plus the raw writer's and watcher's (small) and the bench's recording of each listener call"),
    );
    ctx.push(
        Measurement::new(
            b,
            "scale",
            "heap allocated per change",
            Unit::Bytes,
            size,
            method,
            Summary::of_signed(&alloc),
            None,
        )
        .note("bytes asked of the allocator (freed or not) over the same window as the CPU row; includes the bench's record of each listener call (~50 B)"),
    );
    let setup_method = format!(
        "one at a time, each until its listener holds the {n} providers; set-up {:.1} s in all",
        setup.as_secs_f64()
    );
    ctx.push(Measurement::new(
        b,
        "scale",
        format!("subscribe, the k-th of {k} on a {n} list"),
        Unit::Ms,
        size,
        setup_method.clone(),
        sub_lat.summary(Unit::Ms),
        None,
    ));
    ctx.push(
        Measurement::new(
            b,
            "scale",
            "heap per subscription",
            Unit::Bytes,
            size,
            setup_method.clone(),
            Summary::single(heap_subs as f64 / k.max(1) as f64),
            None,
        )
        .note(format!(
            "live heap held by the {k} subscriptions and the list they share the service of (the registry itself excluded) / {k}: {} MiB in all",
            heap_subs >> 20
        )),
    );
    let m = Measurement::new(
        b,
        "scale",
        "subscriptions set up",
        Unit::Count,
        subs as u64,
        setup_method,
        Summary::single(k as f64),
        None,
    )
    .target(
        &format!(
            "{subs} (within {} s and {} MiB)",
            setup_budget.as_secs(),
            heap_budget >> 20
        ),
        stopped.is_none(),
    );
    ctx.push(match stopped {
        Some(why) => m.note(why),
        None => m,
    });
    drop(listeners);
    Ok(())
}

/// (b): one subscription of a service with `scale_big` providers, in a fresh registry, ABAB
/// with the raw read of the list; subscribe time and heap per provider.
async fn big(ctx: &mut Ctx) -> anyhow::Result<()> {
    let b = ctx.backend;
    let group = ctx.group("scale-big");
    let service = "org.bench.BigService";
    let n = ctx.sizes.scale_big;
    let cat = category_path(&group, service);
    let writer = Raw::connect(b, &ctx.addr).await?;
    writer.ensure_dir(&cat).await?;
    let result = match write_providers(b, &writer, &group, service, n).await {
        Ok(()) => big_on(ctx, &group, service, &cat).await,
        Err(e) => Err(e),
    };
    writer.close().await;
    result
}

async fn big_on(ctx: &mut Ctx, group: &str, service: &str, cat: &str) -> anyhow::Result<()> {
    let b = ctx.backend;
    let n = ctx.sizes.scale_big;
    let iters = ctx.sizes.scale_big_iters;
    let reader = Raw::connect(b, &ctx.addr).await?;
    let (mut lo, mut lr) = (Lat::new(), Lat::new());
    let mut mem = Vec::new();
    let (mut failure, mut raw_failure) = (None, None);
    for _ in 0..iters {
        let reg = ctx.ours(group).await?;
        tokio::time::sleep(SETTLE).await;
        let before = live_bytes();
        let track = Track::new();
        let l = counting(&track);
        let u = consumer(service);
        let t0 = Instant::now();
        let outcome = match tokio::time::timeout(BIG_DEADLINE, reg.subscribe(&u, l.clone())).await {
            Err(_) => Err(format!("subscribe did not return within {BIG_DEADLINE:?}")),
            Ok(Err(e)) => Err(format!("subscribe failed: {e}")),
            Ok(Ok(())) => {
                let returned = Instant::now();
                match track.wait(0, |c| c == n, BIG_DEADLINE).await {
                    Ok(at) => Ok(returned.max(at) - t0),
                    Err(_) => Err(format!(
                        "subscribe returned, but within {BIG_DEADLINE:?} the listener got {} of the {n} providers",
                        track
                            .last()
                            .map_or_else(|| "no list".to_owned(), |c| format!("a list of {c}"))
                    )),
                }
            }
        };
        match outcome {
            Ok(d) => {
                tokio::time::sleep(SETTLE).await;
                lo.record(d);
                mem.push((live_bytes() - before) as f64 / n as f64);
            }
            Err(why) => {
                // What the backend answers when asked for the list directly.
                let direct = match tokio::time::timeout(BIG_DEADLINE, reg.lookup(&u)).await {
                    Err(_) => format!("lookup did not return within {BIG_DEADLINE:?}"),
                    Ok(Err(e)) => format!("lookup failed: {e}"),
                    Ok(Ok(list)) => format!("lookup returned {} URLs", list.len()),
                };
                let server = server_state(b, &ctx.addr).await;
                failure = Some(format!("{why}; {direct}; {server}"));
            }
        }
        let _ = tokio::time::timeout(DEADLINE, reg.unsubscribe(&u, &l)).await;
        let _ = tokio::time::timeout(DEADLINE, reg.destroy()).await;
        if failure.is_some() {
            break;
        }
        let t0 = Instant::now();
        match tokio::time::timeout(BIG_DEADLINE, reader.read(cat)).await {
            Ok(Ok(got)) if got == n => lr.record(t0.elapsed()),
            Ok(Ok(got)) => raw_failure = Some(format!("the raw read gave {got} of {n}")),
            Ok(Err(e)) => raw_failure = Some(format!("the raw read failed: {e:#}")),
            Err(_) => {
                raw_failure = Some(format!("the raw read took over {BIG_DEADLINE:?}"));
            }
        }
    }
    reader.close().await;
    let bn = b.name();
    let method = format!("ABAB, {iters} each, a fresh registry each time");
    if let Some(why) = failure {
        ctx.push(Measurement::failed(
            bn,
            "scale",
            format!("subscribe to one {n}-provider service"),
            n as u64,
            method,
            why,
        ));
        return Ok(());
    }
    let raw = if raw_failure.is_none() {
        Some(lr.summary(Unit::Ms))
    } else {
        None
    };
    let note = match b {
        Backend::Zookeeper => "raw = one get_children of the category node",
        Backend::Etcd => {
            "raw = one keys-only range read of the prefix (with a 64 MiB decoding limit)"
        }
    };
    ctx.push(
        Measurement::new(
            bn,
            "scale",
            "one subscribe → every URL delivered",
            Unit::Ms,
            n as u64,
            method.clone(),
            lo.summary(Unit::Ms),
            raw,
        )
        .note(match &raw_failure {
            Some(f) => format!("{note}; {f}"),
            None => note.to_owned(),
        }),
    );
    ctx.push(
        Measurement::new(
            bn,
            "scale",
            "heap per cached provider",
            Unit::Bytes,
            n as u64,
            format!("live heap after − before subscribe, / {n}; {iters} runs"),
            Summary::of_signed(&mem),
            None,
        )
        .note("counted by the instrumented global allocator"),
    );
    Ok(())
}
