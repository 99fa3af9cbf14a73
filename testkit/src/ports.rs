//! Free loopback ports for test servers.
//!
//! [`free_port`] binds `127.0.0.1` to find a port no one listens on and records it in a
//! process-wide reserved set (Vector's `test_util/addr.rs` idea), so two servers in the same test
//! binary never get the same port even before either has bound it.
//!
//! Why not just `bind(127.0.0.1:0)`: the kernel picks such ports from the *ephemeral* range
//! (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999 here), the same range it uses for the
//! local end of outgoing connections. A server that is restarted on the same port (fault tests)
//! can then find it taken by some client's outgoing socket, and a client reconnecting to a port
//! with no listener can even connect to itself (TCP simultaneous open). So candidates are drawn
//! first from just below the ephemeral range, where the kernel never assigns local ports; only
//! if that fails does it fall back to `bind(:0)`.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    sync::{Mutex, OnceLock},
};

use crate::process::random_u64;

/// Lowest port we draw candidates from (above the common fixed service ports).
const LOW: u16 = 20_000;
/// Candidates tried below the ephemeral range before falling back to `bind(:0)`.
const ATTEMPTS: usize = 200;

fn reserved() -> &'static Mutex<HashSet<u16>> {
    static RESERVED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    RESERVED.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Start of the kernel's ephemeral port range (32768 if it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

fn can_bind(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Whether `127.0.0.1:port` can be bound right now (used to tell a lost port race from other
/// startup failures).
pub(crate) fn port_is_free(port: u16) -> bool {
    can_bind(port)
}

/// Returns a port on `127.0.0.1` that was free when checked and has not been returned before in
/// this process. The port is not held open: start the server on it promptly.
///
/// Panics only if no port at all can be bound on loopback (the machine is then unusable for
/// these tests anyway).
pub fn free_port() -> u16 {
    // A poisoned lock only means another test panicked while holding it; the set is still valid.
    let mut set = reserved().lock().unwrap_or_else(|e| e.into_inner());
    let high = ephemeral_low();
    if high > LOW + 100 {
        let span = u64::from(high - LOW);
        for _ in 0..ATTEMPTS {
            // `random_u64() % span` < span <= u16::MAX, so the conversion cannot fail.
            let port = LOW + u16::try_from(random_u64() % span).unwrap_or(0);
            if !set.contains(&port) && can_bind(port) {
                set.insert(port);
                return port;
            }
        }
    }
    for _ in 0..ATTEMPTS {
        let port = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("testkit: cannot bind any port on 127.0.0.1: {e}"));
        if set.insert(port) {
            return port;
        }
    }
    panic!("testkit: no unreserved free port on 127.0.0.1 after {ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        for p in ports {
            assert!(can_bind(p), "port {p} should be bindable");
        }
    }
}
