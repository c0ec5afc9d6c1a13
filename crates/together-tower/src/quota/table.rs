use std::collections::HashMap;
use std::sync::Arc;

use super::error::{Problem, QuotaError};
use super::{ChatTier, Rate};
use crate::classify::EndpointClass;

/// The limits of one quota group: a request rate, a token budget, a number of concurrent
/// calls, or any of them together; and whether each model has buckets of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupQuota {
    rate: Option<Rate>,
    tokens: Option<Rate>,
    concurrency: Option<u32>,
    per_model: bool,
}

impl GroupQuota {
    const NONE: Self = Self {
        rate: None,
        tokens: None,
        concurrency: None,
        per_model: false,
    };

    /// A group limited by a request rate.
    pub const fn rate(rate: Rate) -> Self {
        Self::NONE.with_rate(rate)
    }

    /// A group limited to `calls` calls in flight at once, with no rate.
    ///
    /// A slot is held from the request's turn until its answer's body ends, is dropped or
    /// fails: a streamed answer holds it for as long as it streams. For job-creating classes,
    /// a create that succeeded holds it until the job ends (see
    /// [`limit`](crate::limit)).
    pub const fn concurrency(calls: u32) -> Self {
        Self::NONE.with_concurrency(calls)
    }

    /// A group limited by a token budget only.
    pub const fn tokens(tokens: Rate) -> Self {
        Self::NONE.with_tokens(tokens)
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

    /// The same group, also limited to `tokens` (prompt plus completion) per period. Each
    /// request is charged an estimate before it is sent, corrected from the answer's `usage`.
    /// The burst is the most one request may cost, and also bounds the estimates of the
    /// requests in flight: set it to cover them (rate times latency times the overestimate).
    pub const fn with_tokens(mut self, tokens: Rate) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// The same group, with (`true`) or without buckets of its own for each model: each model
    /// then has the whole quota. Requests that name no model share the group's bucket.
    pub const fn per_model(mut self, per_model: bool) -> Self {
        self.per_model = per_model;
        self
    }

    /// The request rate, if any.
    pub const fn rate_limit(&self) -> Option<Rate> {
        self.rate
    }

    /// The token budget, if any.
    pub const fn token_limit(&self) -> Option<Rate> {
        self.tokens
    }

    /// The number of concurrent calls allowed, if limited.
    pub const fn concurrency_limit(&self) -> Option<u32> {
        self.concurrency
    }

    /// Whether each model has buckets of its own.
    pub const fn is_per_model(&self) -> bool {
        self.per_model
    }
}

/// The index of a group in its [`QuotaTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct GroupId(pub(crate) u16);

/// The most groups a [`QuotaTable`] may hold. Together's endpoint table has 13 classes; a
/// thousand groups is far beyond any real configuration, and the bound keeps a hostile file
/// from costing memory and time.
pub const MAX_GROUPS: usize = 1_024;

/// One validated group of a [`QuotaTable`].
#[derive(Debug, Clone)]
pub struct Group {
    name: Arc<str>,
    quota: GroupQuota,
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

    /// The token budget, if the group has one.
    pub fn tokens(&self) -> Option<Rate> {
        self.quota.tokens
    }

    /// The number of concurrent calls allowed, if limited.
    pub fn concurrency(&self) -> Option<u32> {
        self.quota.concurrency
    }

    /// Whether each model has buckets of its own.
    pub fn per_model(&self) -> bool {
        self.quota.per_model
    }

    /// The group's limits.
    pub fn quota(&self) -> GroupQuota {
        self.quota
    }

    /// The rate as a governor quota, if the group has one.
    pub fn governor_quota(&self) -> Option<governor::Quota> {
        self.quota.rate.and_then(|rate| rate.to_quota())
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
    /// flight. Every rate has a burst of 1. Chat, completions, embeddings and images are
    /// limited per model, as Together limits them since 2026. Tokens are not budgeted: add a
    /// token budget with [`GroupQuota::with_tokens`] (see [`ChatTier::tokens_per_minute`]).
    /// Other classes are not limited.
    pub fn together_defaults() -> Self {
        Self::chat_tier(ChatTier::Tier1)
    }

    /// [`QuotaTable::together_defaults`] with the chat group at `tier`'s request rate.
    pub fn chat_tier(tier: ChatTier) -> Self {
        Self::builder()
            .group(
                "chat",
                GroupQuota::rate(Rate::per_minute(tier.requests_per_minute())).per_model(true),
            )
            .group(
                "embeddings",
                GroupQuota::rate(Rate::per_minute(300)).per_model(true),
            )
            .group(
                "images",
                GroupQuota::rate(Rate::per_minute(60)).per_model(true),
            )
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
    // Where each name is in `groups`: adding many groups stays linear.
    index: HashMap<String, usize>,
    classes: [Option<String>; EndpointClass::ALL.len()],
}

impl QuotaTableBuilder {
    /// Adds a group, or replaces the limits of the group of that name.
    pub fn group(mut self, name: impl Into<String>, quota: GroupQuota) -> Self {
        let name = name.into();
        match self.index.get(&name) {
            Some(&at) => self.groups[at].1 = quota,
            None => {
                self.index.insert(name.clone(), self.groups.len());
                self.groups.push((name, quota));
            }
        }
        self
    }

    /// Puts a class in a group, replacing any group it was in.
    pub fn class(mut self, class: EndpointClass, group: impl Into<String>) -> Self {
        self.classes[class.index()] = Some(group.into());
        self
    }

    /// Takes a class out of every group, so it is not limited.
    pub fn unlimited(mut self, class: EndpointClass) -> Self {
        self.classes[class.index()] = None;
        self
    }

    /// Checks every group and class and builds the table. Counts are checked before anything
    /// is built.
    pub fn build(self) -> Result<QuotaTable, QuotaError> {
        if self.groups.len() > MAX_GROUPS {
            return Err(QuotaError::new(
                "",
                Problem::TooManyGroups {
                    count: self.groups.len(),
                    max: MAX_GROUPS,
                },
            ));
        }
        let mut groups = Vec::with_capacity(self.groups.len());
        for (name, quota) in self.groups {
            for rate in [quota.rate, quota.tokens].into_iter().flatten() {
                rate.validate(&name)?;
            }
            match quota.concurrency {
                Some(0) => return Err(QuotaError::new(&name, Problem::ZeroConcurrency)),
                None if quota.rate.is_none() && quota.tokens.is_none() => {
                    return Err(QuotaError::new(&name, Problem::NoLimit));
                }
                _ => {}
            }
            groups.push(Group {
                name: name.into(),
                quota,
            });
        }
        let mut by_class = [None; EndpointClass::ALL.len()];
        for (class, group_name) in EndpointClass::ALL.into_iter().zip(self.classes) {
            let Some(group_name) = group_name else {
                continue;
            };
            let &at = self
                .index
                .get(&group_name)
                .ok_or_else(|| QuotaError::new(&group_name, Problem::UnknownGroup(class)))?;
            // At most MAX_GROUPS, checked above.
            by_class[class.index()] = Some(GroupId(at as u16));
        }
        Ok(QuotaTable { groups, by_class })
    }
}
