//! `Url::from_encoded` on any node name (a ZooKeeper child or an etcd key's last segment,
//! written by Dubbo Java, Dubbo Go, another SDK or by hand).
//!
//! Asserts: no panic; a name that does not decode is `InvalidEncoding`, one that decodes but
//! does not parse is `InvalidUrl`; a parsed URL round-trips (CONTRACT §1) and its node name is
//! `encode` of its full string, decoding to the same URL.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::{Error, Url, decode};
use registry_fuzz::{check_round_trip, touch_accessors};

fuzz_target!(|data: &[u8]| {
    let name = String::from_utf8_lossy(data);
    match Url::from_encoded(&name) {
        Ok(u) => {
            let decoded = decode(&name).expect("from_encoded succeeded, so decode does");
            assert_eq!(Url::parse(&decoded).ok().as_ref(), Some(&u), "{name:?}");
            check_round_trip(&decoded, &u);
            touch_accessors(&u);
        }
        Err(Error::InvalidEncoding { input, .. }) => {
            assert_eq!(input, name, "the error names the node");
            assert!(decode(&name).is_err(), "{name:?}");
        }
        Err(Error::InvalidUrl { .. }) => {
            let decoded = decode(&name).expect("a parse error comes after decoding");
            assert!(Url::parse(&decoded).is_err(), "{name:?}");
        }
        Err(e) => panic!("{name:?}: unexpected error kind {e:?}"),
    }
});
