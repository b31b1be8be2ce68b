//! Who should own which NAS, as pure functions with table tests: rendezvous hashing of
//! each NAS over the live daemons, and the steps one daemon takes from what it holds to
//! what it should hold.
//!
//! Rendezvous (highest random weight) hashing: every daemon scores every NAS and the
//! highest score wins. A daemon that joins wins only the NAS it now scores highest on
//! (about 1/N of them) and a daemon that leaves loses only its own, so a join or a
//! leave moves a share of the NAS, never all of them. Every daemon computes the same
//! answer from the same member list, without talking to the others.

use std::collections::{BTreeSet, HashMap, HashSet};

/// A daemon's score for a NAS: a stable 64-bit hash of both (the same on every host
/// and in every version, unlike the standard library's randomly keyed hasher).
pub fn score(nas_id: i64, daemon_id: &str) -> u64 {
    // FNV-1a over the daemon id, then mixed with the NAS id by splitmix64's finaliser,
    // so that neighbouring NAS ids get unrelated scores.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in daemon_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h ^ mix(nas_id as u64))
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The live daemon that should own `nas_id` (ties, which a 64-bit hash makes
/// theoretical, go to the smaller id so that every daemon agrees).
pub fn owner_of(nas_id: i64, live: &[String]) -> Option<&str> {
    live.iter()
        .map(|d| (score(nas_id, d), d))
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, d)| d.as_str())
}

/// What one daemon does next about ownership.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Steps {
    /// NAS this daemon should own and does not hold yet (it tries to take them; a NAS
    /// still held by a live daemon is taken once that daemon releases it).
    pub take: Vec<i64>,
    /// NAS this daemon holds but should not: each with the daemon that should have it
    /// (None when nobody should: the NAS was disabled or removed, or this daemon is
    /// stopping). Their owners stop claiming, finish what is in flight, then release.
    pub hand_over: Vec<(i64, Option<String>)>,
}

/// From the enabled NAS, the live daemons (this one included unless it is stopping),
/// and what this daemon holds, the steps to take. Sorted, so that logs and tests read
/// the same every time.
pub fn steps(nas_ids: &[i64], live: &[String], me: &str, held: &HashSet<i64>) -> Steps {
    let mut steps = Steps::default();
    let wanted: BTreeSet<i64> = nas_ids
        .iter()
        .copied()
        .filter(|id| owner_of(*id, live) == Some(me))
        .collect();
    steps.take = wanted
        .iter()
        .copied()
        .filter(|id| !held.contains(id))
        .collect();
    let enabled: HashSet<i64> = nas_ids.iter().copied().collect();
    let mut leaving: Vec<i64> = held
        .iter()
        .copied()
        .filter(|id| !wanted.contains(id))
        .collect();
    leaving.sort_unstable();
    steps.hand_over = leaving
        .into_iter()
        .map(|id| {
            let to = enabled
                .contains(&id)
                .then(|| owner_of(id, live).map(str::to_string))
                .flatten();
            (id, to)
        })
        .collect();
    steps
}

/// How many NAS each live daemon should own (for `nasd cluster status` and tests).
pub fn spread(nas_ids: &[i64], live: &[String]) -> HashMap<String, usize> {
    let mut counts: HashMap<String, usize> = live.iter().map(|d| (d.clone(), 0)).collect();
    for id in nas_ids {
        if let Some(owner) = owner_of(*id, live) {
            *counts.entry(owner.to_string()).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn scores_are_stable_across_runs_and_hosts() {
        // Fixed values: a change of the hash would move every NAS at the next upgrade
        // of a mixed-version cluster, so it must be deliberate.
        assert_eq!(score(1, "a"), score(1, "a"));
        assert_ne!(score(1, "a"), score(2, "a"));
        assert_ne!(score(1, "a"), score(1, "b"));
        assert_eq!(score(42, "nasd-1"), 0x6f58_02e5_a139_9640);
    }

    #[test]
    fn owner_table() {
        let live = ids(&["host-a:10", "host-b:20", "host-c:30"]);
        // Every NAS has exactly one owner, and it is a live daemon.
        for nas in 1..=100 {
            let owner = owner_of(nas, &live).expect("an owner");
            assert!(live.iter().any(|d| d == owner));
        }
        assert_eq!(owner_of(1, &[]), None);
        assert_eq!(owner_of(7, &ids(&["only"])), Some("only"));
    }

    #[test]
    fn spread_is_even_enough() {
        let nas: Vec<i64> = (1..=3000).collect();
        let live = ids(&["host-a:10", "host-b:20", "host-c:30"]);
        let counts = spread(&nas, &live);
        for (daemon, n) in &counts {
            assert!((800..=1200).contains(n), "{daemon} owns {n} of 3000");
        }
    }

    #[test]
    fn a_join_or_a_leave_moves_only_a_share() {
        let nas: Vec<i64> = (1..=3000).collect();
        let three = ids(&["a", "b", "c"]);
        let four = ids(&["a", "b", "c", "d"]);
        let moved_on_join = nas
            .iter()
            .filter(|n| owner_of(**n, &three) != owner_of(**n, &four))
            .count();
        // Only what d wins moves, about a quarter, and all of it moves to d.
        assert!((500..=1000).contains(&moved_on_join), "{moved_on_join}");
        assert!(
            nas.iter()
                .filter(|n| owner_of(**n, &three) != owner_of(**n, &four))
                .all(|n| owner_of(*n, &four) == Some("d"))
        );
        let two = ids(&["a", "c"]);
        // b leaves: only b's NAS move.
        assert!(
            nas.iter()
                .filter(|n| owner_of(**n, &three) != owner_of(**n, &two))
                .all(|n| owner_of(*n, &three) == Some("b"))
        );
    }

    #[test]
    fn steps_table() {
        let live = ids(&["a", "b"]);
        let nas: Vec<i64> = (1..=8).collect();
        let of_a: Vec<i64> = nas
            .iter()
            .copied()
            .filter(|n| owner_of(*n, &live) == Some("a"))
            .collect();
        let of_b: Vec<i64> = nas
            .iter()
            .copied()
            .filter(|n| owner_of(*n, &live) == Some("b"))
            .collect();
        assert!(!of_a.is_empty() && !of_b.is_empty());

        // Nothing held: take all of mine.
        let s = steps(&nas, &live, "a", &HashSet::new());
        assert_eq!(s.take, of_a);
        assert!(s.hand_over.is_empty());

        // Holding everything (b just joined): keep mine, hand b's over to b.
        let all: HashSet<i64> = nas.iter().copied().collect();
        let s = steps(&nas, &live, "a", &all);
        assert!(s.take.is_empty());
        assert_eq!(
            s.hand_over,
            of_b.iter()
                .map(|n| (*n, Some("b".to_string())))
                .collect::<Vec<_>>()
        );

        // A held NAS that was disabled or removed goes to nobody.
        let held: HashSet<i64> = [of_a[0], 99].into();
        let s = steps(&nas, &live, "a", &held);
        assert_eq!(s.hand_over, vec![(99, None)]);
        assert_eq!(s.take.len(), of_a.len() - 1);

        // Stopping: not among the live daemons any more, so everything held goes to
        // whoever should have it now.
        let s = steps(&nas, &ids(&["b"]), "a", &all);
        assert!(s.take.is_empty());
        assert_eq!(s.hand_over.len(), nas.len());
        assert!(s.hand_over.iter().all(|(_, to)| to.as_deref() == Some("b")));

        // Alone: everything.
        let s = steps(&nas, &ids(&["a"]), "a", &HashSet::new());
        assert_eq!(s.take, nas);
    }
}
