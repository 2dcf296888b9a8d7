//! The adapter interface every system under test implements (tsmsg, Redis Streams, NATS
//! JetStream). The workloads in `workloads.rs` are generic over [`System`] and never see a
//! wire format; each adapter lives in its own file (`tsmsg.rs`, `redis.rs`, `nats.rs`).
//!
//! Contract, the same for every adapter, so the figures compare like with like:
//!
//! * [`Publisher::publish`] resolves only when the system has acknowledged the entry as
//!   stored at the durability tier it was started with (tsmsg `ok` after the group commit,
//!   Redis `XADD` reply under `appendfsync`, NATS `PubAck`), and returns the position the
//!   entry got. A publisher is `Clone`; clones share one connection, and publishes on it may
//!   be concurrent: a window of 16 is 16 concurrent `publish` futures on one publisher.
//! * A [`Subscriber`] receives, in order and exactly once, every entry of its channels after
//!   the position it was opened at: first the backlog (catch-up), then live deliveries.
//!   `next` yields them one at a time (an adapter may buffer internally).
//! * Payloads are ASCII (the workloads build them; tsmsg carries them in a `str` field).
//!   The first bytes hold a send timestamp, see [`stamp`] and [`parse_stamp`].
//! * Channel names are `[A-Za-z0-9_.:-]`, at most 128 characters, unique per run (a run
//!   prefix), so an adapter never needs to clear earlier data.
//! * Positions are per channel and opaque to the workloads except that
//!   `Pos::default()` means "before the first entry".

use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

pub use anyhow::Result;
pub use bytes::Bytes;

/// How to reach the system and tune the adapter. `extra` holds `--opt key=value` pairs from
/// the command line, for adapter-specific settings (e.g. `secret=...` for tsmsg,
/// `sync=always` for NATS); adapters ignore keys they do not know.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// host:port of the server (the first of `addrs`).
    pub addr: String,
    /// tsmsg only: every node; publishers, replay and idle connections are spread over
    /// them round robin by connection number.
    pub addrs: Vec<String>,
    /// tsmsg only: the nodes subscribers are spread over (default: `addrs`).
    pub sub_addrs: Vec<String>,
    /// A unique prefix for this run's channel/stream names, e.g. `b1732812345`.
    pub run_id: String,
    pub extra: Vec<(String, String)>,
    /// `--tls`: connect with TLS (tsmsg only; the other adapters refuse it).
    pub tls: Option<crate::tls::TlsArgs>,
}

impl Config {
    pub fn opt(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One entry delivered to a subscriber.
#[derive(Clone, Debug)]
pub struct Delivery<P> {
    /// Shared, not allocated per delivery: adapters keep one `Arc<str>` per channel.
    pub channel: Arc<str>,
    pub pos: P,
    pub payload: Bytes,
}

/// A system under test. One value per loadgen process; it opens the connections.
/// `id` arguments are a client number, for adapters that want distinct user ids/names.
pub trait System: Sized + Send + Sync + 'static {
    /// A position in one channel (tsmsg seq, NATS stream sequence, Redis stream id).
    type Pos: Clone + Debug + Default + Send + Sync + 'static;
    type Publisher: Publisher<Pos = Self::Pos>;
    type Subscriber: Subscriber<Pos = Self::Pos>;
    /// An authenticated connection doing nothing; kept open (and kept alive by the adapter,
    /// e.g. with pings) until dropped.
    type Idle: Send + 'static;

    fn name(&self) -> &'static str;

    /// Connect to the system (check it is there; create shared clients).
    fn connect(cfg: Config) -> impl Future<Output = Result<Self>> + Send;

    /// Make `channels` ready to receive entries (create streams, etc.). Called once per
    /// workload before any publish/subscribe on those channels; may be a no-op.
    fn prepare(&self, channels: &[String]) -> impl Future<Output = Result<()>> + Send;

    /// Open a publisher connection.
    fn publisher(&self, id: usize) -> impl Future<Output = Result<Self::Publisher>> + Send;

    /// Open a subscriber connection receiving every entry of each channel after its
    /// position.
    fn subscribe(
        &self,
        id: usize,
        from: Vec<(String, Self::Pos)>,
    ) -> impl Future<Output = Result<Self::Subscriber>> + Send;

    /// Read entries of `channel` after `after`, in pages as the system offers them, until
    /// `count` entries were read or the end of the log. Returns the entries read (the
    /// workload checks the count and measures the time).
    fn replay(
        &self,
        id: usize,
        channel: &str,
        after: Self::Pos,
        count: u64,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Open an authenticated connection that stays idle.
    fn idle(&self, id: usize) -> impl Future<Output = Result<Self::Idle>> + Send;
}

pub trait Publisher: Clone + Send + Sync + 'static {
    type Pos: Clone + Debug + Default + Send + Sync + 'static;
    /// Append `payload` to `channel`; resolves on the durable ack with the entry's position.
    fn publish(
        &self,
        channel: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<Self::Pos>> + Send;
}

pub trait Subscriber: Send + 'static {
    type Pos: Clone + Debug + Default + Send + Sync + 'static;
    /// The next entry, in order, exactly once.
    fn next(&mut self) -> impl Future<Output = Result<Delivery<Self::Pos>>> + Send;
}

/// The process-wide clock origin for payload timestamps.
pub fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// A payload of `size` ASCII bytes (at least 17) carrying the timestamp `t_ns` (nanoseconds
/// since [`epoch`], usually the scheduled send time) as 16 hex digits, then `-`, then filler.
pub fn stamp(t_ns: u64, size: usize) -> Bytes {
    let mut v = format!("{t_ns:016x}-").into_bytes();
    v.resize(size.max(17), b'x');
    Bytes::from(v)
}

/// The timestamp of a payload built by [`stamp`].
pub fn parse_stamp(payload: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(payload.get(..16)?).ok()?;
    u64::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip() {
        let p = stamp(0x1234_5678_9abc, 100);
        assert_eq!(p.len(), 100);
        assert!(p.is_ascii());
        assert_eq!(parse_stamp(&p), Some(0x1234_5678_9abc));
    }
}
