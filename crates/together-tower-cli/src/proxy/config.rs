//! The proxy's configuration file: the quota table and the tenants, checked at start, with
//! errors that name the file and the line.
//!
//! ```toml
//! # Optional: the library's quota table (Together's defaults without it).
//! [quota]
//! preset = "tier-2"
//! [quota.groups.chat]
//! rate = "6000/min"
//!
//! # Managed keys: the keys each tenant's clients present, and how its requests share the
//! # proxy's quota.
//! [tenants.search]
//! keys = ["sk-search-1", "sk-search-2"]
//! weight = 2                 # optional, default 1
//! priority = "interactive"   # optional: interactive, normal (default) or background
//! cap = "20/s"               # optional: a rate ("N/s", "N/min", "N/h") or a share ("50%")
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use together_tower::limit::{Priority, TenantCap};
use together_tower::quota::{QuotaTable, Rate};
use toml::Spanned;

/// The largest configuration file read: a real one is a few kilobytes.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The longest tenant name: it is a metric label and a log field.
const MAX_TENANT_NAME: usize = 64;

/// A configuration that cannot be used: where, and what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    file: PathBuf,
    line: Option<usize>,
    message: String,
}

impl ConfigError {
    fn at(file: &Path, text: &str, span: Option<Range<usize>>, message: String) -> Self {
        Self {
            file: file.to_owned(),
            line: span.map(|span| line_of(text, span.start)),
            message,
        }
    }

    /// The line the problem is on, counted from 1, when it is on one.
    pub fn line(&self) -> Option<usize> {
        self.line
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The line, counted from 1, that byte `offset` of `text` is on.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// One tenant of a managed proxy.
#[derive(Clone, PartialEq)]
pub struct TenantConfig {
    /// Its name, as logs, metrics and the limits' fair shares know it.
    pub name: String,
    /// The keys its clients present. Never printed.
    pub keys: Vec<String>,
    /// Its weight among the tenants waiting in a bucket.
    pub weight: u32,
    /// The priority of its requests.
    pub priority: Priority,
    /// The most of each bucket it may take, even alone.
    pub cap: Option<TenantCap>,
}

impl fmt::Debug for TenantConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantConfig")
            .field("name", &self.name)
            .field("keys", &format_args!("<{} hidden>", self.keys.len()))
            .field("weight", &self.weight)
            .field("priority", &self.priority)
            .field("cap", &self.cap)
            .finish()
    }
}

/// What a configuration file sets.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// Its quota table, if it has a `[quota]` part.
    pub quota: Option<QuotaTable>,
    /// Its tenants, by name.
    pub tenants: Vec<TenantConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    quota: Option<Spanned<toml::Table>>,
    #[serde(default)]
    tenants: BTreeMap<String, Spanned<TenantEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    keys: Spanned<Vec<Spanned<String>>>,
    weight: Option<Spanned<u32>>,
    priority: Option<Spanned<String>>,
    cap: Option<Spanned<String>>,
}

/// Where each quota group starts, to name the line of a group's error.
#[derive(Deserialize, Default)]
struct GroupSpans {
    #[serde(default)]
    groups: BTreeMap<String, Spanned<toml::Value>>,
}

impl ProxyConfig {
    /// Reads and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::parse(path, &text)
    }

    /// Checks configuration `text`, read from `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|error| syntax(path, text, &error))?;
        let quota = match &file.quota {
            Some(quota) => Some(quota_part(path, text, quota)?),
            None => None,
        };
        let mut tenants = Vec::new();
        let mut seen_keys = HashSet::new();
        for (name, entry) in &file.tenants {
            tenants.push(tenant(path, text, name, entry, &mut seen_keys)?);
        }
        Ok(Self { quota, tenants })
    }
}

/// Reads a quota file given with `--quota`, naming the line of a group's error.
pub fn load_quota_file(path: &Path) -> Result<QuotaTable, ConfigError> {
    let text = read(path)?;
    QuotaTable::from_toml(&text).map_err(|error| {
        let span = group_span(&text, Part::Whole, error.group());
        ConfigError::at(path, &text, span, error.to_string())
    })
}

