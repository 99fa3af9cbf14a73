//! Failed authentication throttled per client address (issue 12), without locking out a
//! seller's valid key.
//!
//! Each client address (an IPv4 address, or an IPv6 /64: one host's share) has a bucket of
//! attempts with keys not yet seen to work from it: `per_sec` refill, `burst` capacity
//! (`governor`). While the bucket is empty, such an attempt gets 429 with `Retry-After`
//! *without* its key being checked, so guessing keys costs the guesser time and the answer says
//! nothing about the guess. A key that authenticated from an address is remembered for that
//! address (by a fingerprint, never the key) and bypasses the bucket from then on: a seller's
//! client behind the same address as a guesser (a NAT, a proxy) keeps working. Only a valid key
//! new to that address waits for the bucket, for seconds.
//!
//! Memory is bounded: buckets of quiet addresses are dropped every few thousand attempts, and at
//! most [`MAX_ADDRESSES`] addresses with [`KEYS_PER_ADDRESS`] fingerprints each are remembered.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses whose working keys are remembered at most.
pub const MAX_ADDRESSES: usize = 100_000;
/// Working keys remembered per address at most.
pub const KEYS_PER_ADDRESS: usize = 8;
/// How long a working key stays remembered for an address after its last success.
pub const REMEMBER_FOR: Duration = Duration::from_secs(24 * 3600);

/// A client address as throttled: IPv4 whole, IPv6 by its /64 (a host gets a /64 or more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    /// The key of `addr`; `None` (no address known, e.g. in-process calls) shares one key.
    pub fn of(addr: Option<IpAddr>) -> Self {
        match addr {
            Some(IpAddr::V4(a)) => ClientKey(u128::from(u32::from(a))),
            Some(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
                Some(v4) => ClientKey(u128::from(u32::from(v4))),
                None => ClientKey((u128::from(a) >> 64 << 64) | 1),
            },
            None => ClientKey(u128::MAX),
        }
    }
}

/// A key's fingerprint: enough of its SHA-256 to tell keys apart, never the key.
type Fingerprint = [u8; 16];

fn fingerprint(key: &str) -> Fingerprint {
    let d = Sha256::digest(key.as_bytes());
    let mut f = [0u8; 16];
    f.copy_from_slice(&d[..16]);
    f
}

/// The budget of attempts with unknown keys per address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthLimits {
    /// Attempts per second, sustained.
    pub per_sec: NonZeroU32,
    /// Attempts at once.
    pub burst: NonZeroU32,
}

impl Default for AuthLimits {
    fn default() -> Self {
        AuthLimits { per_sec: NonZeroU32::new(5).expect("5 > 0"), burst: NonZeroU32::new(20).expect("20 > 0") }
    }
}

/// The throttle; shared by every connection.
#[derive(Debug)]
pub struct AuthThrottle {
    limits: AuthLimits,
    buckets: DefaultKeyedRateLimiter<ClientKey>,
    clock: DefaultClock,
    known: Mutex<HashMap<ClientKey, Vec<(Fingerprint, Instant)>>>,
    attempts: AtomicU64,
}

impl Default for AuthThrottle {
    fn default() -> Self {
        AuthThrottle::new(AuthLimits::default())
    }
}

impl AuthThrottle {
    /// A throttle with `limits` for every address.
    pub fn new(limits: AuthLimits) -> Self {
        let clock = DefaultClock::default();
        let quota = Quota::per_second(limits.per_sec).allow_burst(limits.burst);
        AuthThrottle {
            limits,
            buckets: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
            known: Mutex::new(HashMap::new()),
            attempts: AtomicU64::new(0),
        }
    }

    /// The budget.
    pub fn limits(&self) -> AuthLimits {
        self.limits
    }

