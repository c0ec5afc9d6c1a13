//! Tenants' caps: the most of a bucket's quota one tenant may take, even when no one else
//! waits.
//!
//! Each capped tenant has a GCRA of its own per bucket, at its cap's pace and a burst of one,
//! in this process. A request of a capped tenant takes its cap's turn first: at once if it is
//! free, else it reserves the next one and waits for it before it takes a place in the
//! bucket's queue. So a capped tenant never stands at the head of the queue waiting for its
//! cap, holding up the others. A request dropped before its cap's turn gives the turn back.
//!
//! The states live while they hold a turn in the future: once a state is at rest it says
//! nothing a new one would not, and states at rest are dropped when the map grows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::limit::backend::gcra::{Gcra, Params, nanos};
use crate::limit::bucket::BucketKey;
use crate::limit::share::TenantCap;

/// States at rest are dropped when the map holds more than this many.
const PRUNE_ABOVE: usize = 1_024;

/// The cap states of one [`Limits`](crate::limit::Limits), by bucket and tenant.
#[derive(Debug, Default)]
pub(crate) struct TenantCaps {
    states: Mutex<HashMap<(BucketKey, u64), Gcra>>,
}

/// A cap's turn taken for a request, to give back if the request never goes.
#[derive(Debug)]
pub(crate) struct CapTurn {
    caps: Arc<TenantCaps>,
    key: (BucketKey, u64),
}

impl TenantCaps {
    /// Takes the next turn of `tenant`'s cap in `bucket`, at `pace`: how long until it
    /// comes (zero: now), and the turn, to give back if the request does not go.
    pub(crate) fn take(
        self: &Arc<Self>,
        key: (BucketKey, u64),
        pace: Params,
        now: Duration,
    ) -> (Duration, CapTurn) {
        let now = nanos(now);
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        if states.len() > PRUNE_ABOVE {
            states.retain(|_, gcra| gcra.until_rest(now) > 0);
        }
        let gcra = states.entry(key).or_insert_with(|| Gcra::new(pace));
        gcra.set_pace(pace, now);
        let wait = gcra.wait(1, now).unwrap_or(0);
        // A turn in the future is taken now, so the next request of the tenant waits after it.
        gcra.take(1, now);
        let turn = CapTurn {
            caps: Arc::clone(self),
            key,
        };
        (Duration::from_nanos(wait), turn)
    }
}

/// `cap`'s pace in a bucket whose request interval in force is `interval` (zero: no request
/// rate); `None` if it caps nothing there.
pub(crate) fn pace(cap: TenantCap, interval: Duration) -> Option<Params> {
    let per_second = match cap {
        TenantCap::Rate(rate) => rate.per_second_f64(),
        TenantCap::Share(share) => {
            if interval.is_zero() || share.is_nan() || share >= 1.0 {
                return None;
            }
            share.max(0.0) / interval.as_secs_f64()
        }
    };
    // A burst of one: a cap is a pace, not a pool.
    Some(Params::at_rate(per_second, 1, Duration::ZERO))
}

impl CapTurn {
    /// The request did not go: its turn comes back to its tenant.
    pub(crate) fn give_back(self, now: Duration) {
        let mut states = self
            .caps
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(gcra) = states.get_mut(&self.key) {
            gcra.give_back(1, nanos(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::ApiKeyId;
    use crate::quota::{GroupId, Rate};

    #[test]
    fn a_capped_tenant_waits_for_its_own_turns_and_gets_back_one_it_did_not_use() {
        let caps = Arc::new(TenantCaps::default());
        let bucket = BucketKey {
            key: ApiKeyId::ANONYMOUS,
            group: GroupId(0),
            model: 0,
        };
        let pace = Params::of(&Rate::per_second(2).with_tolerance(Duration::ZERO));
        let at = Duration::from_secs(10);
        let waits: Vec<u128> = (0..3)
            .map(|_| caps.take((bucket, 7), pace, at).0.as_millis())
            .collect();
        assert_eq!(waits, [0, 500, 1_000]);
        // Another tenant's cap is its own.
        assert_eq!(caps.take((bucket, 8), pace, at).0, Duration::ZERO);
        let (wait, turn) = caps.take((bucket, 7), pace, at);
        assert_eq!(wait.as_millis(), 1_500);
        turn.give_back(at);
        assert_eq!(caps.take((bucket, 7), pace, at).0.as_millis(), 1_500);
    }
}
