//! Quota tables: which endpoint classes share a limit, and what the limit is.
//!
//! A [`QuotaTable`] maps each [`EndpointClass`] to a quota group (chat and completions share
//! one in the defaults) and each group to its limits: a request [`Rate`] (a GCRA quota: so many
//! requests per period, with a burst), a number of concurrent calls, or both. Classes that map
//! to no group are not limited.
//!
//! The built-in table is Together's published one ([`QuotaTable::together_defaults`]); the chat
//! tiers are presets ([`QuotaTable::chat_tier`]). Invalid tables are [`QuotaError`]s that say
//! what to fix.
//!
//! # Example
//!
//! ```
//! use together_tower::classify::EndpointClass;
//! use together_tower::quota::{GroupQuota, QuotaTable, Rate};
//!
//! // Together's defaults, with chat raised to 1,800 requests a minute and a burst of 5.
//! let table = QuotaTable::together_defaults()
//!     .to_builder()
//!     .group("chat", GroupQuota::rate(Rate::per_minute(1_800).with_burst(5)))
//!     .build()?;
//! assert_eq!(
//!     table.group_of(EndpointClass::Completions).unwrap().rate().unwrap(),
//!     Rate::per_minute(1_800).with_burst(5),
//! );
//! # Ok::<(), together_tower::quota::QuotaError>(())
//! ```
//!
//! With the `serde` feature a table also loads from TOML (see [`QuotaTable::from_toml`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::{EndpointClass, UnknownClass};

/// So many requests per period, with a burst: one GCRA quota.
///
/// A rate of `n` per `period` lets one request through every `period / n`; the burst is how
/// many may go back to back after a quiet spell. The default burst is 1: Together enforces
/// per-minute limits per second and recommends steady traffic, so the safe default is to
/// spread requests evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    requests: u32,
    period: Duration,
    burst: u32,
    tolerance: Option<Duration>,
}

impl Rate {
    /// `requests` per `period`, with a burst of 1.
    pub const fn new(requests: u32, period: Duration) -> Self {
        Self {
            requests,
            period,
            burst: 1,
            tolerance: None,
        }
    }

    /// `requests` per second.
    pub const fn per_second(requests: u32) -> Self {
        Self::new(requests, Duration::from_secs(1))
    }

    /// `requests` per minute.
    pub const fn per_minute(requests: u32) -> Self {
        Self::new(requests, Duration::from_secs(60))
    }

    /// `requests` per hour.
    pub const fn per_hour(requests: u32) -> Self {
        Self::new(requests, Duration::from_secs(3_600))
    }

    /// The same rate with another burst. It must be between 1 and the number of requests per period.
    pub const fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Requests per period.
    pub const fn requests(&self) -> u32 {
        self.requests
    }

    /// The period.
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// How many requests may go back to back.
    pub const fn burst(&self) -> u32 {
        self.burst
    }

    /// The steady spacing between requests: `period / requests`.
    pub fn interval(&self) -> Duration {
        self.period / self.requests.max(1)
    }

    /// How long a bucket of this rate takes to refill completely after being emptied.
    pub fn refill_time(&self) -> Duration {
        self.interval()
            .saturating_mul(self.burst)
            .saturating_add(self.tolerance())
    }

