//! `bench --tenants` and `--interactive-share`: whom each request is for and how urgent it
//! is, and what each tenant and priority got.

use std::time::Duration;

use serde::Serialize;
use together_tower::limit::{Priority, Tenant};

/// One tenant of `--tenants NAME:WEIGHT,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantArg {
    /// Its name.
    pub name: String,
    /// Its weight (at least 1).
    pub weight: u32,
}

/// The tenants of `--tenants`, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantList(pub Vec<TenantArg>);

/// Parses `a:1,b:1,c:2` (a weight may be left out: `a,b,c:2`).
pub fn parse_tenants(spec: &str) -> Result<TenantList, String> {
    let mut tenants: Vec<TenantArg> = Vec::new();
    for part in spec
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let (name, weight) = match part.split_once(':') {
            Some((name, weight)) => (name.trim(), weight.trim()),
            None => (part, "1"),
        };
        let weight = match weight.parse::<u32>() {
            Ok(weight) if weight >= 1 => weight,
            _ => {
                return Err(format!(
                    "{part:?}: a weight is a whole number of at least 1"
                ));
            }
        };
        if name.is_empty() || tenants.iter().any(|tenant| tenant.name == name) {
            return Err(format!("{part:?}: each tenant needs a name of its own"));
        }
        tenants.push(TenantArg {
            name: name.to_owned(),
            weight,
        });
    }
    if tenants.is_empty() {
        return Err("name at least one tenant, such as a:1,b:2".into());
    }
    Ok(TenantList(tenants))
}

/// The priority of the `index`-th request of a workload when `share` of them are
/// interactive (spread evenly) and the rest background; `None` without a share.
pub fn priority_of(index: u64, share: Option<f64>) -> Option<Priority> {
    let share = share?;
    let before = (index as f64 * share).floor();
    let after = ((index + 1) as f64 * share).floor();
    Some(if after > before {
        Priority::Interactive
    } else {
        Priority::Background
    })
}

/// Marks `request` for `tenant` at `priority`.
pub fn mark<B>(
    request: &mut http::Request<B>,
    tenant: Option<&Tenant>,
    priority: Option<Priority>,
) {
    if let Some(tenant) = tenant {
        request.extensions_mut().insert(tenant.clone());
    }
    if let Some(priority) = priority {
        request.extensions_mut().insert(priority);
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// When its answer came, since the run began.
    pub done: Duration,
    /// From its send to its answer.
    pub latency: Duration,
    /// Whether it ended 2xx.
    pub ok: bool,
    /// Which of the run's tenants it was for.
    pub tenant: usize,
    /// Its priority, with `--interactive-share`.
    pub priority: Option<Priority>,
}

/// What one tenant got.
#[derive(Debug, Clone, Serialize)]
pub struct TenantReport {
    /// Its name.
    pub name: String,
    /// Its weight.
    pub weight: u32,
    /// Its requests that ended 2xx.
    pub ok: u64,
    /// Its part of the 2xx answers while every tenant still had requests waiting (until the
    /// first tenant's last answer).
    pub share: f64,
    /// Median latency of its requests.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
}

/// What one priority got.
#[derive(Debug, Clone, Serialize)]
pub struct PriorityReport {
    /// `interactive` or `background`.
    pub name: &'static str,
    /// Its requests that ended 2xx.
    pub ok: u64,
    /// Median latency of its requests, the wait for a turn included.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
}

/// Each tenant's report, from the run's outcomes.
pub fn tenant_reports(tenants: &[TenantArg], outcomes: &[Outcome]) -> Vec<TenantReport> {
    // Every tenant still had requests waiting until the first of them had its last answer.
    let saturated_until = (0..tenants.len())
        .filter_map(|tenant| {
            outcomes
                .iter()
                .filter(|outcome| outcome.tenant == tenant)
                .map(|outcome| outcome.done)
                .max()
        })
        .min()
        .unwrap_or_default();
    let served = |tenant: Option<usize>| {
        outcomes
            .iter()
            .filter(|outcome| outcome.ok && outcome.done < saturated_until)
            .filter(|outcome| tenant.is_none_or(|tenant| outcome.tenant == tenant))
            .count() as f64
    };
    let all = served(None).max(1.0);
    tenants
        .iter()
        .enumerate()
        .map(|(index, tenant)| {
            let (ok, p50_ms, p99_ms) = summary(outcomes.iter().filter(|o| o.tenant == index));
            TenantReport {
                name: tenant.name.clone(),
                weight: tenant.weight,
                ok,
                share: served(Some(index)) / all,
                p50_ms,
                p99_ms,
            }
        })
        .collect()
}

/// The report of each priority the run used.
pub fn priority_reports(outcomes: &[Outcome]) -> Vec<PriorityReport> {
    [Priority::Interactive, Priority::Background]
        .into_iter()
        .map(|priority| {
            let (ok, p50_ms, p99_ms) =
                summary(outcomes.iter().filter(|o| o.priority == Some(priority)));
            PriorityReport {
                name: priority.as_str(),
                ok,
                p50_ms,
                p99_ms,
            }
        })
        .collect()
}

/// The 2xx count and the p50 and p99 latencies of `outcomes`, in milliseconds.
fn summary<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> (u64, f64, f64) {
    let mut ok = 0;
    let mut latencies: Vec<Duration> = Vec::new();
    for outcome in outcomes {
        ok += u64::from(outcome.ok);
        latencies.push(outcome.latency);
    }
    latencies.sort();
    (
        ok,
        crate::bench::percentile(&latencies, 50.0),
        crate::bench::percentile(&latencies, 99.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_parse_with_and_without_weights_and_bad_ones_are_named() {
        let tenants = parse_tenants("a:1, b ,c:2").unwrap();
        let names: Vec<_> = tenants
            .0
            .iter()
            .map(|tenant| (tenant.name.as_str(), tenant.weight))
            .collect();
        assert_eq!(names, [("a", 1), ("b", 1), ("c", 2)]);
        for bad in ["", "a:0", "a:x", "a,a", ":2"] {
            assert!(parse_tenants(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_share_of_interactive_requests_is_spread_evenly() {
        let interactive = (0..100)
            .filter(|index| priority_of(*index, Some(0.1)) == Some(Priority::Interactive))
            .count();
        assert_eq!(interactive, 10);
        assert_eq!(priority_of(3, None), None);
    }
}
