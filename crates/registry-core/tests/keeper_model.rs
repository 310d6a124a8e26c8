//! The list keeper against a brute-force model (registry-core's testkit `run_keeper_ops`):
//! random sequences of entries added, removed, scopes read and forgotten, subscriptions added
//! and removed (exact, group/version/category lists, `enabled=*`, `interface=*`). After every
//! step, each subscription that got its first lists holds, for every (service, category) it was
//! told about, exactly what filtering every entry with `is_match` and sorting gives (or the
//! `empty://` marker). proptest prints the failing sequence, shrunk, and keeps its seed in
//! `proptest-regressions/`.

use proptest::prelude::*;
use registry_core::testkit::{KeeperOp, run_keeper_ops};

fn op() -> impl Strategy<Value = KeeperOp> {
    let e = (0..3usize, 0..4usize, 0..10usize);
    prop_oneof![
        4 => e.clone().prop_map(|(s, c, v)| KeeperOp::Put(s, c, v)),
        3 => e.clone().prop_map(|(s, c, v)| KeeperOp::Remove(s, c, v)),
        2 => (0..7usize, proptest::collection::vec(e, 0..6)).prop_map(|(sc, v)| KeeperOp::Replace(sc, v)),
        1 => (0..7usize).prop_map(KeeperOp::Forget),
        2 => (0..360usize).prop_map(KeeperOp::Subscribe),
        1 => (0..16usize).prop_map(KeeperOp::Unsubscribe),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn keeper_lists_equal_brute_force_matching(ops in proptest::collection::vec(op(), 1..60)) {
        if let Err(e) = run_keeper_ops(&ops) {
            return Err(TestCaseError::fail(e));
        }
    }
}