    /// The same rate with another pacing tolerance: how much before its exact turn a request
    /// may go. It must be below one interval; use the burst for whole requests.
    pub const fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = Some(tolerance);
        self
    }

    /// How much before its exact turn a request may go. By default the smaller of 2 ms and
    /// half an interval.
    ///
    /// Timers fire late (tokio's by up to about a millisecond), and a GCRA bucket that is
    /// asked late starts its next interval from the late moment: over a run, a pacing of 10
    /// requests a second would lose about 1% of the quota. With a tolerance the waiting
    /// request wakes that much early, so a late timer lands on its exact turn and the
    /// schedule keeps to the quota. A request can thus go at most `tolerance` early, which
    /// any server that counts per second (as Together does) allows.
    pub fn tolerance(&self) -> Duration {
        self.tolerance
            .unwrap_or_else(|| Duration::from_millis(2).min(self.interval() / 2))
    }

    fn validate(&self, group: &str) -> Result<governor::Quota, QuotaError> {
        let error = |problem| QuotaError::new(group, problem);
        if self.requests == 0 || self.period.is_zero() {
            return Err(error(Problem::ZeroRate));
        }
        if self.burst == 0 {
            return Err(error(Problem::ZeroBurst));
        }
        if self.burst > self.requests {
            return Err(error(Problem::BurstExceedsRate(*self)));
        }
        if self
            .tolerance
            .is_some_and(|tolerance| tolerance >= self.interval())
        {
            return Err(error(Problem::ToleranceTooLarge(*self)));
        }
        let burst = std::num::NonZeroU32::new(self.burst).ok_or(error(Problem::ZeroBurst))?;
        governor::Quota::with_period(self.interval())
            .map(|quota| quota.allow_burst(burst))
            .ok_or(error(Problem::RateTooFine(*self)))
    }

    #[cfg(feature = "serde")]
    fn parse(text: &str) -> Option<Rate> {
        let (count, unit) = text.split_once('/')?;
        let requests = count.trim().parse().ok()?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3_600),
            _ => return None,
        };
        Some(Rate::new(requests, period))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period.as_secs() {
            1 if self.period.subsec_nanos() == 0 => write!(f, "{}/s", self.requests)?,
            60 if self.period.subsec_nanos() == 0 => write!(f, "{}/min", self.requests)?,
            3_600 if self.period.subsec_nanos() == 0 => write!(f, "{}/h", self.requests)?,
            _ => write!(f, "{} per {:?}", self.requests, self.period)?,
        }
        write!(f, " (burst {})", self.burst)
    }
}

/// The limits of one quota group: a request rate, a number of concurrent calls, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupQuota {
    rate: Option<Rate>,
    concurrency: Option<u32>,
}

impl GroupQuota {
    /// A group limited by a request rate.
    pub const fn rate(rate: Rate) -> Self {
        Self {
            rate: Some(rate),
            concurrency: None,
        }
    }

    /// A group limited to `calls` calls in flight at once, with no rate.
    ///
    /// The slot is held for the duration of one HTTP call. For job-creating classes this keeps
    /// creates from racing each other; a job that outlives its call is not counted.
    pub const fn concurrency(calls: u32) -> Self {
        Self {
            rate: None,
            concurrency: Some(calls),
        }
    }

    /// The same group, also limited to `calls` calls in flight at once.
    pub const fn with_concurrency(mut self, calls: u32) -> Self {
        self.concurrency = Some(calls);
        self
    }

    /// The same group, also limited by `rate`.
    pub const fn with_rate(mut self, rate: Rate) -> Self {
        self.rate = Some(rate);
        self
    }

    /// The request rate, if any.
    pub const fn rate_limit(&self) -> Option<Rate> {
        self.rate
    }

    /// The number of concurrent calls allowed, if limited.
    pub const fn concurrency_limit(&self) -> Option<u32> {
        self.concurrency
    }
}

/// The chat tiers Together published, in requests and tokens per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChatTier {
    /// 60 requests and 60,000 tokens a minute.
    Free,
    /// 600 requests and 180,000 tokens a minute.
    Tier1,
    /// 1,800 requests and 250,000 tokens a minute.
    Tier2,
    /// 3,000 requests and 500,000 tokens a minute.
    Tier3,
    /// 4,500 requests and 1,000,000 tokens a minute.
    Tier4,
    /// 6,000 requests and 2,000,000 tokens a minute.
    Tier5,
}

impl ChatTier {
    /// Every tier, lowest first.
    pub const ALL: [ChatTier; 6] = [
        ChatTier::Free,
        ChatTier::Tier1,
        ChatTier::Tier2,
        ChatTier::Tier3,
        ChatTier::Tier4,
        ChatTier::Tier5,
    ];

    /// Chat requests allowed per minute.
    pub const fn requests_per_minute(self) -> u32 {
        match self {
            ChatTier::Free => 60,
            ChatTier::Tier1 => 600,
            ChatTier::Tier2 => 1_800,
            ChatTier::Tier3 => 3_000,
            ChatTier::Tier4 => 4_500,
            ChatTier::Tier5 => 6_000,
        }
    }

