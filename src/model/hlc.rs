//! Hybrid logical clock: wall-clock milliseconds plus a logical counter, packed into a `u64`.
//!
//! The top 48 bits are milliseconds since the Unix epoch, the low 16 bits a counter that breaks
//! ties inside one millisecond. A device's clock is strictly monotonic, so a device never issues
//! the same timestamp twice, and it moves past every timestamp it has received, so a reply always
//! sorts after the message it answers.
//!
//! The clock takes `now_ms` as an argument: it reads no clock itself.
//!
//! ```
//! use roamsync::model::hlc::{HybridClock, MAX_CLOCK_SKEW_MS};
//! let mut clock = HybridClock::new(MAX_CLOCK_SKEW_MS);
//! let a = clock.tick(1_000).unwrap();
//! let b = clock.tick(1_000).unwrap(); // same millisecond: the counter breaks the tie
//! assert!(b > a);
//! ```

use std::fmt;

/// How far ahead of the local wall clock a received timestamp may be before it is rejected:
/// five minutes, enough for phones whose clocks drift, small enough that one device with a
/// wrong clock cannot drag every other device's clock into the future.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

const COUNTER_BITS: u32 = 16;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// The largest representable wall-clock value (2^48 - 1 ms, about the year 10889).
pub const MAX_PHYSICAL_MS: u64 = (1 << (64 - COUNTER_BITS)) - 1;

/// A hybrid-logical-clock timestamp.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(u64);

impl Hlc {
    /// The zero timestamp, before every real one.
    pub const ZERO: Hlc = Hlc(0);

    /// Builds a timestamp from its parts. `physical_ms` is clamped to 48 bits.
    pub fn new(physical_ms: u64, counter: u16) -> Hlc {
        Hlc((physical_ms.min(MAX_PHYSICAL_MS) << COUNTER_BITS) | u64::from(counter))
    }

    /// From the packed form.
    pub const fn from_u64(v: u64) -> Hlc {
        Hlc(v)
    }

    /// The packed form: ordering of `u64`s is ordering of timestamps.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch.
    pub const fn physical_ms(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    /// The logical counter.
    pub const fn counter(self) -> u16 {
        (self.0 & COUNTER_MASK) as u16
    }

    /// The next timestamp after this one.
    fn successor(self) -> Option<Hlc> {
        self.0.checked_add(1).map(Hlc)
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.physical_ms(), self.counter())
    }
}

/// Clock errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HlcError {
    /// A received timestamp is further ahead of the local wall clock than the allowed skew.
    #[error(
        "timestamp {remote_ms} ms is {ahead_ms} ms ahead of local time {local_ms} ms (max skew {max_skew_ms} ms)"
    )]
    TooFarInFuture {
        /// The received timestamp's wall-clock part.
        remote_ms: u64,
        /// The local wall clock.
        local_ms: u64,
        /// How far ahead it is.
        ahead_ms: u64,
        /// The configured bound.
        max_skew_ms: u64,
    },
    /// The clock reached the largest representable timestamp.
    #[error("hybrid logical clock exhausted")]
    Exhausted,
}

/// A device's hybrid logical clock.
#[derive(Clone, Debug)]
pub struct HybridClock {
    last: Hlc,
    max_skew_ms: u64,
}

impl HybridClock {
    /// A clock that has issued nothing yet and accepts remote timestamps up to `max_skew_ms`
    /// ahead of the local wall clock.
    pub fn new(max_skew_ms: u64) -> HybridClock {
        HybridClock {
            last: Hlc::ZERO,
            max_skew_ms,
        }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// Resumes after a restart: the clock will never issue a timestamp at or below `last`.
    pub fn resume(&mut self, last: Hlc) {
        self.last = self.last.max(last);
    }

    /// Issues a new timestamp, strictly greater than every one issued or observed before.
    ///
    /// If the wall clock went backwards the counter advances instead, so the order of local events
    /// is never violated.
    pub fn tick(&mut self, now_ms: u64) -> Result<Hlc, HlcError> {
        let wall = Hlc::new(now_ms, 0);
        let next = if wall > self.last {
            wall
        } else {
            self.last.successor().ok_or(HlcError::Exhausted)?
        };
        self.last = next;
        Ok(next)
    }

    /// Moves the clock past a timestamp received from another device.
    ///
    /// A timestamp more than the allowed skew ahead of `now_ms` is rejected and leaves the clock
    /// unchanged: one device with a wrong clock must not drag the others into the future.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) -> Result<(), HlcError> {
        self.check(remote, now_ms)?;
        self.last = self.last.max(remote);
        Ok(())
    }

