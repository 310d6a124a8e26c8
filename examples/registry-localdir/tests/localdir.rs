//! What the conformance suite does not cover: the directory layout, the dead-process rule,
//! two registries (as two processes would) sharing one directory, undecodable names, and
//! clear errors for bad registry URLs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use registry_core::testkit::{Recorder, consumer, provider, unique_service};
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{Error, Registry, RegistryManager, Url, encode};

const DEADLINE: Duration = Duration::from_secs(10);

async fn open(dir: &Path, extra: &str) -> registry_core::Result<Arc<dyn Registry>> {
    // Naming the crate links the scheme.
    assert_eq!(registry_localdir::SCHEME, "localdir");
    RegistryManager::new()
        .get_registry(format!("localdir://{}?file=false{extra}", dir.display()))
        .await
}

fn category_dir(dir: &Path, service: &str) -> PathBuf {
    dir.join("dubbo")
        .join(encode(service))
        .join(PROVIDERS_CATEGORY)
}

/// The pid of a process that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn `true`");
    let pid = child.id();
    child.wait().expect("wait for `true`");
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_follow_the_dubbo_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = open(dir.path(), "").await.expect("registry");
    let s = "com.example.Greeter";
    let short: Url = format!("tri://127.0.0.1:50051/{s}?side=provider")
        .parse()
        .expect("url");
    r.register(&short).await.expect("register");
    let file = category_dir(dir.path(), s).join(encode(&short.to_full_string()));
    let content = std::fs::read_to_string(&file).expect("the entry file at the Dubbo path");
    let json: serde_json::Value = serde_json::from_str(&content).expect("JSON");
    assert_eq!(json["pid"], std::process::id());
    assert!(json["owner"].is_string(), "{content}");

    // A long Dubbo URL does not fit in a file name: hashed name, full URL inside.
    let long = provider(s, 1, "");
    r.register(&long).await.expect("register a long URL");
    let names: Vec<String> = std::fs::read_dir(category_dir(dir.path(), s))
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with('~') && n.len() < 255),
        "{names:?}"
    );
    let mut seen = r.lookup(&consumer(s, "")).await.expect("lookup");
    seen.sort_by_cached_key(Url::to_full_string);
    let mut want = vec![short.clone(), long.clone()];
    want.sort_by_cached_key(Url::to_full_string);
    assert_eq!(seen, want);

    // Persistent entries have no owner and survive destroy.
    let persistent = provider(s, 2, "dynamic=false");
    r.register(&persistent).await.expect("register");
    r.destroy().await;
    assert!(!file.exists(), "destroy removed the dynamic entry");
    let after = open(dir.path(), "").await.expect("registry");
    assert_eq!(
        after.lookup(&consumer(s, "")).await.expect("lookup"),
        vec![persistent]
    );
    after.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_of_a_dead_process_is_not_delivered_and_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = unique_service("dead");
    let ghost = provider(&s, 1, "");
    let kept = provider(&s, 2, "dynamic=false");
    let cat = category_dir(dir.path(), &s);
    std::fs::create_dir_all(&cat).expect("mkdir");
    // What a process that was killed (no destroy, no unregister) leaves behind.
    let ghost_file = cat.join("~0000000000000001~ghost");
    std::fs::write(
        &ghost_file,
        serde_json::json!({"url": ghost.to_full_string(), "pid": dead_pid(), "owner": "ghost"})
            .to_string(),
    )
    .expect("write the ghost entry");
    // An empty file named by the encoded URL is a persistent entry written by hand.
    let short_kept = "tri://10.0.0.2:50051/x?side=provider";
    let hand_made: Url = short_kept.parse().expect("url");
    let hand_made = hand_made.with_path(s.as_str());
    std::fs::write(cat.join(encode(&hand_made.to_full_string())), b"").expect("write");

    let r = open(dir.path(), "").await.expect("registry");
    r.register(&kept).await.expect("register");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    let first = rec
        .latest_entries(&s, PROVIDERS_CATEGORY)
        .expect("a first notification");
    assert!(
        !first.contains(&ghost),
        "an entry of a dead process was delivered: {first:?}"
    );
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(first.contains(&kept) && first.contains(&hand_made));
    assert!(!ghost_file.exists(), "the dead process's entry was removed");
    assert!(
        !r.lookup(&consumer(&s, ""))
            .await
            .expect("lookup")
            .contains(&ghost)
    );
    r.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_dying_later_removes_its_entries_for_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = unique_service("dies");
    let r = open(dir.path(), "").await.expect("registry");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    // A live process owns the entry, then exits without cleaning up.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let p = provider(&s, 7, "");
    let cat = category_dir(dir.path(), &s);
    std::fs::create_dir_all(&cat).expect("mkdir");
    let tmp = cat.join(".localdir-tmp-test");
    std::fs::write(
        &tmp,
        serde_json::json!({"url": p.to_full_string(), "pid": child.id(), "owner": "child"})
            .to_string(),
    )
    .expect("write");
    std::fs::rename(&tmp, cat.join("~0000000000000000~child")).expect("rename");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p), DEADLINE)
        .await;
    child.kill().expect("kill");
    child.wait().expect("wait");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &[], DEADLINE)
        .await;
    r.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registries_see_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = unique_service("two");
    let a = open(dir.path(), "").await.expect("registry a");
    let b = open(dir.path(), "").await.expect("registry b");
    let (pa, pb) = (provider(&s, 1, ""), provider(&s, 2, ""));
    let (ra, rb) = (Recorder::new(), Recorder::new());
    a.subscribe(&consumer(&s, ""), ra.listener())
        .await
        .expect("subscribe a");
    b.subscribe(&consumer(&s, ""), rb.listener())
        .await
        .expect("subscribe b");
    a.register(&pa).await.expect("register a");
    b.register(&pb).await.expect("register b");
    let both = [pa.clone(), pb.clone()];
    ra.wait_for_entries(&s, PROVIDERS_CATEGORY, &both, DEADLINE)
        .await;
    rb.wait_for_entries(&s, PROVIDERS_CATEGORY, &both, DEADLINE)
        .await;
    // One destroys (as a process that shuts down cleanly): the other sees its entry go.
    a.destroy().await;
    rb.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&pb), DEADLINE)
        .await;
    b.destroy().await;
    assert!(
        std::fs::read_dir(category_dir(dir.path(), &s))
            .expect("read_dir")
            .next()
            .is_none(),
        "both destroyed: no entry left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_names_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = unique_service("junk");
    let cat = category_dir(dir.path(), &s);
    std::fs::create_dir_all(&cat).expect("mkdir");
    std::fs::write(cat.join("%ZZ-not-encoded"), b"").expect("write");
    std::fs::write(cat.join("no-protocol-here"), b"").expect("write");
    std::fs::write(cat.join("~hashed-without-url"), b"{}").expect("write");
    std::fs::create_dir_all(dir.path().join("dubbo").join("%G0")).expect("mkdir");
    let r = open(dir.path(), "").await.expect("registry");
    let p = provider(&s, 1, "");
    r.register(&p).await.expect("register");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    assert_eq!(
        rec.latest_entries(&s, PROVIDERS_CATEGORY),
        Some(vec![p.clone()])
    );
    let wild: Url = "consumer://10.0.0.250/*?interface=*&group=*&version=*&classifier=*"
        .parse()
        .expect("url");
    let all = Recorder::new();
    r.subscribe(&wild, all.listener())
        .await
        .expect("subscribe *");
    assert_eq!(all.latest_entries(&s, PROVIDERS_CATEGORY), Some(vec![p]));
    r.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = RegistryManager::new();
    let err = |r: registry_core::Result<Arc<dyn Registry>>| match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    // Naming the crate links the scheme.
    let _ = registry_localdir::LocalDirFactory;

    let e = err(m.get_registry("localdir://relative/path").await);
    assert!(
        matches!(e, Error::InvalidRegistryUrl { .. }) && e.to_string().contains("three slashes"),
        "{e}"
    );
    let e = err(m.get_registry("localdir://").await);
    assert!(
        matches!(e, Error::InvalidRegistryUrl { .. }) && e.to_string().contains("no directory"),
        "{e}"
    );
    let base = format!("localdir://{}", dir.path().display());
    let e = err(RegistryManager::new()
        .get_registry(format!("{base}?poll=soon"))
        .await);
    assert!(
        matches!(&e, Error::InvalidParameter { key, .. } if key == "poll"),
        "{e}"
    );
    let e = err(RegistryManager::new()
        .get_registry(format!("{base}?poll=0"))
        .await);
    assert!(
        matches!(&e, Error::InvalidParameter { key, .. } if key == "poll"),
        "{e}"
    );
    let e = err(RegistryManager::new()
        .get_registry(format!("{base}?group=../x"))
        .await);
    assert!(
        matches!(&e, Error::InvalidParameter { key, .. } if key == "group"),
        "{e}"
    );

    // check: the directory must be creatable; a path under a regular file is not.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").expect("write");
    let blocked = format!("localdir://{}/sub?file=false", file.display());
    let e = err(RegistryManager::new().get_registry(&blocked).await);
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("cannot use the directory"),
        "{e}"
    );
    // check=false: the registry is returned and operations are retried in the background.
    let r = RegistryManager::new()
        .get_registry(format!("{blocked}&check=false"))
        .await
        .expect("check=false gives a registry");
    let p = provider(&unique_service("blocked"), 1, "");
    r.register(&p)
        .await
        .expect("check=false on the registry: the write is retried in the background");
    assert!(
        r.lookup(&consumer(p.service_interface(), ""))
            .await
            .is_err()
    );
    r.destroy().await;

    // A URL that cannot name a directory entry.
    let ok = RegistryManager::new()
        .get_registry(format!("{base}?file=false"))
        .await
        .expect("registry");
    let bad: Url = "tri://10.0.0.1:1/..?category=providers"
        .parse()
        .expect("url");
    assert!(ok.register(&bad).await.is_err(), "`..` is not a service");
    let bad = provider("com.x.Y", 1, "category=../../etc");
    assert!(
        matches!(ok.register(&bad).await, Err(Error::InvalidParameter { .. })),
        "a category cannot leave the directory"
    );
    assert!(
        !dir.path().join("etc").exists(),
        "nothing was written outside"
    );
    ok.destroy().await;
}

// A subscription made right after a register through the same instance sees the entry, even
// when another subscription already holds that list and no poll ran in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscription_sees_this_instances_own_register_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = registry_localdir::LocalDirRegistry::open(
        format!("localdir://{}?file=false&poll=600000", dir.path().display())
            .parse()
            .expect("url"),
    )
    .await
    .expect("registry");
    let s = unique_service("own-write");
    let first = Recorder::new();
    r.subscribe(&consumer(&s, ""), first.listener())
        .await
        .expect("first subscribe");
    let p = provider(&s, 1, "");
    r.register(&p).await.expect("register");
    let second = Recorder::new();
    r.subscribe(&consumer(&s, ""), second.listener())
        .await
        .expect("second subscribe");
    // Subscribe returns once the first lists were delivered.
    let list = second
        .latest_entries(&s, PROVIDERS_CATEGORY)
        .expect("the second subscription's first list");
    assert_eq!(list, vec![p]);
    r.destroy().await;
}
