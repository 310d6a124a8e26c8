//! The disk cache loader (`registry_failback::read_cache_file`) on any file content (a file
//! cut short by a crash, written by another version, edited by hand).
//!
//! Asserts: no panic; a file that is read has the current format, survives being written and
//! read again unchanged, and every URL in it either parses (and round-trips, CONTRACT §1) or is
//! an `InvalidUrl` error, as the loader skips it.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use registry_core::Url;
use registry_failback::{CACHE_FORMAT, read_cache_file};
use registry_fuzz::{check_parse_error, check_round_trip};

/// One file per fuzzing process, in memory when /dev/shm exists.
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from("/dev/shm");
        let dir = if dir.is_dir() {
            dir
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("registry-fuzz-cache-{}.json", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    std::fs::write(path, data).expect("write the fuzz input to a file");
    let file = match read_cache_file(path) {
        Ok(Some(f)) => f,
        Ok(None) => panic!("an existing file read as missing"),
        Err(e) => {
            assert!(!e.is_empty());
            return;
        }
    };
    assert_eq!(file.format, CACHE_FORMAT);
    let again = serde_json::to_vec(&file).expect("serialize");
    std::fs::write(path, &again).expect("write");
    assert_eq!(read_cache_file(path).ok().flatten().as_ref(), Some(&file));
    for lists in file.services.values() {
        for list in lists {
            for s in &list.urls {
                match Url::parse(s) {
                    Ok(u) => check_round_trip(s, &u),
                    Err(e) => check_parse_error(s, &e),
                }
            }
        }
    }
});