    /// Before a key is checked: `Ok` to check it, or how long `addr` must wait. A key that worked
    /// from `addr` before always passes; any other attempt (no key included) takes one token.
    pub fn before(&self, addr: Option<IpAddr>, key: Option<&str>) -> Result<(), Duration> {
        let client = ClientKey::of(addr);
        if self.attempts.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            // Buckets that refilled completely are the same as absent ones.
            self.buckets.retain_recent();
            self.buckets.shrink_to_fit();
        }
        if let Some(k) = key {
            let fp = fingerprint(k);
            let known = self.known.lock().map(|m| m.get(&client).is_some_and(|v| v.iter().any(|(f, _)| *f == fp)));
            if known.unwrap_or(false) {
                return Ok(());
            }
        }
        self.buckets.check_key(&client).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// `key` authenticated from `addr`: remember it there.
    pub fn succeeded(&self, addr: Option<IpAddr>, key: &str) {
        let (client, fp, now) = (ClientKey::of(addr), fingerprint(key), Instant::now());
        let Ok(mut m) = self.known.lock() else { return };
        if m.len() >= MAX_ADDRESSES && !m.contains_key(&client) {
            m.retain(|_, v| {
                v.retain(|(_, at)| now.duration_since(*at) < REMEMBER_FOR);
                !v.is_empty()
            });
            if m.len() >= MAX_ADDRESSES {
                // Only the bypass is lost: those addresses' valid keys pass the bucket once more.
                return;
            }
        }
        let v = m.entry(client).or_default();
        match v.iter_mut().find(|(f, _)| *f == fp) {
            Some(entry) => entry.1 = now,
            None => {
                if v.len() >= KEYS_PER_ADDRESS {
                    // Forget the least recently used.
                    if let Some(i) = v.iter().enumerate().min_by_key(|(_, (_, at))| *at).map(|(i, _)| i) {
                        v.swap_remove(i);
                    }
                }
                v.push((fp, now));
            }
        }
    }

    /// `key` failed from `addr` (revoked, expired): it no longer bypasses the bucket there.
    pub fn failed(&self, addr: Option<IpAddr>, key: Option<&str>) {
        let Some(k) = key else { return };
        let (client, fp) = (ClientKey::of(addr), fingerprint(k));
        if let Ok(mut m) = self.known.lock() {
            if let Some(v) = m.get_mut(&client) {
                v.retain(|(f, _)| *f != fp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn throttle() -> AuthThrottle {
        AuthThrottle::new(AuthLimits { per_sec: NonZeroU32::new(1).unwrap(), burst: NonZeroU32::new(3).unwrap() })
    }

    #[test]
    fn guesses_from_one_address_are_throttled_after_the_burst_and_others_are_not() {
        let t = throttle();
        let a = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        for i in 0..3 {
            assert_eq!(t.before(a, Some(&format!("guess-{i}"))), Ok(()));
        }
        let wait = t.before(a, Some("guess-3")).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(t.before(a, None).is_err(), "no key is an attempt too");
        assert_eq!(
            t.before(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))), Some("x")),
            Ok(()),
            "another address has its own bucket"
        );
    }

    #[test]
    fn a_key_that_worked_from_an_address_is_never_locked_out_there() {
        let t = throttle();
        let a = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(t.before(a, Some("seller-key")), Ok(()));
        t.succeeded(a, "seller-key");
        for i in 0..10 {
            t.before(a, Some(&format!("guess-{i}"))).ok();
        }
        assert!(t.before(a, Some("guess-x")).is_err(), "the guesser is throttled");
        assert_eq!(t.before(a, Some("seller-key")), Ok(()), "the seller is not");
        t.failed(a, Some("seller-key"));
        assert!(t.before(a, Some("seller-key")).is_err(), "a revoked key loses its pass");
    }

    #[test]
    fn ipv6_addresses_share_a_bucket_per_64() {
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::of(Some(a.into())), ClientKey::of(Some(b.into())));
        assert_ne!(ClientKey::of(Some(a.into())), ClientKey::of(Some(c.into())));
        let mapped: Ipv6Addr = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped();
        assert_eq!(ClientKey::of(Some(mapped.into())), ClientKey::of(Some(Ipv4Addr::new(10, 0, 0, 1).into())));
    }
}
