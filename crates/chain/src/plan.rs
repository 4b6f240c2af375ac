//! Choosing the nodes of a new chain: the requesting node first (node 0), then intermediates
//! picked at random among the online nodes that accept relaying and still have room, then the
//! endpoint user's node last.
//!
//! Pure: the caller passes a snapshot of the nodes and a random seed, and gets the hops back.
//! Telling the nodes, and counting chains per node, is the hub's job.

use std::collections::HashSet;

/// Intermediates asked for when the configuration says nothing.
pub const DEFAULT_INTERMEDIATES: usize = 2;

/// A node as the hub sees it when planning.
///
/// Names are expected to be unique; if one repeats, its first entry counts and the others are
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Account name of the node.
    pub name: String,
    /// Whether the node accepts carrying other users' chains.
    pub relay: bool,
    /// Whether the node is logged in now.
    pub online: bool,
    /// Chains the node carries now (as endpoint or intermediate).
    pub busy_chains: usize,
}

/// What to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanRequest<'a> {
    /// The requesting node (node 0).
    pub from: &'a str,
    /// The endpoint user's node (the last hop).
    pub to: &'a str,
    /// Intermediates wanted between them (see [`DEFAULT_INTERMEDIATES`]).
    pub intermediates: usize,
    /// Limit on chains per node: a node carrying this many already is not used, as an
    /// intermediate or as an endpoint.
    pub max_chains_per_node: usize,
}

/// A planned chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Node names in chain order: `from`, the intermediates, `to`.
    pub hops: Vec<String>,
    /// How many intermediates fewer than asked were available (0 when the request was met).
    pub shortfall: usize,
}

impl Plan {
    /// The nodes between the two endpoints, in chain order.
    pub fn intermediates(&self) -> &[String] {
        self.hops
            .get(1..self.hops.len().saturating_sub(1))
            .unwrap_or(&[])
    }
}

/// Why no chain can be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `from` and `to` name the same node.
    #[error("a chain needs two different nodes")]
    SameNode,
    /// An endpoint names no known node.
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    /// An endpoint is not logged in.
    #[error("node {0:?} is offline")]
    Offline(String),
    /// An endpoint already carries `max_chains_per_node` chains.
    #[error("node {0:?} carries its maximum of chains")]
    Busy(String),
}

/// Plans a chain from `req.from` to `req.to` over `nodes`.
///
/// The endpoints are checked in order (`from`, then `to`): they must be known, online and under
/// the chain limit; they need not accept relaying. Intermediates are distinct nodes other than
/// the endpoints that are online, accept relaying and are under the limit, chosen uniformly at
/// random (each ordered selection equally likely) with a PRNG seeded by `random`. When fewer
/// are eligible than asked, all of them are used and [`Plan::shortfall`] says how many are
/// missing. The same inputs always give the same plan.
pub fn plan(req: &PlanRequest, nodes: &[Candidate], random: u64) -> Result<Plan, PlanError> {
    if req.from == req.to {
        return Err(PlanError::SameNode);
    }
    check_endpoint(req.from, req.max_chains_per_node, nodes)?;
    check_endpoint(req.to, req.max_chains_per_node, nodes)?;

    let mut seen = HashSet::new();
    let mut eligible: Vec<&str> = nodes
        .iter()
        // First entry per name only (see `Candidate`).
        .filter(|c| seen.insert(c.name.as_str()))
        .filter(|c| c.name != req.from && c.name != req.to)
        .filter(|c| c.online && c.relay && c.busy_chains < req.max_chains_per_node)
        .map(|c| c.name.as_str())
        .collect();

    let picked = req.intermediates.min(eligible.len());
    // Partial Fisher-Yates: the first `picked` slots end up a uniform ordered sample.
    let mut rng = SplitMix64(random);
    for i in 0..picked {
        let j = i + rng.below(eligible.len() - i);
        eligible.swap(i, j);
    }

    let mut hops = Vec::with_capacity(picked + 2);
    hops.push(req.from.to_owned());
    hops.extend(eligible.iter().take(picked).map(|n| (*n).to_owned()));
    hops.push(req.to.to_owned());
    Ok(Plan {
        hops,
        shortfall: req.intermediates - picked,
    })
}

