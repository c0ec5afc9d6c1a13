//! The order of a bucket's waiters: priorities with minimum shares, and fair shares between
//! tenants (see [`share`](crate::limit::share) for what users see).
//!
//! Within a priority, places sort by start-time fair queuing: a place of tenant `t` arriving
//! gets the start tag `max(v, F(t))`, where `v` is the start tag of the priority's last place
//! that went and `F(t)` the finish tag of `t`'s last place, and leaves `F(t)` at its start
//! plus its cost divided by `t`'s weight. Served in order of start tags, tenants that keep
//! waiting get turns in proportion to their weights, within one request each; a tenant that
//! stops waiting falls behind `v` and loses nothing to the others, and one that comes back
//! starts at `v`, level with the rest, not behind their backlog. Tags are fixed when a place
//! arrives, so the queue stays one ordered map, and a retry keeps the lane of its priority
//! that goes first.
//!
//! Across priorities the most urgent waiter goes, unless a less urgent priority is owed a
//! turn: every turn that goes while a priority has waiters adds its minimum share to what it
//! is owed (at most one turn), and its own turns take one away. So a priority with a share of
//! 10% gets at least one turn in ten while it waits, and a burst of urgent requests after a
//! quiet spell is not held back by turns the less urgent ones were owed long ago.
//!
//! The state lives while the queue has waiters, and starts afresh with the next busy spell:
//! fairness matters only while turns are scarce.

use std::collections::HashMap;

use super::queue::Lane;
use crate::limit::backend::Cost;
use crate::limit::share::{Priority, Who};

/// A unit of cost in tags, so weights divide it without losing much.
const TAG_UNIT: u64 = 1 << 20;

/// Finish tags kept beyond this many are pruned of tenants that no longer matter.
const PRUNE_ABOVE: usize = 64;

/// Where a place sorts in its queue: by priority, retries first, by its start tag, then by
/// arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) priority: Priority,
    pub(crate) lane: Lane,
    tag: u64,
    seq: u64,
}

impl Key {
    /// The first key a place of `priority` could have.
    pub(crate) fn first_of(priority: Priority) -> Self {
        Self {
            priority,
            lane: Lane::Retry,
            tag: 0,
            seq: 0,
        }
    }
}

/// The scheduling state of one queue while it has waiters.
#[derive(Debug, Default)]
pub(crate) struct Fair {
    /// Per priority: the start tag of the last place that went.
    clock: [u64; 3],
    /// Per priority and tenant: the finish tag of its last place.
    finish: HashMap<(Priority, u64), u64>,
    /// Per priority: the turns it is owed under its minimum share, in millionths of a turn,
    /// at most one turn.
    owed: [u32; 3],
}

/// One whole turn, in the millionths [`Fair`] counts shares in.
pub(crate) const WHOLE_TURN: u32 = 1_000_000;

impl Fair {
    /// The key of a place arriving now, the `seq`-th to arrive.
    pub(crate) fn key(&mut self, who: &Who, lane: Lane, cost: Cost, seq: u64) -> Key {
        let index = who.priority.index();
        let finish = self
            .finish
            .entry((who.priority, who.tenant_id()))
            .or_insert(0);
        let start = self.clock[index].max(*finish);
        // A bucket with a token budget shares its tokens; any other, its request turns.
        let units = if cost.tokens > 0 {
            cost.tokens
        } else {
            cost.requests.max(1)
        };
        let length = units.saturating_mul(TAG_UNIT) / u64::from(who.weight.max(1));
        *finish = start.saturating_add(length.max(1));
        Key {
            priority: who.priority,
            lane,
            tag: start,
            seq,
        }
    }