    /// Checks a received timestamp against the skew bound without changing the clock.
    pub fn check(&self, remote: Hlc, now_ms: u64) -> Result<(), HlcError> {
        let limit = now_ms.saturating_add(self.max_skew_ms);
        if remote.physical_ms() > limit {
            return Err(HlcError::TooFarInFuture {
                remote_ms: remote.physical_ms(),
                local_ms: now_ms,
                ahead_ms: remote.physical_ms() - now_ms,
                max_skew_ms: self.max_skew_ms,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn same_millisecond_uses_counter() {
        let mut c = HybridClock::new(MAX_CLOCK_SKEW_MS);
        let a = c.tick(5).unwrap();
        let b = c.tick(5).unwrap();
        assert_eq!((a.physical_ms(), a.counter()), (5, 0));
        assert_eq!((b.physical_ms(), b.counter()), (5, 1));
    }

    #[test]
    fn wall_clock_going_back_keeps_order() {
        let mut c = HybridClock::new(MAX_CLOCK_SKEW_MS);
        let a = c.tick(10_000).unwrap();
        let b = c.tick(3_000).unwrap();
        assert!(b > a);
        assert_eq!(b.physical_ms(), 10_000);
    }

    #[test]
    fn observe_advances_within_bound() {
        let mut c = HybridClock::new(1_000);
        c.tick(10_000).unwrap();
        c.observe(Hlc::new(10_900, 7), 10_000).unwrap();
        let next = c.tick(10_000).unwrap();
        assert_eq!((next.physical_ms(), next.counter()), (10_900, 8));
    }

    #[test]
    fn observe_rejects_far_future_and_keeps_clock() {
        let mut c = HybridClock::new(1_000);
        let before = c.tick(10_000).unwrap();
        let err = c.observe(Hlc::new(11_001, 0), 10_000).unwrap_err();
        assert_eq!(
            err,
            HlcError::TooFarInFuture {
                remote_ms: 11_001,
                local_ms: 10_000,
                ahead_ms: 1_001,
                max_skew_ms: 1_000
            }
        );
        assert_eq!(c.last(), before);
    }

    #[test]
    fn exhausted_is_an_error_not_a_wrap() {
        let mut c = HybridClock::new(0);
        c.resume(Hlc::from_u64(u64::MAX));
        assert_eq!(c.tick(0), Err(HlcError::Exhausted));
    }

    #[test]
    fn resume_never_goes_back() {
        let mut c = HybridClock::new(0);
        c.resume(Hlc::new(50, 3));
        c.resume(Hlc::new(10, 0));
        assert!(c.tick(1).unwrap() > Hlc::new(50, 3));
    }

    proptest! {
        #[test]
        fn strictly_monotonic(steps in proptest::collection::vec((0u64..1_000_000, any::<bool>(), 0u64..1_000_000), 1..200)) {
            let mut c = HybridClock::new(MAX_CLOCK_SKEW_MS);
            let mut prev = Hlc::ZERO;
            for (now, recv, remote) in steps {
                if recv {
                    let _ = c.observe(Hlc::new(remote, 0), now);
                    prop_assert!(c.last() >= prev);
                    prev = c.last();
                } else {
                    let t = c.tick(now).unwrap();
                    prop_assert!(t > prev);
                    prev = t;
                }
            }
        }
    }
}
