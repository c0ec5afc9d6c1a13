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

    /// Chat tokens (prompt plus completion) allowed per minute. The defaults do not budget
    /// tokens; use this with [`GroupQuota::with_tokens`](super::GroupQuota::with_tokens).
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