fn read(path: &Path) -> Result<String, ConfigError> {
    let unreadable = |why: String| ConfigError {
        file: path.to_owned(),
        line: None,
        message: why,
    };
    let size = std::fs::metadata(path)
        .map_err(|error| unreadable(format!("cannot read it: {error}")))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(unreadable(format!(
            "{size} bytes is more than the {MAX_FILE_BYTES} a configuration file may be"
        )));
    }
    std::fs::read_to_string(path).map_err(|error| unreadable(format!("cannot read it: {error}")))
}

/// A TOML error: its own message names the line, but as a paragraph; ours is one line.
fn syntax(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error
        .message()
        .lines()
        .next()
        .unwrap_or("invalid TOML")
        .to_owned();
    ConfigError::at(path, text, error.span(), message)
}

/// The `[quota]` part, read by the library as a quota file of its own.
fn quota_part(
    path: &Path,
    text: &str,
    quota: &Spanned<toml::Table>,
) -> Result<QuotaTable, ConfigError> {
    let part = toml::to_string(quota.get_ref()).map_err(|error| {
        ConfigError::at(path, text, Some(quota.span()), format!("[quota]: {error}"))
    })?;
    QuotaTable::from_toml(&part).map_err(|error| {
        let groups = quota
            .get_ref()
            .get("groups")
            .and_then(|groups| groups.as_table());
        let in_group = groups.is_some_and(|groups| groups.contains_key(error.group()));
        // A group's error names its line; any other, the `[quota]` line.
        let span = in_group
            .then(|| group_span(text, Part::Quota, error.group()))
            .flatten()
            .unwrap_or(quota.span());
        ConfigError::at(path, text, Some(span), format!("[quota]: {error}"))
    })
}

/// Where a quota table's groups are: the whole file (`--quota`), or its `[quota]` part.
#[derive(Clone, Copy)]
enum Part {
    Whole,
    Quota,
}

/// Where group `group` starts in `text` (`[groups.NAME]`, or `[quota.groups.NAME]`).
fn group_span(text: &str, part: Part, group: &str) -> Option<Range<usize>> {
    #[derive(Deserialize, Default)]
    struct InConfig {
        #[serde(default)]
        quota: GroupSpans,
    }
    let spans = match part {
        Part::Whole => toml::from_str::<GroupSpans>(text).ok()?,
        Part::Quota => toml::from_str::<InConfig>(text).ok()?.quota,
    };
    spans.groups.get(group).map(Spanned::span)
}

fn tenant(
    path: &Path,
    text: &str,
    name: &str,
    entry: &Spanned<TenantEntry>,
    seen_keys: &mut HashSet<String>,
) -> Result<TenantConfig, ConfigError> {
    let error = |span: Range<usize>, message: String| {
        ConfigError::at(
            path,
            text,
            Some(span),
            format!("tenant {name:?}: {message}"),
        )
    };
    if name.is_empty() || name.len() > MAX_TENANT_NAME {
        return Err(error(
            entry.span(),
            format!("a tenant's name must be 1 to {MAX_TENANT_NAME} bytes"),
        ));
    }
    let body = entry.get_ref();
    if body.keys.get_ref().is_empty() {
        return Err(error(body.keys.span(), "give it at least one key".into()));
    }
    let mut keys = Vec::new();
    for key in body.keys.get_ref() {
        let value = key.get_ref().trim();
        if value.is_empty() || value.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(error(
                key.span(),
                "a key must be printable ASCII without spaces".into(),
            ));
        }
        // The message never quotes a key.
        if !seen_keys.insert(value.to_owned()) {
            return Err(error(
                key.span(),
                "this key is already given to a tenant; each key names one tenant".into(),
            ));
        }
        keys.push(value.to_owned());
    }
    let weight = match &body.weight {
        Some(weight) if *weight.get_ref() == 0 => {
            return Err(error(weight.span(), "weight must be at least 1".into()));
        }
        Some(weight) => *weight.get_ref(),
        None => 1,
    };
    let priority = match &body.priority {
        Some(priority) => parse_priority(priority.get_ref()).ok_or_else(|| {
            error(
                priority.span(),
                format!(
                    "unknown priority {:?}; expected interactive, normal or background",
                    priority.get_ref()
                ),
            )
        })?,
        None => Priority::Normal,
    };
    let cap = match &body.cap {
        Some(cap) => Some(parse_cap(cap.get_ref()).map_err(|why| error(cap.span(), why))?),
        None => None,
    };
    Ok(TenantConfig {
        name: name.to_owned(),
        keys,
        weight,
        priority,
        cap,
    })
}

