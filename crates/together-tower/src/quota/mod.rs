//! Quota tables: which endpoint classes share a limit, and what the limit is.
//!
//! A [`QuotaTable`] maps each [`EndpointClass`](crate::classify::EndpointClass) to a quota group (chat and completions share
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
mod error;
#[cfg(feature = "toml")]
mod file;
mod rate;
mod table;
mod tier;

pub use self::error::QuotaError;
pub use self::rate::{InvalidRate, Rate};
pub(crate) use self::table::GroupId;
pub use self::table::{Group, GroupQuota, MAX_GROUPS, QuotaTable, QuotaTableBuilder};
pub use self::tier::ChatTier;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::classify::EndpointClass;

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
        #[cfg(feature = "toml")]
        assert!(
            QuotaTable::from_toml("[groups.g]\nburst = 2")
                .unwrap_err()
                .to_string()
                .contains("neither a rate nor a concurrency")
        );

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
    fn a_builder_holds_up_to_the_bound_and_refuses_more() {
        let mut builder = QuotaTable::builder();
        for i in 0..MAX_GROUPS {
            builder = builder.group(format!("g{i}"), GroupQuota::concurrency(1));
        }
        // Replacing a group by name does not add one.
        builder = builder.group("g0", GroupQuota::rate(Rate::per_second(1)));
        let table = builder
            .clone()
            .class(EndpointClass::Chat, "g0")
            .build()
            .unwrap();
        assert_eq!(table.groups().count(), MAX_GROUPS);
        assert_eq!(
            rate_of(&table, EndpointClass::Chat),
            Some(Rate::per_second(1))
        );
        let error = builder
            .group("one-more", GroupQuota::concurrency(1))
            .build()
            .unwrap_err();
        assert!(error.to_string().contains("more than the 1024"), "{error}");
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

    #[cfg(feature = "toml")]
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

        /// A value of `len` bytes: digits, so it also makes an enormous number.
        fn huge(len: usize) -> String {
            "9".repeat(len)
        }

        #[test]
        fn an_error_about_a_huge_value_quotes_only_an_excerpt() {
            let ten_mb = 10 << 20;
            // Each is over the size bound, so it is refused before it is parsed.
            let cases = [
                format!("[groups.chat]\nrate = \"{}/fortnight\"", huge(ten_mb)),
                format!("preset = \"{}\"", huge(ten_mb)),
                format!("[groups.chat]\nrate = {}", huge(ten_mb)),
            ];
            for text in &cases {
                let message = QuotaTable::from_toml(text).unwrap_err().to_string();
                assert!(
                    message.len() < 300,
                    "{} bytes: {}",
                    message.len(),
                    &message[..300]
                );
            }
            // Under the size bound, each problem still quotes at most an excerpt.
            let big = 200_000;
            let cases = [
                format!("[groups.chat]\nrate = \"{}/fortnight\"", huge(big)),
                format!("preset = \"{}\"", huge(big)),
                format!("[groups.chat]\nrate = {}", huge(big)),
                format!(
                    "[groups.chat]\nrate = \"5/s\"\n[classes]\n{} = \"chat\"",
                    huge(big)
                ),
                format!("[groups.{}]\nrate = \"0/s\"", huge(big)),
                format!("[classes]\nchat = \"{}\"", huge(big)),
                format!("[groups.chat]\nrate = \"5/s\" {}", huge(big)),
            ];
            for text in &cases {
                let error = QuotaTable::from_toml(text).unwrap_err();
                let message = error.to_string();
                assert!(
                    message.len() < 600,
                    "{} bytes: {}",
                    message.len(),
                    &message[..600]
                );
                assert!(error.group().len() < 100);
            }
        }

        #[test]
        fn a_file_over_the_size_bound_is_refused_before_it_is_parsed() {
            let text = format!("# {}\n", "x".repeat(2 << 20));
            let message = QuotaTable::from_toml(&text).unwrap_err().to_string();
            assert!(message.contains("more than the 1048576"), "{message}");
        }

        #[test]
        fn too_many_groups_are_refused_before_they_are_built() {
            let mut text = String::new();
            for i in 0..=MAX_GROUPS {
                text.push_str(&format!("[groups.g{i}]\nconcurrency = 1\n"));
            }
            let message = QuotaTable::from_toml(&text).unwrap_err().to_string();
            assert!(
                message.contains("1025 groups is more than the 1024"),
                "{message}"
            );
        }
    }
}
