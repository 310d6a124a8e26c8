//! The list keeper (`registry_core::keeper::ListKeeper`) against its brute-force model
//! (`registry_core::testkit::run_keeper_ops`): arbitrary sequences of entries added and removed,
//! scopes read and forgotten, subscriptions added and removed. After every step each ready
//! subscription must hold exactly what filtering every entry with `is_match` and sorting gives.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use registry_core::testkit::{KeeperOp, run_keeper_ops};

#[derive(Arbitrary, Debug)]
enum Op {
    Put(u8, u8, u8),
    Remove(u8, u8, u8),
    Replace(u8, Vec<(u8, u8, u8)>),
    Forget(u8),
    Subscribe(u16),
    Unsubscribe(u8),
}

fuzz_target!(|ops: Vec<Op>| {
    let e = |(s, c, v): &(u8, u8, u8)| (*s as usize, *c as usize, *v as usize);
    let ops: Vec<KeeperOp> = ops
        .iter()
        .take(200)
        .map(|op| match op {
            Op::Put(s, c, v) => KeeperOp::Put(*s as usize, *c as usize, *v as usize),
            Op::Remove(s, c, v) => KeeperOp::Remove(*s as usize, *c as usize, *v as usize),
            Op::Replace(sc, entries) => {
                KeeperOp::Replace(*sc as usize, entries.iter().take(32).map(e).collect())
            }
            Op::Forget(sc) => KeeperOp::Forget(*sc as usize),
            Op::Subscribe(i) => KeeperOp::Subscribe(*i as usize),
            Op::Unsubscribe(i) => KeeperOp::Unsubscribe(*i as usize),
        })
        .collect();
    if let Err(e) = run_keeper_ops(&ops) {
        panic!("{e}\nops: {ops:?}");
    }
});