    /// Chat tokens (prompt plus completion) allowed per minute. Published for reference; the
    /// limiter does not budget tokens yet.
    pub const fn tokens_per_minute(self) -> u32 {
        match self {
            ChatTier::Free => 60_000,
            ChatTier::Tier1 => 180_000,
            ChatTier::Tier2 => 250_000,
            ChatTier::Tier3 => 500_000,
            ChatTier::Tier4 => 1_000_000,
            ChatTier::Tier5 => 2_000_000,
        }
    }

    /// The tier's name in quota files: `free`, `tier-1` ... `tier-5`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ChatTier::Free => "free",
            ChatTier::Tier1 => "tier-1",
            ChatTier::Tier2 => "tier-2",
            ChatTier::Tier3 => "tier-3",
            ChatTier::Tier4 => "tier-4",
            ChatTier::Tier5 => "tier-5",
        }
    }
}

/// The index of a group in its [`QuotaTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct GroupId(pub(crate) u16);

/// One validated group of a [`QuotaTable`].
#[derive(Debug, Clone)]
pub struct Group {
    name: Arc<str>,
    quota: GroupQuota,
    governor_quota: Option<governor::Quota>,
}

impl Group {
    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The request rate, if the group has one.
    pub fn rate(&self) -> Option<Rate> {
        self.quota.rate
    }

    /// The number of concurrent calls allowed, if limited.
    pub fn concurrency(&self) -> Option<u32> {
        self.quota.concurrency
    }

    /// The rate as a governor quota, if the group has one.
    pub fn governor_quota(&self) -> Option<governor::Quota> {
        self.governor_quota
    }
}

/// A validated table from endpoint classes to quota groups to limits.
///
/// Build one with [`QuotaTable::builder`], start from [`QuotaTable::together_defaults`] or a
/// [`ChatTier`], or load one from TOML with the `serde` feature.
#[derive(Debug, Clone)]
pub struct QuotaTable {
    groups: Vec<Group>,
    by_class: [Option<GroupId>; EndpointClass::ALL.len()],
}

impl QuotaTable {
    /// A builder for a table of your own.
    pub fn builder() -> QuotaTableBuilder {
        QuotaTableBuilder::default()
    }

    /// A builder that starts from this table.
    pub fn to_builder(&self) -> QuotaTableBuilder {
        let mut builder = QuotaTableBuilder::default();
        for group in &self.groups {
            builder = builder.group(&*group.name, group.quota);
        }
        for class in EndpointClass::ALL {
            if let Some(group) = self.group_of(class) {
                builder = builder.class(class, group.name());
            }
        }
        builder
    }

    /// Together's published limits for one key: chat and completions 600 requests a minute,
    /// embeddings 300, image generation 60, three fine-tune creates and ten batch creates in
    /// flight. Every rate has a burst of 1. Other classes are not limited.
    pub fn together_defaults() -> Self {
        Self::chat_tier(ChatTier::Tier1)
    }

    /// [`QuotaTable::together_defaults`] with the chat group at `tier`'s request rate.
    pub fn chat_tier(tier: ChatTier) -> Self {
        Self::builder()
            .group(
                "chat",
                GroupQuota::rate(Rate::per_minute(tier.requests_per_minute())),
            )
            .group("embeddings", GroupQuota::rate(Rate::per_minute(300)))
            .group("images", GroupQuota::rate(Rate::per_minute(60)))
            .group("fine-tune-create", GroupQuota::concurrency(3))
            .group("batch-create", GroupQuota::concurrency(10))
            .class(EndpointClass::Chat, "chat")
            .class(EndpointClass::Completions, "chat")
            .class(EndpointClass::Embeddings, "embeddings")
            .class(EndpointClass::Images, "images")
            .class(EndpointClass::FineTuneCreate, "fine-tune-create")
            .class(EndpointClass::BatchCreate, "batch-create")
            .build()
            .expect("the built-in table is valid")
    }

    /// A table that limits nothing.
    pub fn unlimited() -> Self {
        Self {
            groups: Vec::new(),
            by_class: [None; EndpointClass::ALL.len()],
        }
    }

    /// The group a class belongs to, if it is limited.
    pub fn group_of(&self, class: EndpointClass) -> Option<&Group> {
        self.group_id(class).map(|id| self.group(id))
    }

