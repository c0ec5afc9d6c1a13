//! Quota tables from TOML.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::error::{Problem, excerpt};
use super::table::MAX_GROUPS;
use super::{ChatTier, GroupQuota, QuotaError, QuotaTable, Rate};

/// The largest quota file read: a real one is a few hundred bytes.
const MAX_FILE_BYTES: usize = 1 << 20;

/// The longest a syntax error's message may be; the TOML parser quotes the offending line,
/// which may be enormous.
const MAX_MESSAGE_CHARS: usize = 400;

// Loading a table from TOML is this file's concern, so the method is here: the table itself
// needs nothing of the file format.
impl QuotaTable {
    /// Loads a table from TOML.
    ///
    /// ```toml
    /// # Optional: start from Together's defaults at a chat tier (free, tier-1 ... tier-5).
    /// preset = "tier-2"
    ///
    /// [groups.chat]          # adds a group, or replaces the preset's group of that name
    /// rate = "1800/min"      # requests per s, min or h
    /// burst = 5              # optional, default 1
    /// tokens = "250000/min"  # optional token budget (prompt plus completion)
    /// token_burst = 8000     # optional, default one second's worth
    /// per_model = true       # optional: each model has buckets of its own (default false)
    ///
    /// [groups.fine-tune-create]
    /// concurrency = 3
    ///
    /// [classes]              # endpoint class = group name
    /// chat = "chat"
    /// completions = "chat"
    /// ```
    ///
    /// A file larger than 1 MiB, or with more than [`MAX_GROUPS`] groups, is refused before
    /// any group is built.
    #[cfg(feature = "toml")]
    pub fn from_toml(text: &str) -> Result<Self, QuotaError> {
        load(text)
    }
}

fn load(text: &str) -> Result<QuotaTable, QuotaError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(QuotaError::new(
            "",
            Problem::TooLarge {
                bytes: text.len(),
                max: MAX_FILE_BYTES,
            },
        ));
    }
    let file: QuotaFile =
        toml::from_str(text).map_err(|error| QuotaError::new("", syntax(&error)))?;
    file.into_table()
}

fn syntax(error: &toml::de::Error) -> Problem {
    let message = error.to_string();
    let message = message.trim_end();
    let message = match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}… (cut)", &message[..end]),
        None => message.to_owned(),
    };
    Problem::Syntax(message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaFile {
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
    tokens: Option<String>,
    token_burst: Option<u32>,
    concurrency: Option<u32>,
    per_model: Option<bool>,
}

impl QuotaFile {
    fn into_table(self) -> Result<QuotaTable, QuotaError> {
        // Before anything is built: a file of many thousand groups is refused at once.
        if self.groups.len() > MAX_GROUPS {
            return Err(QuotaError::new(
                "",
                Problem::TooManyGroups {
                    count: self.groups.len(),
                    max: MAX_GROUPS,
                },
            ));
        }
        let mut builder = match self.preset {
            None => QuotaTable::builder(),
            Some(name) => ChatTier::ALL
                .into_iter()
                .find(|tier| tier.as_str() == name)
                .map(|tier| QuotaTable::chat_tier(tier).to_builder())
                .ok_or_else(|| QuotaError::new("", Problem::UnknownPreset(excerpt(&name))))?,
        };
        for (name, entry) in self.groups {
            let parse = |text: Option<String>, burst: Option<u32>| match text {
                Some(text) => Rate::parse(&text)
                    .map(|rate| Some(rate.with_burst(burst.unwrap_or(1))))
                    .ok_or_else(|| QuotaError::new(&name, Problem::InvalidRate(excerpt(&text)))),
                None => Ok(None),
            };
            let rate = parse(entry.rate, entry.burst)?;
            // A token budget's burst defaults to one second's worth.
            let tokens = parse(entry.tokens, None)?.map(|tokens| {
                let per_second = (tokens.per_second_f64().ceil() as u32).max(1);
                tokens.with_burst(entry.token_burst.unwrap_or(per_second))
            });
            let mut quota = match (rate, tokens, entry.concurrency) {
                (Some(rate), _, _) => GroupQuota::rate(rate),
                (None, Some(tokens), _) => GroupQuota::tokens(tokens),
                (None, None, Some(calls)) => GroupQuota::concurrency(calls),
                (None, None, None) => return Err(QuotaError::new(&name, Problem::NoLimit)),
            };
            if let Some(tokens) = tokens {
                quota = quota.with_tokens(tokens);
            }
            if let Some(calls) = entry.concurrency {
                quota = quota.with_concurrency(calls);
            }
            quota = quota.per_model(entry.per_model.unwrap_or(false));
            builder = builder.group(name, quota);
        }
        for (class, group) in self.classes {
            let class = class
                .parse()
                .map_err(|_| QuotaError::new(&group, Problem::UnknownClass(excerpt(&class))))?;
            builder = builder.class(class, group);
        }
        builder.build()
    }
}