fn parse_priority(text: &str) -> Option<Priority> {
    Priority::ALL
        .into_iter()
        .find(|priority| priority.as_str() == text)
}

/// `"N/s"`, `"N/min"`, `"N/h"` or `"P%"`.
fn parse_cap(text: &str) -> Result<TenantCap, String> {
    if let Some(percent) = text.trim().strip_suffix('%') {
        return match percent.trim().parse::<f64>() {
            Ok(share) if (0.0..=100.0).contains(&share) => Ok(TenantCap::Share(share / 100.0)),
            _ => Err(format!("cap {text:?}: a share must be between 0% and 100%")),
        };
    }
    text.parse::<Rate>()
        .map(TenantCap::Rate)
        .map_err(|error| format!("cap: {error}, or as a share such as \"50%\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::parse(Path::new("proxy.toml"), text)
    }

    #[test]
    fn a_whole_file_reads() {
        let config = parse(
            r#"
[quota]
preset = "tier-2"
[quota.groups.chat]
rate = "6000/min"

[tenants.search]
keys = ["sk-search-1", "sk-search-2"]
weight = 2
priority = "interactive"
cap = "50%"

[tenants.batch]
keys = ["sk-batch"]
cap = "20/s"
"#,
        )
        .unwrap();
        let chat = config
            .quota
            .as_ref()
            .unwrap()
            .group_of(together_tower::classify::EndpointClass::Chat)
            .unwrap()
            .rate()
            .unwrap();
        assert_eq!(chat.amount(), 6000);
        let [batch, search] = config.tenants.as_slice() else {
            panic!("two tenants")
        };
        assert_eq!(search.weight, 2);
        assert_eq!(search.priority, Priority::Interactive);
        assert_eq!(search.cap, Some(TenantCap::Share(0.5)));
        assert_eq!(batch.cap, Some(TenantCap::Rate(Rate::per_second(20))));
        assert_eq!(batch.priority, Priority::Normal);
        assert!(!format!("{config:?}").contains("sk-"));
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "[tenants.a]\nkeys = [\"k\"]\nweight = 0\n",
                3,
                "weight must be at least 1",
            ),
            (
                "[tenants.a]\nkeys = [\"k\"]\npriority = \"urgent\"\n",
                3,
                "unknown priority",
            ),
            (
                "[tenants.a]\nkeys = [\"k\"]\n\n[tenants.b]\nkeys = [\"j\", \"k\"]\n",
                5,
                "already given",
            ),
            ("[tenants.a]\nkeys = []\n", 2, "at least one key"),
            (
                "[tenants.a]\nkeys = [\"k\"]\ncap = \"fast\"\n",
                3,
                "not a rate",
            ),
            (
                "[tenants.a]\nkeys = [\"k\"]\ncolour = \"red\"\n",
                3,
                "unknown field",
            ),
            (
                "[quota]\n[quota.groups.chat]\nrate = \"0/min\"\n",
                2,
                "allows no requests",
            ),
            ("[quota]\npreset = \"tier-9\"\n", 1, "tier-9"),
            ("[tenants.a\n", 1, ""),
        ];
        for (text, line, words) in cases {
            let error = parse(text).unwrap_err();
            assert_eq!(error.line(), Some(line), "{text:?}: {error}");
            assert!(error.to_string().contains(words), "{text:?}: {error}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("proxy.toml:{line}: "))
            );
        }
    }

    #[test]
    fn a_quota_file_names_the_line_of_its_group() {
        let path = std::env::temp_dir().join(format!("quota-{}.toml", std::process::id()));
        let text = "[classes]\nchat = \"chat\"\n\n[groups.chat]\nrate = \"0/min\"\n";
        std::fs::write(&path, text).unwrap();
        let error = load_quota_file(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(error.line(), Some(4), "{error}");
        assert!(error.to_string().contains("allows no requests"), "{error}");
    }

    #[test]
    fn an_error_never_quotes_a_key() {
        let error = parse("[tenants.a]\nkeys = [\"secret-1\", \"secret-1\"]\n").unwrap_err();
        assert!(!error.to_string().contains("secret-1"), "{error}");
    }
}
