//! NATS JetStream adapter (async-nats).
//!
//! Model: one file-backed stream per run, `tsmsg_<run_id>`, bound to the subjects
//! `chan.<run_id>.>`; a tsmsg channel is the subject `chan.<run_id>.<channel>` in it. A
//! position is the stream sequence of the entry: it grows strictly within a channel but is
//! shared by all channels of the stream, so it is not dense per channel (the workloads treat
//! positions as opaque). Resuming "after p" is a consumer starting at stream sequence p + 1
//! filtered by the channel's subject.
//!
//! * publish: a JetStream publish with a `Nats-Msg-Id` header (unique per publish, so the
//!   server's duplicate window check runs as it would for a client retrying), resolved on the
//!   `PubAck`, which the server sends once the entry is in the stream's file store: with
//!   `sync_interval: always` after the write is fsynced, by default before. A publisher is
//!   one connection; concurrent publishes on its clones share it (the window).
//! * delivery: a subscriber is one connection with one ordered push consumer (ephemeral,
//!   no acks, flow control, idle heartbeats; the client recreates it on a gap) filtered by
//!   its channels' subjects (`filter_subjects`, server 2.10+), starting at the lowest of its
//!   positions + 1; entries at or below a channel's own position are skipped here.
//! * replay: an ephemeral pull consumer from `after + 1` filtered by the channel, read with
//!   `fetch` (no wait) in pages of `page`, until `count` entries or the end (no pending
//!   entry), on a connection of its own (a client that syncs).
//! * idle: one connection; the client pings the server every 60 s (server pings every 2 min).
//!
//! Options (`--opt key=value`): `page` (fetch size, default 5,000: tsmsg's `sync_max`, the page its
//! adapter asks for),
//! `dup_window_s` (the stream's duplicate window, default 120, the NATS default).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::{pull, push, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions, HeaderMap};
use futures::StreamExt;

use crate::system::{self, Bytes, Config, Delivery, Result};

/// Distinct publishers in this process, for unique message ids.
static PUBLISHERS: AtomicU64 = AtomicU64::new(0);

const TIMEOUT: Duration = Duration::from_secs(60);

pub struct Nats {
    addr: String,
    stream: String,
    subject_prefix: String,
    page: usize,
}

fn opt_u64(cfg: &Config, key: &str, default: u64) -> Result<u64> {
    cfg.opt(key).map_or(Ok(default), |v| {
        v.parse().with_context(|| format!("--opt {key}={v}"))
    })
}

