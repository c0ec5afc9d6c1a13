//! Who may call through the proxy, and with which key it calls Together.
//!
//! - **Pass-through**: each client's `Authorization` goes upstream as it came, and the limits
//!   pace each key in its own buckets (they know keys by fingerprint only).
//! - **Managed**: clients present keys the configuration gives to tenants; the proxy checks
//!   the key, drops it, and calls upstream with its own key, which never leaves the process
//!   except in the `Authorization` header of its upstream calls. The request carries its
//!   tenant's [`Tenant`] and [`Priority`] as extensions, so the limits share the proxy's one
//!   quota between tenants by weight.

use std::collections::HashMap;
use std::fmt;

use http::header::{AUTHORIZATION, HeaderValue};
use http::request::Parts;
use together_tower::key::{ApiKeyId, CREDENTIAL_HEADERS, KeyHasher, bearer_token};
use together_tower::limit::{Priority, Tenant};

use super::config::TenantConfig;
use crate::target::ApiKey;

/// How the proxy holds keys.
pub enum Access {
    /// Each client's key goes upstream.
    PassThrough,
    /// Clients present tenants' keys; the proxy calls upstream with its own.
    Managed(Managed),
}

/// The tenants' keys, and the proxy's own key.
pub struct Managed {
    upstream: HeaderValue,
    hasher: KeyHasher,
    /// Keys by fingerprint; the key itself is compared too, in constant time.
    keys: HashMap<ApiKeyId, Vec<TenantKey>>,
    tenants: Vec<Caller>,
}

/// A key, and the index of the tenant it is given to.
type TenantKey = (Box<[u8]>, usize);

/// The tenant a managed request is for.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Its tenant, for the limits' fair shares.
    pub tenant: Tenant,
    /// Its priority.
    pub priority: Priority,
}

/// A request whose key the proxy does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownKey;

impl Access {
    /// Managed access: `tenants` present their keys, and `upstream` is sent to Together.
    pub fn managed(upstream: &ApiKey, tenants: &[TenantConfig]) -> Result<Self, String> {
        let mut upstream = HeaderValue::try_from(format!("Bearer {}", upstream.expose()))
            .map_err(|_| "the API key has characters a header cannot carry".to_owned())?;
        upstream.set_sensitive(true);
        let hasher = KeyHasher::with_secret(fastrand::u128(..).to_le_bytes());
        let mut keys: HashMap<ApiKeyId, Vec<TenantKey>> = HashMap::new();
        for (index, tenant) in tenants.iter().enumerate() {
            for key in &tenant.keys {
                let entry = (Box::from(key.as_bytes()), index);
                keys.entry(hasher.fingerprint(key.as_bytes()))
                    .or_default()
                    .push(entry);
            }
        }
        let tenants = tenants
            .iter()
            .map(|tenant| Caller {
                tenant: Tenant::new(&tenant.name),
                priority: tenant.priority,
            })
            .collect();
        Ok(Self::Managed(Managed {
            upstream,
            hasher,
            keys,
            tenants,
        }))
    }

    /// Checks a request's key and, in managed mode, swaps it for the proxy's own: the
    /// caller's tenant, or `None` in pass-through mode.
    pub fn admit(&self, parts: &mut Parts) -> Result<Option<Caller>, UnknownKey> {
        match self {
            Access::PassThrough => Ok(None),
            Access::Managed(managed) => {
                let caller = managed.caller(&parts.headers).ok_or(UnknownKey)?;
                // The tenant's credentials stay here, whichever header carried them.
                for name in &CREDENTIAL_HEADERS {
                    parts.headers.remove(name);
                }
                parts
                    .headers
                    .insert(AUTHORIZATION, managed.upstream.clone());
                Ok(Some(caller.clone()))
            }
        }
    }

    /// Says how keys are held, for the start line.
    pub fn describe(&self) -> String {
        match self {
            Access::PassThrough => "pass-through keys: each client's own key goes upstream".into(),
            Access::Managed(managed) => format!(
                "managed keys: {} tenants present their keys, the proxy calls with its own",
                managed.tenants.len()
            ),
        }
    }
}

impl Managed {
    fn caller(&self, headers: &http::HeaderMap) -> Option<&Caller> {
        let key = bearer_token(headers)?;
        let candidates = self.keys.get(&self.hasher.fingerprint(key))?;
        let (_, index) = candidates.iter().find(|(known, _)| same_key(known, key))?;
        self.tenants.get(*index)
    }
}

/// Compares two keys in time that depends on their lengths only.
fn same_key(known: &[u8], given: &[u8]) -> bool {
    known.len() == given.len()
        && known
            .iter()
            .zip(given)
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

impl fmt::Debug for Managed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Managed")
            .field("tenants", &self.tenants)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, keys: &[&str], priority: Priority) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            keys: keys.iter().map(|key| (*key).to_owned()).collect(),
            weight: 1,
            priority,
            cap: None,
        }
    }

    fn parts(authorization: Option<&str>) -> Parts {
        let mut request = http::Request::post("/v1/chat/completions");
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_tenant_key_is_swapped_for_the_proxy_key() {
        let access = Access::managed(
            &"upstream-secret".parse().unwrap(),
            &[
                tenant("search", &["k-search"], Priority::Interactive),
                tenant("batch", &["k-batch-1", "k-batch-2"], Priority::Background),
            ],
        )
        .unwrap();
        let mut request = parts(Some("Bearer k-batch-2"));
        request
            .headers
            .insert("x-api-key", "k-batch-2".parse().unwrap());
        request
            .headers
            .insert("cookie", "session=k-batch-2".parse().unwrap());
        let caller = access.admit(&mut request).unwrap().unwrap();
        let sent: Vec<_> = request.headers.values().collect();
        assert!(!format!("{sent:?}").contains("k-batch"), "{sent:?}");
        assert_eq!(caller.tenant.name(), "batch");
        assert_eq!(caller.priority, Priority::Background);
        assert_eq!(request.headers[AUTHORIZATION], "Bearer upstream-secret");
        assert!(request.headers[AUTHORIZATION].is_sensitive());
        assert!(!format!("{access:?}").contains("secret"));
    }

    #[test]
    fn unknown_and_missing_keys_are_refused() {
        let access = Access::managed(
            &"upstream".parse().unwrap(),
            &[tenant("a", &["k-a"], Priority::Normal)],
        )
        .unwrap();
        for header in [
            None,
            Some("Bearer k-b"),
            Some("Bearer k-a2"),
            Some("Basic k-a"),
        ] {
            let mut request = parts(header);
            assert_eq!(
                access.admit(&mut request).unwrap_err(),
                UnknownKey,
                "{header:?}"
            );
            // A refused request is not given the proxy's key.
            let sent = request.headers.get(AUTHORIZATION);
            assert_eq!(sent.map(|value| value.to_str().unwrap()), header);
        }
    }

    #[test]
    fn pass_through_leaves_the_key() {
        let mut request = parts(Some("Bearer client-key"));
        assert!(Access::PassThrough.admit(&mut request).unwrap().is_none());
        assert_eq!(request.headers[AUTHORIZATION], "Bearer client-key");
    }
}
