//! The cluster handles do what they say, measured on the servers themselves: one etcd
//! cluster and one ZooKeeper ensemble shared by the tests of this binary.
//!
//! - the leader is found, and after kill -9 another member leads; the killed member comes
//!   back with its data;
//! - a paused (SIGSTOP) member answers nothing, the others keep a leader, it rejoins on
//!   SIGCONT;
//! - an isolated member loses its leader (its peers' traffic stops, silently) while its client
//!   port still answers, a write through it does not commit, and it catches up when healed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use registry_test_servers::{Cluster, Kind, MemberState};

const WITHIN: Duration = Duration::from_secs(30);

/// An HTTP/1.0 POST of JSON to an etcd member's gRPC gateway; the body of the answer.
fn etcd_post(address: &str, path: &str, body: &str, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect(address).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_owned())
}

/// Puts `key=value` through member `address`; false when it did not commit within `timeout`.
fn etcd_put(address: &str, key: &str, value: &str, timeout: Duration) -> bool {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        B64.encode(key),
        B64.encode(value)
    );
    etcd_post(address, "/v3/kv/put", &body, timeout).is_some_and(|b| b.contains("header"))
}

/// `key`'s value as member `address` has it locally (a serializable read).
fn etcd_get_local(address: &str, key: &str) -> Option<String> {
    let body = format!(r#"{{"key":"{}","serializable":true}}"#, B64.encode(key));
    let answer = etcd_post(address, "/v3/kv/range", &body, Duration::from_secs(2))?;
    let v: serde_json::Value = serde_json::from_str(&answer).ok()?;
    let value = v["kvs"][0]["value"].as_str()?;
    String::from_utf8(B64.decode(value).ok()?).ok()
}

/// A ZooKeeper four-letter word's answer from `address`.
fn zk_four(address: &str, word: &str) -> Option<String> {
    let mut s = TcpStream::connect(address).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(word.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The leader's `zk_synced_followers` (how many followers it has in sync).
fn zk_synced_followers(address: &str) -> Option<u32> {
    zk_four(address, "mntr")?
        .lines()
        .find_map(|l| l.strip_prefix("zk_synced_followers"))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

fn kill_leader_and_restart(kind: Kind, test: &str) {
    let Some(mut c) = Cluster::shared(kind, test) else {
        return;
    };
    let leader = c.wait_leader(WITHIN).unwrap();
    let states = c.states();
    assert_eq!(
        states.iter().filter(|s| **s == MemberState::Leader).count(),
        1,
        "{states:?}"
    );
    assert_eq!(
        states
            .iter()
            .filter(|s| **s == MemberState::Follower)
            .count(),
        c.size() - 1,
        "{states:?}"
    );
    if kind == Kind::Etcd {
        assert!(etcd_put(&c.address(leader), "before-kill", "1", WITHIN));
    }
    let t = Instant::now();
    c.kill(leader);
    assert_eq!(c.state(leader), MemberState::Down);
    let next = c.wait_leader(WITHIN).unwrap();
    let elected = t.elapsed();
    assert_ne!(next, leader);
    let t = Instant::now();
    c.restart(leader).unwrap();
    let started = t.elapsed();
    c.wait_healthy(WITHIN).unwrap();
    let rejoined = t.elapsed();
    assert!(matches!(
        c.state(leader),
        MemberState::Follower | MemberState::Leader
    ));
    if kind == Kind::Etcd {
        // Its data survived: it has the key from before the kill, and what was written since.
        assert!(etcd_put(&c.address(next), "after-kill", "2", WITHIN));
        let addr = c.address(leader);
        wait_for("the restarted member catches up", WITHIN, || {
            etcd_get_local(&addr, "before-kill").as_deref() == Some("1")
                && etcd_get_local(&addr, "after-kill").as_deref() == Some("2")
        });
    }
    eprintln!(
        "{kind:?}: kill -9 of leader {leader}: member {next} leads after {elected:.1?}; \
         restarted in {started:.1?}, rejoined after {rejoined:.1?}"
    );
}

fn pause_and_resume(kind: Kind, test: &str) {
    let Some(mut c) = Cluster::shared(kind, test) else {
        return;
    };
    let leader = c.wait_leader(WITHIN).unwrap();
    // A follower, then the leader.
    let follower = (0..c.size()).find(|&i| i != leader).unwrap();
    for member in [follower, leader] {
        let t = Instant::now();
        c.pause(member).unwrap();
        assert!(c.is_paused(member));
        // SIGSTOP reaches every thread of the member a moment later, not at once.
        c.wait_state(member, MemberState::Unresponsive, WITHIN)
            .unwrap();
        let now = c.wait_leader(WITHIN).unwrap();
        let led = t.elapsed();
        assert_ne!(now, member);
        // Frozen well past an election and a session of a few seconds.
        wait_for("the pause lasts", Duration::from_secs(10), || {
            t.elapsed() > Duration::from_secs(3)
        });
        assert_eq!(c.state(member), MemberState::Unresponsive);
        c.resume(member).unwrap();
        let t = Instant::now();
        c.wait_healthy(WITHIN).unwrap();
        let rejoined = t.elapsed();
        assert!(matches!(
            c.state(member),
            MemberState::Follower | MemberState::Leader
        ));
        eprintln!(
            "{kind:?}: SIGSTOP of member {member} (leader {leader}): a leader ({now}) after \
             {led:.1?}; after SIGCONT healthy in {rejoined:.1?}"
        );
    }
}

fn isolate_and_heal(kind: Kind, test: &str) {
    let Some(mut c) = Cluster::shared(kind, test) else {
        return;
    };
    let leader = c.wait_leader(WITHIN).unwrap();
    let follower = (0..c.size()).find(|&i| i != leader).unwrap();
    for member in [follower, leader] {
        let t = Instant::now();
        c.isolate(member);
        // It notices that its peers went silent: no leader for it. Its client port answers
        // all along (the state is read through it).
        c.wait_state(member, MemberState::NoLeader, WITHIN).unwrap();
        let lost = t.elapsed();
        let now = c.wait_leader(WITHIN).unwrap();
        let led = t.elapsed();
        assert_ne!(now, member);
        match kind {
            Kind::Etcd => {
                let key = format!("isolated-{member}");
                assert!(
                    !etcd_put(&c.address(member), &key, "lost", Duration::from_secs(3)),
                    "a write through isolated member {member} committed"
                );
                assert!(etcd_put(&c.address(now), &key, "kept", WITHIN));
                assert_eq!(etcd_get_local(&c.address(member), &key), None);
                c.heal(member);
                let addr = c.address(member);
                wait_for("the healed member catches up", WITHIN, || {
                    etcd_get_local(&addr, &key).as_deref() == Some("kept")
                });
            }
            Kind::Zookeeper => {
                // The leader counts one follower less.
                let addr = c.address(now);
                let want = c.size() as u32 - 2;
                wait_for("the leader drops the isolated member", WITHIN, || {
                    zk_synced_followers(&addr) == Some(want)
                });
                c.heal(member);
                let addr = c.address(now);
                let want = c.size() as u32 - 1;
                wait_for("the healed member follows again", WITHIN, || {
                    zk_synced_followers(&addr) == Some(want)
                });
            }
        }
        let t2 = Instant::now();
        c.wait_healthy(WITHIN).unwrap();
        eprintln!(
            "{kind:?}: isolation of member {member} (leader {leader}): it lost its leader after \
             {lost:.1?}, a leader ({now}) after {led:.1?}; healed and healthy in {:.1?}",
            t2.elapsed()
        );
    }
}

#[test]
fn etcd_kill_leader_and_restart() {
    kill_leader_and_restart(Kind::Etcd, "etcd_kill_leader_and_restart");
}

#[test]
fn etcd_pause_and_resume() {
    pause_and_resume(Kind::Etcd, "etcd_pause_and_resume");
}

#[test]
fn etcd_isolate_and_heal() {
    isolate_and_heal(Kind::Etcd, "etcd_isolate_and_heal");
}

#[test]
fn zookeeper_kill_leader_and_restart() {
    kill_leader_and_restart(Kind::Zookeeper, "zookeeper_kill_leader_and_restart");
}

#[test]
fn zookeeper_pause_and_resume() {
    pause_and_resume(Kind::Zookeeper, "zookeeper_pause_and_resume");
}

#[test]
fn zookeeper_isolate_and_heal() {
    isolate_and_heal(Kind::Zookeeper, "zookeeper_isolate_and_heal");
}