fn check_endpoint(name: &str, max_chains: usize, nodes: &[Candidate]) -> Result<(), PlanError> {
    let Some(c) = nodes.iter().find(|c| c.name == name) else {
        return Err(PlanError::UnknownNode(name.to_owned()));
    };
    if !c.online {
        return Err(PlanError::Offline(name.to_owned()));
    }
    if c.busy_chains >= max_chains {
        return Err(PlanError::Busy(name.to_owned()));
    }
    Ok(())
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, and every seed gives a good stream, which is all
/// picking a few nodes needs. Not for secrets.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` for `n > 0` (returns 0 for `n == 0`), without modulo bias.
    fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        if n == 0 {
            return 0;
        }
        // Accept only values in the top `2^64 - (2^64 mod n)`, a whole number of `n`-blocks.
        let threshold = n.wrapping_neg() % n;
        loop {
            let x = self.next();
            if x >= threshold {
                // `x % n < n`, which came from a usize.
                return (x % n) as usize;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn node(name: &str, relay: bool, online: bool, busy: usize) -> Candidate {
        Candidate {
            name: name.into(),
            relay,
            online,
            busy_chains: busy,
        }
    }

    fn relays(names: &[&str]) -> Vec<Candidate> {
        names.iter().map(|n| node(n, true, true, 0)).collect()
    }

    fn req<'a>(from: &'a str, to: &'a str, intermediates: usize) -> PlanRequest<'a> {
        PlanRequest {
            from,
            to,
            intermediates,
            max_chains_per_node: 4,
        }
    }

    #[test]
    fn endpoints_first_and_last_and_intermediates_between() {
        let nodes = relays(&["a", "b", "c", "d", "e"]);
        let p = plan(&req("a", "e", DEFAULT_INTERMEDIATES), &nodes, 7).unwrap();
        assert_eq!(p.hops.len(), 4);
        assert_eq!(p.hops.first().map(String::as_str), Some("a"));
        assert_eq!(p.hops.last().map(String::as_str), Some("e"));
        assert_eq!(p.shortfall, 0);
        assert_eq!(p.intermediates().len(), 2);
        for n in p.intermediates() {
            assert!(["b", "c", "d"].contains(&n.as_str()));
        }
    }

    #[test]
    fn no_duplicates_even_when_names_repeat() {
        let mut nodes = relays(&["a", "b", "c", "d", "e", "f"]);
        nodes.extend(relays(&["b", "c", "a"]));
        for seed in 0..200 {
            let p = plan(&req("a", "f", 4), &nodes, seed).unwrap();
            let distinct: HashSet<&String> = p.hops.iter().collect();
            assert_eq!(distinct.len(), p.hops.len(), "{:?}", p.hops);
            assert_eq!(p.hops.len(), 6);
        }
    }

    #[test]
    fn fewer_intermediates_when_few_are_eligible() {
        let nodes = vec![
            node("a", false, true, 0),
            node("b", true, true, 0),
            node("c", true, false, 0),
            node("d", false, true, 0),
            node("e", false, true, 0),
        ];
        let p = plan(&req("a", "e", 3), &nodes, 1).unwrap();
        assert_eq!(p.hops, vec!["a", "b", "e"]);
        assert_eq!(p.shortfall, 2);

        let only_endpoints = [node("a", false, true, 0), node("e", false, true, 0)];
        let p = plan(&req("a", "e", 3), &only_endpoints, 1).unwrap();
        assert_eq!(p.hops, vec!["a", "e"]);
        assert_eq!(p.shortfall, 3);

        let p = plan(&req("a", "e", 0), &nodes, 1).unwrap();
        assert_eq!(p.hops, vec!["a", "e"]);
        assert_eq!(p.shortfall, 0);
    }

    #[test]
    fn bad_endpoints_are_refused() {
        let mut nodes = relays(&["a", "b", "c"]);
        nodes.push(node("down", true, false, 0));
        nodes.push(node("full", true, true, 4));
        assert_eq!(plan(&req("a", "a", 2), &nodes, 0), Err(PlanError::SameNode));
        assert_eq!(
            plan(&req("x", "a", 2), &nodes, 0),
            Err(PlanError::UnknownNode("x".into()))
        );
        assert_eq!(
            plan(&req("a", "y", 2), &nodes, 0),
            Err(PlanError::UnknownNode("y".into()))
        );
        assert_eq!(
            plan(&req("down", "a", 2), &nodes, 0),
            Err(PlanError::Offline("down".into()))
        );
        assert_eq!(
            plan(&req("a", "down", 2), &nodes, 0),
            Err(PlanError::Offline("down".into()))
        );
        assert_eq!(
            plan(&req("full", "a", 2), &nodes, 0),
            Err(PlanError::Busy("full".into()))
        );
        assert_eq!(
            plan(&req("a", "full", 2), &nodes, 0),
            Err(PlanError::Busy("full".into()))
        );
        // Same node is reported before anything about the node itself.
        assert_eq!(plan(&req("x", "x", 2), &nodes, 0), Err(PlanError::SameNode));
    }

    #[test]
    fn busy_offline_and_non_relay_nodes_are_skipped() {
        let nodes = vec![
            node("a", false, true, 0),
            node("busy", true, true, 4),
            node("busier", true, true, 9),
            node("down", true, false, 0),
            node("private", false, true, 0),
            node("ok", true, true, 3),
            node("z", false, true, 3),
        ];
        for seed in 0..100 {
            let p = plan(&req("a", "z", 2), &nodes, seed).unwrap();
            assert_eq!(p.hops, vec!["a", "ok", "z"]);
            assert_eq!(p.shortfall, 1);
        }
    }

    #[test]
    fn same_seed_same_plan() {
        let nodes = relays(&["a", "b", "c", "d", "e", "f", "g", "h"]);
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(
                plan(&req("a", "h", 3), &nodes, seed),
                plan(&req("a", "h", 3), &nodes, seed)
            );
        }
    }

    #[test]
    fn seeds_spread_over_every_eligible_node() {
        let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        let nodes = relays(&names);
        let mut picked: HashMap<String, usize> = HashMap::new();
        let mut first: HashMap<String, usize> = HashMap::new();
        for seed in 0..1000 {
            let p = plan(&req("a", "j", 2), &nodes, seed).unwrap();
            for n in p.intermediates() {
                *picked.entry(n.clone()).or_default() += 1;
            }
            *first.entry(p.hops[1].clone()).or_default() += 1;
        }
        // 8 eligible nodes, 2000 picks: 250 each on average.
        assert_eq!(picked.len(), 8, "{picked:?}");
        assert_eq!(first.len(), 8, "{first:?}");
        for (name, count) in &picked {
            assert!((150..350).contains(count), "{name} picked {count} times");
        }
    }

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut rng = SplitMix64(3);
        assert_eq!(rng.below(0), 0);
        assert_eq!(rng.below(1), 0);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            seen[rng.below(7)] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    fn candidate() -> impl Strategy<Value = Candidate> {
        (0u8..10, any::<bool>(), any::<bool>(), 0usize..4).prop_map(|(n, relay, online, busy)| {
            Candidate {
                name: format!("n{n}"),
                relay,
                online,
                busy_chains: busy,
            }
        })
    }

    proptest! {
        #[test]
        fn plans_keep_their_invariants(
            nodes in prop::collection::vec(candidate(), 0..16),
            from in 0u8..11,
            to in 0u8..11,
            intermediates in 0usize..6,
            max in 0usize..5,
            seed in any::<u64>(),
        ) {
            let (from, to) = (format!("n{from}"), format!("n{to}"));
            let r = PlanRequest { from: &from, to: &to, intermediates, max_chains_per_node: max };
            let first = |name: &str| nodes.iter().find(|c| c.name == name);
            let ok_endpoint = |name: &str| {
                first(name).is_some_and(|c| c.online && c.busy_chains < max)
            };
            match plan(&r, &nodes, seed) {
                Ok(p) => {
                    prop_assert!(from != to && ok_endpoint(&from) && ok_endpoint(&to));
                    prop_assert_eq!(p.hops.first(), Some(&from));
                    prop_assert_eq!(p.hops.last(), Some(&to));
                    let distinct: HashSet<&String> = p.hops.iter().collect();
                    prop_assert_eq!(distinct.len(), p.hops.len());
                    for n in p.intermediates() {
                        let c = first(n).unwrap();
                        prop_assert!(c.online && c.relay && c.busy_chains < max);
                    }
                    let eligible: HashSet<&str> = nodes
                        .iter()
                        .map(|c| c.name.as_str())
                        .filter(|n| *n != from && *n != to)
                        .filter(|n| first(n).is_some_and(|c| c.online && c.relay && c.busy_chains < max))
                        .collect();
                    prop_assert_eq!(p.intermediates().len(), intermediates.min(eligible.len()));
                    prop_assert_eq!(p.shortfall, intermediates - p.intermediates().len());
                    prop_assert_eq!(plan(&r, &nodes, seed), Ok(p));
                }
                Err(PlanError::SameNode) => prop_assert_eq!(&from, &to),
                Err(PlanError::UnknownNode(n)) => prop_assert!(first(&n).is_none()),
                Err(PlanError::Offline(n)) => prop_assert!(!first(&n).unwrap().online),
                Err(PlanError::Busy(n)) => prop_assert!(first(&n).unwrap().busy_chains >= max),
            }
        }
    }
}