    /// The groups, in the order they were defined.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter()
    }

    pub(crate) fn group_id(&self, class: EndpointClass) -> Option<GroupId> {
        self.by_class[class.index()]
    }

    pub(crate) fn group(&self, id: GroupId) -> &Group {
        &self.groups[usize::from(id.0)]
    }

    /// Loads a table from TOML.
    ///
    /// ```toml
    /// # Optional: start from Together's defaults at a chat tier (free, tier-1 ... tier-5).
    /// preset = "tier-2"
    ///
    /// [groups.chat]          # adds a group, or replaces the preset's group of that name
    /// rate = "1800/min"      # requests per s, min or h
    /// burst = 5              # optional, default 1
    ///
    /// [groups.fine-tune-create]
    /// concurrency = 3
    ///
    /// [classes]              # endpoint class = group name
    /// chat = "chat"
    /// completions = "chat"
    /// ```
    #[cfg(feature = "serde")]
    pub fn from_toml(text: &str) -> Result<Self, QuotaError> {
        let file: file::QuotaFile = toml::from_str(text)
            .map_err(|error| QuotaError::new("", Problem::Syntax(error.to_string())))?;
        file.into_table()
    }
}

impl Default for QuotaTable {
    fn default() -> Self {
        Self::together_defaults()
    }
}

/// Builds a [`QuotaTable`]; [`QuotaTableBuilder::build`] validates it.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct QuotaTableBuilder {
    groups: Vec<(String, GroupQuota)>,
    classes: Vec<(EndpointClass, String)>,
}

impl QuotaTableBuilder {
    /// Adds a group, or replaces the limits of the group of that name.
    pub fn group(mut self, name: impl Into<String>, quota: GroupQuota) -> Self {
        let name = name.into();
        match self
            .groups
            .iter_mut()
            .find(|(existing, _)| *existing == name)
        {
            Some((_, existing)) => *existing = quota,
            None => self.groups.push((name, quota)),
        }
        self
    }

    /// Puts a class in a group, replacing any group it was in.
    pub fn class(mut self, class: EndpointClass, group: impl Into<String>) -> Self {
        let group = group.into();
        match self
            .classes
            .iter_mut()
            .find(|(existing, _)| *existing == class)
        {
            Some((_, existing)) => *existing = group,
            None => self.classes.push((class, group)),
        }
        self
    }

    /// Takes a class out of every group, so it is not limited.
    pub fn unlimited(mut self, class: EndpointClass) -> Self {
        self.classes.retain(|(existing, _)| *existing != class);
        self
    }

    /// Checks every group and class and builds the table.
    pub fn build(self) -> Result<QuotaTable, QuotaError> {
        if self.groups.len() > usize::from(u16::MAX) {
            return Err(QuotaError::new(
                "",
                Problem::TooManyGroups(self.groups.len()),
            ));
        }
        let mut groups = Vec::with_capacity(self.groups.len());
        for (name, quota) in self.groups {
            let governor_quota = quota.rate.map(|rate| rate.validate(&name)).transpose()?;
            match quota.concurrency {
                Some(0) => return Err(QuotaError::new(&name, Problem::ZeroConcurrency)),
                None if quota.rate.is_none() => {
                    return Err(QuotaError::new(&name, Problem::NoLimit));
                }
                _ => {}
            }
            groups.push(Group {
                name: name.into(),
                quota,
                governor_quota,
            });
        }
        let mut by_class = [None; EndpointClass::ALL.len()];
        for (class, group_name) in self.classes {
            let index = groups
                .iter()
                .position(|group| *group.name == *group_name)
                .ok_or_else(|| QuotaError::new(&group_name, Problem::UnknownGroup(class)))?;
            // The length was checked against u16::MAX above.
            by_class[class.index()] = Some(GroupId(index as u16));
        }
        Ok(QuotaTable { groups, by_class })
    }
}

/// A quota table that cannot be used, and what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaError {
    group: String,
    problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    ZeroRate,
    ZeroBurst,
    BurstExceedsRate(Rate),
    RateTooFine(Rate),
    ToleranceTooLarge(Rate),
    ZeroConcurrency,
    NoLimit,
    UnknownGroup(EndpointClass),
    TooManyGroups(usize),
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    UnknownClass(UnknownClass),
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    InvalidRate(String),
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    UnknownPreset(String),
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    Syntax(String),
}