    /// The place of `key` went, and `waiting` says which priorities still have waiters:
    /// its priority's clock moves to its tag, and the minimum shares (in millionths of a
    /// turn) accrue. `count` is how many places wait.
    pub(crate) fn went(&mut self, key: Key, waiting: [bool; 3], min_share: [u32; 3], count: usize) {
        let index = key.priority.index();
        self.clock[index] = self.clock[index].max(key.tag);
        for (priority, owed) in self.owed.iter_mut().enumerate() {
            let accrued = owed.saturating_add(min_share[priority]);
            if priority == index {
                // Its own turn counts towards its share, so the share is of every turn.
                *owed = accrued.saturating_sub(WHOLE_TURN);
            } else if waiting[priority] {
                *owed = accrued.min(WHOLE_TURN);
            }
        }
        if self.finish.len() > PRUNE_ABOVE.max(2 * count) {
            let clock = self.clock;
            self.finish
                .retain(|(priority, _), finish| *finish > clock[priority.index()]);
        }
    }

    /// The priority whose first waiter goes next, given which have waiters: the least urgent
    /// one owed a whole turn, else the most urgent. `None` if none waits.
    pub(crate) fn next_priority(&self, waiting: [bool; 3]) -> Option<Priority> {
        let owed = Priority::ALL.into_iter().rev().find(|priority| {
            waiting[priority.index()] && self.owed[priority.index()] >= WHOLE_TURN
        });
        owed.or_else(|| {
            Priority::ALL
                .into_iter()
                .find(|priority| waiting[priority.index()])
        })
    }

    /// Whether some priority is owed a turn: otherwise the first key is the head.
    pub(crate) fn owes_any(&self) -> bool {
        self.owed.iter().any(|owed| *owed >= WHOLE_TURN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(priority: Priority, tenant: &str, weight: u32) -> Who {
        Who {
            priority,
            tenant: Some(crate::limit::Tenant::new(tenant)),
            weight,
        }
    }

    const ONE: Cost = Cost {
        requests: 1,
        tokens: 0,
    };

    #[test]
    fn tenants_sort_by_weight_and_a_newcomer_starts_level() {
        let mut fair = Fair::default();
        let mut keys = Vec::new();
        for seq in 0..4 {
            keys.push((
                fair.key(&who(Priority::Normal, "a", 1), Lane::New, ONE, seq),
                'a',
            ));
            keys.push((
                fair.key(&who(Priority::Normal, "b", 2), Lane::New, ONE, seq + 10),
                'b',
            ));
        }
        keys.sort();
        let order: String = keys.iter().map(|(_, tenant)| *tenant).collect();
        // b, weighted 2, gets two turns for each of a's while both wait.
        assert_eq!(&order[..6], "abbabb");
        // Serve the first six; a tenant arriving now starts at the clock, not behind them.
        for (key, _) in &keys[..6] {
            fair.went(*key, [false, true, false], [0; 3], 2);
        }
        let late = fair.key(&who(Priority::Normal, "c", 1), Lane::New, ONE, 99);
        assert!(late < keys[7].0, "the newcomer goes within a turn");
        // But level with the others: not before the turns already served.
        assert!(late > keys[5].0, "the newcomer does not jump the clock");
    }

    #[test]
    fn a_waiting_priority_is_owed_its_minimum_share() {
        let mut fair = Fair::default();
        let shares = [0, 200_000, 100_000];
        let mut background = 0;
        for turn in 0..100 {
            let next = fair.next_priority([true, false, true]).expect("both wait");
            if next == Priority::Background {
                background += 1;
            }
            let key = Key {
                priority: next,
                lane: Lane::New,
                tag: turn,
                seq: turn,
            };
            fair.went(key, [true, false, true], shares, 2);
        }
        // One turn in ten, from the tenth on.
        assert_eq!(background, 9, "turns of 100");
        // Owed turns do not pile up: after background is served alone, urgent goes first.
        for turn in 0..50 {
            let key = Key {
                priority: Priority::Background,
                lane: Lane::New,
                tag: 1000 + turn,
                seq: 1000 + turn,
            };
            fair.went(key, [false, false, true], shares, 1);
        }
        assert_eq!(
            fair.next_priority([true, false, true]),
            Some(Priority::Interactive)
        );
    }
}
