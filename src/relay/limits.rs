//! Every limit the relay enforces, named, and the per-connection request rate limiter.
//!
//! The defaults are in constants; [`RelayLimits`] carries the values a relay runs with (the
//! operator may change the rate and the quota). Limits that are part of the wire format
//! (frame, message and list sizes) live in [`crate::wire`]; the ones here are the relay's policy.

/// Default sustained requests per second per connection: generous enough for a device that
/// sends 20,000 appends a second.
pub const DEFAULT_RATE_PER_S: u64 = 50_000;
/// Default burst of requests per connection above the sustained rate.
pub const DEFAULT_BURST: u64 = 100_000;
/// Default bytes of stored envelopes per account (1 GiB).
pub const DEFAULT_QUOTA_BYTES: u64 = 1 << 30;
/// Default most documents one connection may subscribe to.
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_CONN: usize = 64 * 1024;
/// Default most pairing offers waiting at once, over all connections.
pub const DEFAULT_MAX_PAIRING_OFFERS: usize = 10_000;
/// Default most connections the relay serves at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default most accounts one connection may create (by posting a genesis entry).
pub const DEFAULT_MAX_NEW_ACCOUNTS_PER_CONN: u32 = 8;
/// Most pairing offers one connection may hold at once.
pub const MAX_PAIRING_OFFERS_PER_CONN: usize = 4;
/// Most envelopes one `Fetch` returns, whatever the device asks for (`limit = 0` means this).
pub const MAX_FETCH_LIMIT: u32 = 4096;
/// Most update bytes packed into one `GroupUpdates` answer (a larger single update is sent
/// alone; every update fits in a message).
pub const TARGET_UPDATES_BYTES: usize = crate::wire::message::TARGET_ENVELOPES_BYTES;
/// Most appends of one connection waiting for the disk at once.
pub const MAX_APPENDS_IN_FLIGHT_PER_CONN: usize = 16 * 1024;
/// Most envelope bytes of one connection waiting for the disk at once.
pub const MAX_APPEND_BYTES_IN_FLIGHT_PER_CONN: usize = 64 * 1024 * 1024;

/// Largest snapshot envelope the relay keeps (its encoding, header and signature included): a
/// full segment's compacted save is far smaller, and a larger one is refused with `TOO_LARGE`.
pub const MAX_SNAPSHOT_BYTES: usize = 4 * 1024 * 1024;

// The async shell's queues and timeouts.

/// Events (messages, datagrams, connection changes) queued for the relay's actor before the
/// connections feeding it wait.
pub const EVENT_QUEUE_DEPTH: usize = 4096;
/// Pushes queued for one connection; a push that finds the queue full is dropped and the
/// connection closed with `LAGGED` (the device reconnects and catches up from its cursors).
pub const PUSH_QUEUE_DEPTH: usize = 1024;
/// Answers queued for one connection above which the relay stops reading its requests until
/// the connection has taken some (answers are never dropped).
pub const ANSWER_HIGH_WATERMARK: usize = 4096;
/// How long a new connection may take to open its stream.
pub const FIRST_STREAM_TIMEOUT_MS: u64 = 10_000;
/// How long a closing connection waits for the peer to receive the last messages.
pub const CLOSE_LINGER_MS: u64 = 1_000;
/// How long a graceful shutdown waits for connections to take their last answers.
pub const SHUTDOWN_TIMEOUT_MS: u64 = 5_000;
/// Reader connections serving fetches and catch-ups in parallel.
pub const READER_CONNECTIONS: usize = 2;

/// Fixed-point scale of the token bucket: one request costs this many units.
const TOKEN_UNITS: u64 = 1000;

/// The limits a relay enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Sustained requests per second per connection (datagrams count too).
    pub rate_per_s: u64,
    /// Requests a connection may send in a burst above the sustained rate.
    pub burst: u64,
    /// Bytes of stored envelopes per account; appends past it get `QUOTA_EXCEEDED`.
    pub quota_bytes: u64,
    /// Most documents one connection may subscribe to.
    pub max_subscriptions_per_conn: usize,
    /// Most pairing offers waiting at once, over all connections.
    pub max_pairing_offers: usize,
    /// Most connections served at once; further ones are closed on arrival.
    pub max_connections: usize,
    /// Most accounts one connection may create.
    pub max_new_accounts_per_conn: u32,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            rate_per_s: DEFAULT_RATE_PER_S,
            burst: DEFAULT_BURST,
            quota_bytes: DEFAULT_QUOTA_BYTES,
            max_subscriptions_per_conn: DEFAULT_MAX_SUBSCRIPTIONS_PER_CONN,
            max_pairing_offers: DEFAULT_MAX_PAIRING_OFFERS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_new_accounts_per_conn: DEFAULT_MAX_NEW_ACCOUNTS_PER_CONN,
        }
    }
}

/// A token bucket: `burst` requests at once, refilled at `rate_per_s`.
///
/// Time is the caller's `now_ms`; a clock that goes backwards refills nothing. Arithmetic is
/// integer fixed point and saturating, so no input can overflow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens available, in units of 1/[`TOKEN_UNITS`] of a request.
    units: u64,
    /// When the bucket was last refilled.
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn full(limits: &RelayLimits, now_ms: u64) -> Self {
        Self {
            units: limits.burst.saturating_mul(TOKEN_UNITS),
            last_ms: now_ms,
        }
    }

    /// Takes one request's token if there is one.
    pub fn try_take(&mut self, limits: &RelayLimits, now_ms: u64) -> bool {
        let elapsed_ms = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        // `rate_per_s` requests per second is `rate_per_s` units per millisecond.
        let cap = limits.burst.saturating_mul(TOKEN_UNITS);
        self.units = self
            .units
            .saturating_add(elapsed_ms.saturating_mul(limits.rate_per_s))
            .min(cap);
        if self.units >= TOKEN_UNITS {
            self.units -= TOKEN_UNITS;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate_per_s: u64, burst: u64) -> RelayLimits {
        RelayLimits {
            rate_per_s,
            burst,
            ..RelayLimits::default()
        }
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let l = limits(1000, 10);
        let mut b = TokenBucket::full(&l, 0);
        assert_eq!((0..20).filter(|_| b.try_take(&l, 0)).count(), 10);
        // 1,000 per second is one per millisecond.
        assert!(b.try_take(&l, 1));
        assert!(!b.try_take(&l, 1));
        // Refills never exceed the burst.
        assert_eq!((0..50).filter(|_| b.try_take(&l, 1_000_000)).count(), 10);
    }

    #[test]
    fn bucket_survives_clock_jumps_and_extremes() {
        let l = limits(u64::MAX, u64::MAX);
        let mut b = TokenBucket::full(&l, u64::MAX);
        assert!(b.try_take(&l, 0));
        assert!(b.try_take(&l, u64::MAX));
        let none = limits(0, 0);
        let mut b = TokenBucket::full(&none, 5);
        assert!(!b.try_take(&none, u64::MAX));
    }

    #[test]
    fn default_rate_sustains_twenty_thousand_a_second() {
        let l = RelayLimits::default();
        let mut b = TokenBucket::full(&l, 0);
        // Ten seconds of 20,000 requests a second, one millisecond at a time.
        let mut refused = 0;
        for ms in 0..10_000u64 {
            for _ in 0..20 {
                if !b.try_take(&l, ms) {
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, 0);
    }
}
