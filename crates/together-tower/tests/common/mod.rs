//! What the property tests of this crate share.

#![allow(dead_code)]

use proptest::prelude::ProptestConfig;

/// `cases` cases each, or `PROPTEST_CASES` when it is set, so CI spends a bounded time and a
/// developer can search longer.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(cases),
        ..ProptestConfig::default()
    }
}