/// `[A-Za-z0-9_-]` from `run_id` (stream names and subject tokens allow no `.`, `*`, `>`).
fn token(run_id: &str) -> String {
    run_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Nats {
    async fn client(&self, name: String) -> Result<Client> {
        ConnectOptions::new()
            .name(name)
            .connection_timeout(TIMEOUT)
            .request_timeout(Some(TIMEOUT))
            .connect(self.addr.as_str())
            .await
            .with_context(|| format!("nats connect {}", self.addr))
    }

    fn jetstream(client: Client) -> jetstream::Context {
        let mut js = jetstream::new(client);
        js.set_timeout(TIMEOUT);
        js
    }

    fn subject(&self, channel: &str) -> String {
        format!("{}{channel}", self.subject_prefix)
    }
}

impl system::System for Nats {
    type Pos = u64;
    type Publisher = Publisher;
    type Subscriber = Subscriber;
    type Idle = Client;

    fn name(&self) -> &'static str {
        "nats"
    }

    async fn connect(cfg: Config) -> Result<Self> {
        let run = token(&cfg.run_id);
        if run.is_empty() {
            bail!("nats: empty run id");
        }
        let addr = if cfg.addr.contains("://") {
            cfg.addr.clone()
        } else {
            format!("nats://{}", cfg.addr)
        };
        let this = Nats {
            addr,
            stream: format!("tsmsg_{run}"),
            subject_prefix: format!("chan.{run}."),
            page: opt_u64(&cfg, "page", 5000)? as usize,
        };
        let js = Self::jetstream(this.client("loadgen-admin".into()).await?);
        js.get_or_create_stream(stream::Config {
            name: this.stream.clone(),
            subjects: vec![format!("{}>", this.subject_prefix)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: 1,
            // Fan-out and the reconnect storm open 1,000s of (ordered) consumers; 2.15+ caps a
            // stream that sets no limit (0 or -1) at `default_max_consumers` (1,000), so set
            // one no run reaches.
            max_consumers: i32::MAX,
            duplicate_window: Duration::from_secs(opt_u64(&cfg, "dup_window_s", 120)?),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("nats create stream {}: {e}", this.stream))?;
        Ok(this)
    }

    async fn prepare(&self, channels: &[String]) -> Result<()> {
        for c in channels {
            if c.is_empty() || c.starts_with('.') || c.ends_with('.') || c.contains("..") {
                bail!("channel {c:?} is not a valid NATS subject tail");
            }
        }
        Ok(()) // one stream holds every channel's subject; created in connect
    }

    async fn publisher(&self, id: usize) -> Result<Publisher> {
        let client = self.client(format!("pub-{id}")).await?;
        let n = PUBLISHERS.fetch_add(1, Ordering::Relaxed);
        Ok(Publisher {
            inner: Arc::new(PubInner {
                js: Self::jetstream(client),
                prefix: self.subject_prefix.clone(),
                msg_id_prefix: format!("p{n}-"),
                next: AtomicU64::new(0),
            }),
        })
    }

    async fn subscribe(&self, id: usize, from: Vec<(String, u64)>) -> Result<Subscriber> {
        if from.is_empty() {
            bail!("subscribe to no channel");
        }
        let client = self.client(format!("sub-{id}")).await?;
        let js = Self::jetstream(client.clone());
        let mut channels = HashMap::with_capacity(from.len());
        for (c, pos) in &from {
            channels.insert(self.subject(c), (Arc::<str>::from(c.as_str()), *pos));
        }
        let start = from.iter().map(|(_, p)| *p).min().unwrap_or(0) + 1;
        let mut subjects: Vec<String> = channels.keys().cloned().collect();
        let (filter_subject, filter_subjects) = if subjects.len() == 1 {
            (subjects.pop().unwrap_or_default(), Vec::new())
        } else {
            (String::new(), subjects)
        };
        let consumer = js
            .create_consumer_on_stream(
                push::OrderedConfig {
                    deliver_subject: client.new_inbox(),
                    filter_subject,
                    filter_subjects,
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    },
                    ..Default::default()
                },
                &self.stream,
            )
            .await
            .map_err(|e| anyhow!("nats ordered consumer: {e}"))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| anyhow!("nats ordered consumer messages: {e}"))?;
        Ok(Subscriber {
            _client: client,
            messages,
            channels,
        })
    }

    async fn replay(&self, id: usize, channel: &str, after: u64, count: u64) -> Result<u64> {
        let client = self.client(format!("sync-{id}")).await?;
        let js = Self::jetstream(client);
        let consumer: jetstream::consumer::PullConsumer = js
            .create_consumer_on_stream(
                pull::Config {
                    filter_subject: self.subject(channel),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: after + 1,
                    },
                    ack_policy: AckPolicy::None,
                    inactive_threshold: Duration::from_secs(30),
                    memory_storage: true,
                    ..Default::default()
                },
                &self.stream,
            )
            .await
            .map_err(|e| anyhow!("nats pull consumer: {e}"))?;
        let mut read = 0u64;
        'pages: while read < count {
            let page = (count - read).min(self.page as u64) as usize;
            let mut batch = consumer
                .fetch()
                .max_messages(page)
                .messages()
                .await
                .map_err(|e| anyhow!("nats fetch: {e}"))?;
            let mut got = 0usize;
            let mut pending = 1u64;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| anyhow!("nats fetch: {e}"))?;
                pending = m
                    .info()
                    .map_err(|e| anyhow!("nats message info: {e}"))?
                    .pending;
                got += 1;
            }
            read += got as u64;
            if got == 0 || pending == 0 {
                break 'pages; // the end of the channel
            }
        }
        Ok(read)
    }

    async fn idle(&self, id: usize) -> Result<Client> {
        self.client(format!("idle-{id}")).await
    }
}

struct PubInner {
    js: jetstream::Context,
    prefix: String,
    msg_id_prefix: String,
    next: AtomicU64,
}

/// One connection; clones share it, and their publishes are in flight together.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PubInner>,
}

impl system::Publisher for Publisher {
    type Pos = u64;

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<u64> {
        let p = &self.inner;
        let n = p.next.fetch_add(1, Ordering::Relaxed);
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, format!("{}{n}", p.msg_id_prefix).as_str());
        let ack =
            p.js.publish_with_headers(format!("{}{channel}", p.prefix), headers, payload)
                .await
                .map_err(|e| anyhow!("nats publish: {e}"))?
                .await
                .map_err(|e| anyhow!("nats puback: {e}"))?;
        if ack.duplicate {
            bail!("nats: publish {n} acked as a duplicate");
        }
        Ok(ack.sequence)
    }
}

pub struct Subscriber {
    _client: Client,
    messages: push::Ordered,
    /// subject -> (channel name, position it was opened at)
    channels: HashMap<String, (Arc<str>, u64)>,
}

impl system::Subscriber for Subscriber {
    type Pos = u64;

    async fn next(&mut self) -> Result<Delivery<u64>> {
        loop {
            let m = match self.messages.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) if e.kind() == push::OrderedErrorKind::MissingHeartbeat => {
                    continue; // a late heartbeat under load; the consumer goes on
                }
                Some(Err(e)) => bail!("nats ordered consumer: {e}"),
                None => bail!("nats ordered consumer ended"),
            };
            let seq = m
                .info()
                .map_err(|e| anyhow!("nats message info: {e}"))?
                .stream_sequence;
            let Some((channel, opened_at)) = self.channels.get(m.subject.as_str()) else {
                bail!("nats: a message on {} not subscribed to", m.subject);
            };
            if seq <= *opened_at {
                continue; // before this channel's own position (the consumer starts at the lowest)
            }
            return Ok(Delivery {
                channel: channel.clone(),
                pos: seq,
                payload: m.message.payload,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_token() {
        assert_eq!(token("b1732812345"), "b1732812345");
        assert_eq!(token("a.b*c>d e"), "a_b_c_d_e");
    }
}
