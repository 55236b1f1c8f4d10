//! Throttling of failed authentication per source address, so a key cannot
//! be guessed online.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses tracked at once; idle ones are dropped beyond this.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

/// Counts failed authentications per address and blocks an address that
/// fails too often.
pub struct Throttle {
    max: u32,
    window: Duration,
    block: Duration,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl Throttle {
    /// Blocks an address for `block` once it fails `max` times within `window`.
    pub fn new(max: u32, window: Duration, block: Duration) -> Throttle {
        Throttle {
            max,
            window,
            block,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Returns how long `ip` stays blocked, or `None` when it is not.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let until = entries.get(&ip)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failure of `ip`. Returns `true` when this failure starts a block.
    pub fn fail(&self, ip: IpAddr, now: Instant) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_TRACKED {
            let (window, block) = (self.window, self.block);
            entries.retain(|_, e| {
                now.duration_since(e.window_start) < window.max(block)
                    || e.blocked_until.is_some_and(|u| u > now)
            });
        }

        let entry = entries.entry(ip).or_insert(Entry {
            window_start: now,
            failures: 0,
            blocked_until: None,
        });
        if now.duration_since(entry.window_start) >= self.window {
            *entry = Entry {
                window_start: now,
                failures: 0,
                blocked_until: entry.blocked_until,
            };
        }
        entry.failures += 1;
        if entry.failures >= self.max && entry.blocked_until.is_none_or(|until| until <= now) {
            entry.blocked_until = Some(now + self.block);
            entry.failures = 0;
            entry.window_start = now;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_failures_in_window() {
        let throttle = Throttle::new(3, Duration::from_secs(60), Duration::from_secs(30));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let start = Instant::now();

        assert!(!throttle.fail(ip, start));
        assert!(!throttle.fail(ip, start));
        assert_eq!(throttle.blocked(ip, start), None);
        assert!(throttle.fail(ip, start), "the third failure starts the block");
        assert_eq!(throttle.blocked(ip, start), Some(Duration::from_secs(30)));
        assert_eq!(
            throttle.blocked(ip, start + Duration::from_secs(31)),
            None,
            "the block ends"
        );

        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(
            throttle.blocked(other, start),
            None,
            "other addresses are not affected"
        );
    }

    #[test]
    fn failures_outside_window_do_not_add_up() {
        let throttle = Throttle::new(2, Duration::from_secs(10), Duration::from_secs(30));
        let ip: IpAddr = "::1".parse().unwrap();
        let start = Instant::now();
        assert!(!throttle.fail(ip, start));
        assert!(!throttle.fail(ip, start + Duration::from_secs(11)));
        assert_eq!(throttle.blocked(ip, start + Duration::from_secs(11)), None);
    }
}
