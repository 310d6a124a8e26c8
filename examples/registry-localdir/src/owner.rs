//! Who owns a dynamic entry, and whether that owner is still alive.
//!
//! A dynamic entry records the process that wrote it. On Linux an entry whose process is gone
//! is treated as gone: `/proc/<pid>` no longer exists, or exists with another start time (the
//! pid was reused), or the machine was rebooted since (another boot id). When the entry was
//! written from another host (another host name) or another pid namespace (another
//! container), this process cannot see the owner and treats it as alive. On other platforms
//! every owner is treated as alive.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The content of an entry file (JSON). Every field is optional: an empty file, or one that is
/// not JSON, is a persistent entry whose URL is its (decoded) file name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EntryFile {
    /// The full URL; required when the file name is a hashed (`~...`) name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The owner process; absent for persistent (`dynamic=false`) entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The registry instance that wrote the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The owner process's start time (clock ticks since boot, `/proc/<pid>/stat` field 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<u64>,
    /// The boot id of the machine when the entry was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
    /// The owner's pid namespace (`readlink /proc/self/ns/pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pidns: Option<String>,
    /// The host name of the writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl EntryFile {
    /// Parses an entry file; anything that is not an entry object is a persistent entry
    /// without a URL of its own.
    pub fn parse(bytes: &[u8]) -> EntryFile {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return EntryFile::default();
        }
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    /// The bytes written to disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a struct of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Whether this entry is owned by the registry instance `owner`.
    pub fn is_owned_by(&self, owner: &str) -> bool {
        self.owner.as_deref() == Some(owner)
    }
}

/// What this process records in the entries it owns.
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    pub pid: u32,
    pub start: Option<u64>,
    pub boot: Option<String>,
    pub pidns: Option<String>,
    pub host: Option<String>,
}

/// This process's identity, read once.
pub(crate) static ME: LazyLock<Identity> = LazyLock::new(Identity::read);

impl Identity {
    fn read() -> Identity {
        let pid = std::process::id();
        #[cfg(target_os = "linux")]
        {
            let text = |p: &str| {
                std::fs::read_to_string(p)
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
            };
            Identity {
                pid,
                start: process_start(pid).ok().flatten(),
                boot: text("/proc/sys/kernel/random/boot_id"),
                pidns: std::fs::read_link("/proc/self/ns/pid")
                    .ok()
                    .map(|p| p.to_string_lossy().into_owned()),
                host: text("/proc/sys/kernel/hostname"),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            Identity {
                pid,
                ..Identity::default()
            }
        }
    }

    /// The file content of a dynamic entry for `url` owned by the instance `owner`.
    pub fn entry(&self, url: String, owner: &str) -> EntryFile {
        EntryFile {
            url: Some(url),
            pid: Some(self.pid),
            owner: Some(owner.to_owned()),
            start: self.start,
            boot: self.boot.clone(),
            pidns: self.pidns.clone(),
            host: self.host.clone(),
        }
    }
}

/// A registry instance id unique on this host: `<pid>.<start time>.<counter>`.
pub(crate) fn new_instance_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{}.{:x}.{}",
        ME.pid,
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether the owner of `entry` may still be alive, as seen from `me`. Persistent entries
/// (no pid) are always alive.
pub(crate) fn is_alive(entry: &EntryFile, me: &Identity) -> bool {
    let Some(pid) = entry.pid else {
        return true;
    };
    if !cfg!(target_os = "linux") || me.start.is_none() {
        // No /proc to look at: cannot tell.
        return true;
    }
    let differs =
        |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(a), Some(b)) if a != b);
    if differs(&entry.host, &me.host) {
        return true; // another host (or UTS namespace): cannot tell
    }
    if differs(&entry.boot, &me.boot) {
        return false; // written before the last reboot
    }
    if differs(&entry.pidns, &me.pidns) {
        return true; // another pid namespace: its pids are not ours to check
    }
    match process_start(pid) {
        Ok(None) => false,
        Ok(Some(start)) => entry.start.is_none_or(|s| s == start),
        // /proc/<pid> exists but its stat is unreadable: alive.
        Err(()) => true,
    }
}

/// The start time of process `pid`: `Ok(None)` when there is no such process, `Err` when it
/// exists but its start time cannot be read.
#[cfg(target_os = "linux")]
fn process_start(pid: u32) -> Result<Option<u64>, ()> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => Ok(Some(parse_start(&stat).ok_or(())?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(_) => {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                Err(())
            } else {
                Ok(None)
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn process_start(_pid: u32) -> Result<Option<u64>, ()> {
    Err(())
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`. The second field (the command name, in
/// parentheses) may hold spaces and parentheses, so count from the last `)`.
fn parse_start(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the `)` come fields 3, 4, ...: field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_after_the_command_name() {
        let stat =
            "4242 (a b) c)) S 1 4242 4242 0 -1 4194304 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start(stat), Some(98765));
        assert_eq!(parse_start("garbage"), None);
    }

    #[test]
    fn entry_files_round_trip_and_tolerate_anything() {
        let e = ME.entry("dubbo://h:1/s".into(), "me");
        assert_eq!(EntryFile::parse(&e.to_bytes()), e);
        assert_eq!(EntryFile::parse(b""), EntryFile::default());
        assert_eq!(EntryFile::parse(b"not json"), EntryFile::default());
        assert!(is_alive(&EntryFile::default(), &ME));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        let me = ME.entry("dubbo://h:1/s".into(), "me");
        assert!(is_alive(&me, &ME));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        let dead = EntryFile {
            pid: Some(pid),
            ..me.clone()
        };
        let dead = EntryFile {
            start: None,
            ..dead
        };
        assert!(!is_alive(&dead, &ME));
        let reused = EntryFile {
            start: me.start.map(|s| s + 1),
            ..me.clone()
        };
        assert!(
            !is_alive(&reused, &ME),
            "same pid, other start time: pid reused"
        );
        if ME.boot.is_some() {
            let rebooted = EntryFile {
                boot: Some("another-boot".into()),
                ..me.clone()
            };
            assert!(!is_alive(&rebooted, &ME));
        }
        if ME.host.is_some() {
            let elsewhere = EntryFile {
                host: Some("another-host".into()),
                pid: Some(pid),
                start: None,
                ..me.clone()
            };
            assert!(
                is_alive(&elsewhere, &ME),
                "another host: cannot tell, alive"
            );
        }
        if ME.pidns.is_some() {
            let container = EntryFile {
                pidns: Some("pid:[1]".into()),
                pid: Some(pid),
                start: None,
                ..me
            };
            assert!(
                is_alive(&container, &ME),
                "another pid namespace: cannot tell, alive"
            );
        }
    }
}
