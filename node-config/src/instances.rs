//! Instance policy: how many requests one guest instance may serve, how many at once, and how
//! long an idle one is kept. What a function's config (or pushed manifest) asks for is an
//! [`InstanceSetting`]; the node resolves it against the guest's kind into an
//! [`InstancePolicy`], because the defaults and what is possible differ by kind:
//!
//! - a WASI p1 command runs `_start` once, so it always gets a fresh instance;
//! - a `wasi:http` 0.2 component gets a fresh instance per request unless the operator opts in
//!   to reuse (edged's isolation promise), and never serves two requests at once (its handler is
//!   synchronous);
//! - a `wasi:http` 0.3 component follows `wasmtime serve`: up to 128 requests per instance, 16 at
//!   once, dropped after 1 s idle.

use std::time::Duration;

use edged_compiler::GuestKind;

/// Requests one instance may serve at most: past this, reuse buys nothing measurable and a
/// leaking guest has served long enough.
pub const MAX_REQUESTS_PER_INSTANCE: u64 = 1_000_000;
/// Concurrent requests in one p3 instance: they share one store, one memory and one thread.
pub const MAX_CONCURRENT_PER_INSTANCE: u64 = 1024;
/// An idle instance is kept at most this long (it holds a pool slot and its memory).
pub const MAX_IDLE_TIMEOUT_MS: u64 = 3_600_000;

/// `wasmtime serve` 48's defaults for p3 components, which edged follows.
pub const P3_DEFAULT_REQUESTS: u32 = 128;
pub const P3_DEFAULT_CONCURRENT: u32 = 16;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a function asks for; `None` takes the guest kind's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceSetting {
    pub requests: Option<u32>,
    pub concurrent: Option<u32>,
    pub idle_timeout: Option<Duration>,
}

/// What the node does for one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstancePolicy {
    /// Requests one instance serves before it is dropped; 1 means a fresh instance per request.
    pub requests_per_instance: u32,
    /// Requests one instance serves at the same time.
    pub concurrent_per_instance: u32,
    /// An instance with nothing to do is dropped after this long.
    pub idle_timeout: Duration,
}

impl InstancePolicy {
    /// A fresh instance for every request.
    pub const FRESH: InstancePolicy = InstancePolicy {
        requests_per_instance: 1,
        concurrent_per_instance: 1,
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
    };

    /// Does an instance ever serve a second request?
    pub fn reuses(&self) -> bool {
        self.requests_per_instance > 1
    }

    /// The policy for a guest of kind `guest` asking for `setting`, and one note per part of
    /// the setting that kind cannot honour (for the caller to log).
    pub fn resolve(guest: GuestKind, setting: &InstanceSetting) -> (InstancePolicy, Vec<String>) {
        let mut notes = Vec::new();
        let idle_timeout = setting.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let policy = match guest {
            GuestKind::P1Command => {
                if setting.requests.is_some_and(|r| r > 1)
                    || setting.concurrent.is_some_and(|c| c > 1)
                {
                    notes.push(
                        "instances.requests/concurrent ignored: a WASI p1 command runs `_start` \
                         once, so every request gets a fresh instance"
                            .to_string(),
                    );
                }
                InstancePolicy::FRESH
            }
            GuestKind::HttpP2 => {
                if setting.concurrent.is_some_and(|c| c > 1) {
                    notes.push(
                        "instances.concurrent ignored: a wasi:http 0.2 handler is synchronous, so \
                         an instance serves one request at a time"
                            .to_string(),
                    );
                }
                InstancePolicy {
                    requests_per_instance: setting.requests.unwrap_or(1),
                    concurrent_per_instance: 1,
                    idle_timeout,
                }
            }
            GuestKind::HttpP3 => InstancePolicy {
                requests_per_instance: setting.requests.unwrap_or(P3_DEFAULT_REQUESTS),
                concurrent_per_instance: setting.concurrent.unwrap_or(P3_DEFAULT_CONCURRENT),
                idle_timeout,
            },
        };
        (policy, notes)
    }
}

impl InstanceSetting {
    /// A setting from a source nobody range-checked (a pushed manifest), each value clamped
    /// into the range a config file allows, with one note per clamped value.
    pub fn clamped(
        requests: Option<u64>,
        concurrent: Option<u64>,
        idle_timeout_ms: Option<u64>,
    ) -> (InstanceSetting, Vec<String>) {
        let mut notes = Vec::new();
        let mut clamp = |field: &str, value: Option<u64>, max: u64| {
            value.map(|v| {
                let used = v.clamp(1, max);
                if used != v {
                    notes.push(format!(
                        "instances.{field} {v} is outside 1..={max}; using {used}"
                    ));
                }
                used
            })
        };
        // The maxima fit in u32, so the narrowing below is exact.
        let requests = clamp("requests", requests, MAX_REQUESTS_PER_INSTANCE).map(|v| v as u32);
        let concurrent =
            clamp("concurrent", concurrent, MAX_CONCURRENT_PER_INSTANCE).map(|v| v as u32);
        let idle = clamp("idle_timeout_ms", idle_timeout_ms, MAX_IDLE_TIMEOUT_MS);
        let setting = InstanceSetting {
            requests,
            concurrent,
            idle_timeout: idle.map(Duration::from_millis),
        };
        (setting, notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_guest_kind() {
        let none = InstanceSetting::default();
        assert_eq!(
            InstancePolicy::resolve(GuestKind::P1Command, &none).0,
            InstancePolicy::FRESH
        );
        let p2 = InstancePolicy::resolve(GuestKind::HttpP2, &none).0;
        assert!(!p2.reuses());
        let p3 = InstancePolicy::resolve(GuestKind::HttpP3, &none).0;
        assert_eq!(p3.requests_per_instance, 128);
        assert_eq!(p3.concurrent_per_instance, 16);
        assert_eq!(p3.idle_timeout, Duration::from_secs(1));
    }

    #[test]
    fn what_a_kind_cannot_do_is_noted_not_applied() {
        let ask = InstanceSetting {
            requests: Some(50),
            concurrent: Some(4),
            idle_timeout: Some(Duration::from_millis(250)),
        };
        let (p1, notes) = InstancePolicy::resolve(GuestKind::P1Command, &ask);
        assert_eq!(p1, InstancePolicy::FRESH);
        assert_eq!(notes.len(), 1);
        let (p2, notes) = InstancePolicy::resolve(GuestKind::HttpP2, &ask);
        assert_eq!(p2.requests_per_instance, 50);
        assert_eq!(p2.concurrent_per_instance, 1);
        assert_eq!(p2.idle_timeout, Duration::from_millis(250));
        assert!(notes[0].contains("synchronous"), "{notes:?}");
        let (p3, notes) = InstancePolicy::resolve(GuestKind::HttpP3, &ask);
        assert_eq!(
            (p3.requests_per_instance, p3.concurrent_per_instance),
            (50, 4)
        );
        assert!(notes.is_empty());
    }

    #[test]
    fn pushed_settings_are_clamped_not_wrapped() {
        let (setting, notes) = InstanceSetting::clamped(Some(u64::MAX), Some(0), None);
        assert_eq!(setting.requests, Some(1_000_000));
        assert_eq!(setting.concurrent, Some(1));
        assert_eq!(setting.idle_timeout, None);
        assert_eq!(notes.len(), 2);
    }
}