impl QuotaError {
    fn new(group: &str, problem: Problem) -> Self {
        Self {
            group: group.to_owned(),
            problem,
        }
    }

    /// The group the problem is in, or `""` when it is not about one group.
    pub fn group(&self) -> &str {
        &self.group
    }
}

impl fmt::Display for QuotaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = &self.group;
        match &self.problem {
            Problem::ZeroRate => write!(
                f,
                "group {group:?}: the rate allows no requests; give it at least 1 request per non-zero period"
            ),
            Problem::ZeroBurst => write!(f, "group {group:?}: burst is 0; it must be at least 1"),
            Problem::BurstExceedsRate(rate) => write!(
                f,
                "group {group:?}: burst {} is more than the {} requests allowed per {:?}; lower the burst to at most {}",
                rate.burst, rate.requests, rate.period, rate.requests
            ),
            Problem::RateTooFine(rate) => write!(
                f,
                "group {group:?}: {} requests per {:?} is more than one per nanosecond; use a lower rate",
                rate.requests, rate.period
            ),
            Problem::ToleranceTooLarge(rate) => write!(
                f,
                "group {group:?}: a tolerance of {:?} is not below one interval ({:?}); lower it, or raise the burst for whole requests",
                rate.tolerance(),
                rate.interval()
            ),
            Problem::ZeroConcurrency => write!(
                f,
                "group {group:?}: concurrency is 0; it must be at least 1, or left out"
            ),
            Problem::NoLimit => write!(
                f,
                "group {group:?} has neither a rate nor a concurrency limit; give it one, or leave its classes unlimited"
            ),
            Problem::UnknownGroup(class) => write!(
                f,
                "class {class} is put in group {group:?}, which is not defined; define the group or fix its name"
            ),
            Problem::TooManyGroups(count) => write!(
                f,
                "{count} groups is more than the {} a table can hold",
                u16::MAX
            ),
            Problem::UnknownClass(unknown) => write!(f, "{unknown}"),
            Problem::InvalidRate(text) => write!(
                f,
                "group {group:?}: rate {text:?} is not of the form N/s, N/min or N/h"
            ),
            Problem::UnknownPreset(name) => write!(
                f,
                "unknown preset {name:?}; expected one of free, tier-1, tier-2, tier-3, tier-4, tier-5"
            ),
            Problem::Syntax(message) => write!(f, "invalid quota file: {}", message.trim_end()),
        }
    }
}

impl std::error::Error for QuotaError {}

#[cfg(feature = "serde")]
mod file {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::{ChatTier, GroupQuota, Problem, QuotaError, QuotaTable, Rate};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct QuotaFile {
        preset: Option<String>,
        #[serde(default)]
        groups: BTreeMap<String, GroupEntry>,
        #[serde(default)]
        classes: BTreeMap<String, String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct GroupEntry {
        rate: Option<String>,
        burst: Option<u32>,
        concurrency: Option<u32>,
    }

    impl QuotaFile {
        pub(super) fn into_table(self) -> Result<QuotaTable, QuotaError> {
            let mut builder = match self.preset {
                None => QuotaTable::builder(),
                Some(name) => ChatTier::ALL
                    .into_iter()
                    .find(|tier| tier.as_str() == name)
                    .map(|tier| QuotaTable::chat_tier(tier).to_builder())
                    .ok_or_else(|| QuotaError::new("", Problem::UnknownPreset(name)))?,
            };
            for (name, entry) in self.groups {
                let rate = match entry.rate {
                    Some(text) => {
                        let rate = Rate::parse(&text)
                            .ok_or_else(|| QuotaError::new(&name, Problem::InvalidRate(text)))?;
                        Some(rate.with_burst(entry.burst.unwrap_or(1)))
                    }
                    None => None,
                };
                let quota = GroupQuota {
                    rate,
                    concurrency: entry.concurrency,
                };
                builder = builder.group(name, quota);
            }
            for (class, group) in self.classes {
                let class = class
                    .parse()
                    .map_err(|unknown| QuotaError::new(&group, Problem::UnknownClass(unknown)))?;
                builder = builder.class(class, group);
            }
            builder.build()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate_of(table: &QuotaTable, class: EndpointClass) -> Option<Rate> {
        table.group_of(class).and_then(Group::rate)
    }

    #[test]
    fn defaults_are_the_published_table() {
        let table = QuotaTable::together_defaults();
        assert_eq!(
            rate_of(&table, EndpointClass::Chat),
            Some(Rate::per_minute(600))
        );
        assert_eq!(
            rate_of(&table, EndpointClass::Completions),
            Some(Rate::per_minute(600))
        );
        assert_eq!(
            rate_of(&table, EndpointClass::Embeddings),
            Some(Rate::per_minute(300))
        );
        assert_eq!(
            rate_of(&table, EndpointClass::Images),
            Some(Rate::per_minute(60))
        );
        let fine_tune = table.group_of(EndpointClass::FineTuneCreate).unwrap();
        assert_eq!((fine_tune.rate(), fine_tune.concurrency()), (None, Some(3)));
        let batch = table.group_of(EndpointClass::BatchCreate).unwrap();
        assert_eq!((batch.rate(), batch.concurrency()), (None, Some(10)));
        for class in [
            EndpointClass::Models,
            EndpointClass::Files,
            EndpointClass::Other,
        ] {
            assert!(table.group_of(class).is_none(), "{class}");
        }
        // Chat and completions share one group, so one bucket.
        assert_eq!(
            table.group_id(EndpointClass::Chat),
            table.group_id(EndpointClass::Completions)
        );
        let quota = table
            .group_of(EndpointClass::Chat)
            .unwrap()
            .governor_quota()
            .unwrap();
        assert_eq!(quota.replenish_interval(), Duration::from_millis(100));
        assert_eq!(quota.burst_size().get(), 1);
    }

    #[test]
    fn chat_tiers_change_only_the_chat_rate() {
        let expected = [60, 600, 1_800, 3_000, 4_500, 6_000];
        for (tier, requests) in ChatTier::ALL.into_iter().zip(expected) {
            let table = QuotaTable::chat_tier(tier);
            assert_eq!(
                rate_of(&table, EndpointClass::Chat),
                Some(Rate::per_minute(requests))
            );
            assert_eq!(
                rate_of(&table, EndpointClass::Embeddings),
                Some(Rate::per_minute(300))
            );
        }
        assert_eq!(ChatTier::Tier3.tokens_per_minute(), 500_000);
    }

    #[test]
    fn invalid_tables_say_what_to_fix() {
        let build = |quota| {
            QuotaTable::builder()
                .group("g", quota)
                .build()
                .unwrap_err()
                .to_string()
        };
        assert!(build(GroupQuota::rate(Rate::per_second(0))).contains("at least 1 request"));
        assert!(
            build(GroupQuota::rate(Rate::new(5, Duration::ZERO))).contains("at least 1 request")
        );
        assert!(build(GroupQuota::rate(Rate::per_second(5).with_burst(0))).contains("burst is 0"));
        let message = build(GroupQuota::rate(Rate::per_second(5).with_burst(6)));
        assert!(
            message.contains("burst 6") && message.contains("at most 5"),
            "{message}"
        );
        let message = build(GroupQuota::rate(Rate::new(10, Duration::from_nanos(1))));
        assert!(message.contains("per nanosecond"), "{message}");
        assert!(build(GroupQuota::concurrency(0)).contains("concurrency is 0"));
        let tolerant = Rate::per_second(10).with_tolerance(Duration::from_millis(100));
        assert!(build(GroupQuota::rate(tolerant)).contains("not below one interval"));
        let no_limit = GroupQuota {
            rate: None,
            concurrency: None,
        };
        assert!(build(no_limit).contains("neither a rate nor a concurrency"));

        let error = QuotaTable::builder()
            .group("chat", GroupQuota::rate(Rate::per_second(1)))
            .class(EndpointClass::Chat, "caht")
            .build()
            .unwrap_err();
        assert_eq!(error.group(), "caht");
        assert!(
            error
                .to_string()
                .contains("class chat is put in group \"caht\""),
            "{error}"
        );
    }

    #[test]
    fn builders_replace_and_remove() {
        let table = QuotaTable::together_defaults()
            .to_builder()
            .group("chat", GroupQuota::rate(Rate::per_second(2)))
            .class(EndpointClass::Rerank, "chat")
            .unlimited(EndpointClass::Images)
            .build()
            .unwrap();
        assert_eq!(
            rate_of(&table, EndpointClass::Chat),
            Some(Rate::per_second(2))
        );
        assert_eq!(
            rate_of(&table, EndpointClass::Rerank),
            Some(Rate::per_second(2))
        );
        assert!(table.group_of(EndpointClass::Images).is_none());
        assert_eq!(table.groups().count(), 5);
        assert!(
            QuotaTable::unlimited()
                .group_of(EndpointClass::Chat)
                .is_none()
        );
    }

    #[test]
    fn rates_print_readably() {
        assert_eq!(Rate::per_minute(600).to_string(), "600/min (burst 1)");
        assert_eq!(
            Rate::per_second(10).with_burst(3).to_string(),
            "10/s (burst 3)"
        );
        assert_eq!(
            Rate::new(5, Duration::from_secs(2)).to_string(),
            "5 per 2s (burst 1)"
        );
        assert_eq!(Rate::per_minute(600).tolerance(), Duration::from_millis(2));
        assert_eq!(
            Rate::per_minute(600).refill_time(),
            Duration::from_millis(102)
        );
        assert_eq!(
            Rate::per_second(1_000).tolerance(),
            Duration::from_micros(500)
        );
        let exact = Rate::per_minute(600).with_tolerance(Duration::ZERO);
        assert_eq!(exact.refill_time(), Duration::from_millis(100));
    }

    #[cfg(feature = "serde")]
    mod toml_files {
        use super::*;

        #[test]
        fn a_file_builds_the_table_it_describes() {
            let table = QuotaTable::from_toml(
                r#"
                [groups.llm]
                rate = "20/s"
                burst = 4
                [groups.jobs]
                concurrency = 2
                rate = "10/min"
                [classes]
                chat = "llm"
                completions = "llm"
                fine-tune-create = "jobs"
                "#,
            )
            .unwrap();
            assert_eq!(
                rate_of(&table, EndpointClass::Completions),
                Some(Rate::per_second(20).with_burst(4))
            );
            let jobs = table.group_of(EndpointClass::FineTuneCreate).unwrap();
            assert_eq!(
                (jobs.rate(), jobs.concurrency()),
                (Some(Rate::per_minute(10)), Some(2))
            );
            assert!(table.group_of(EndpointClass::Embeddings).is_none());
        }

        #[test]
        fn a_preset_is_a_starting_point() {
            let table = QuotaTable::from_toml(
                r#"
                preset = "tier-2"
                [groups.images]
                rate = "120/h"
                "#,
            )
            .unwrap();
            assert_eq!(
                rate_of(&table, EndpointClass::Chat),
                Some(Rate::per_minute(1_800))
            );
            assert_eq!(
                rate_of(&table, EndpointClass::Images),
                Some(Rate::per_hour(120))
            );
            assert_eq!(
                rate_of(&table, EndpointClass::Embeddings),
                Some(Rate::per_minute(300))
            );
        }

        #[test]
        fn bad_files_are_typed_errors_that_name_the_problem() {
            let error = |text: &str| QuotaTable::from_toml(text).unwrap_err().to_string();
            let message = error("[classes]\nchats = \"chat\"\n[groups.chat]\nrate = \"1/s\"");
            assert!(
                message.contains("unknown endpoint class \"chats\""),
                "{message}"
            );
            assert!(error("[groups.chat]\nrate = \"ten/s\"").contains("not of the form"));
            assert!(error("[groups.chat]\nrate = \"10/fortnight\"").contains("not of the form"));
            assert!(error("[groups.chat]\nrate = \"0/s\"").contains("at least 1 request"));
            assert!(error("[groups.chat]\nrate = \"5/s\"\nburst = 9").contains("at most 5"));
            assert!(error("preset = \"tier-9\"").contains("unknown preset \"tier-9\""));
            assert!(
                error("[groups.chat]\nrate = \"1/s\"\nbrust = 2").contains("invalid quota file")
            );
            assert!(error("[groups.chat]\nrate = \"-1/s\"").contains("not of the form"));
            assert!(error("not toml at all [").contains("invalid quota file"));
            assert!(error("[groups.chat]\nburst = -3").contains("invalid quota file"));
        }
    }
}
