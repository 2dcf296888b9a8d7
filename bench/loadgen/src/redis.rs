//! Redis Streams adapter (redis-rs on tokio; subscribers read RESP themselves, see below).
//!
//! Model: a tsmsg channel is one stream key (the channel name itself; names are unique per
//! run). A position is the entry id Redis assigns (`XADD key *`, `<ms>-<seq>`): ids grow
//! strictly within a key, so "after position p" is `XREAD ... p` / `XRANGE key (p`. Positions
//! are therefore not dense 1, 2, 3... as tsmsg's seqs are; the workloads treat them as opaque.
//! Each entry has one field, `p`, holding the payload.
//!
//! * publish: `XADD key * p <payload>`; the reply is the ack. Under `appendfsync always` Redis
//!   writes and fsyncs the AOF for the whole event-loop iteration before it sends the
//!   replies (a group commit), under `everysec` it replies before the fsync.
//!   A publisher is one multiplexed connection: concurrent publishes on its clones are
//!   pipelined on it (the window).
//! * delivery: a subscriber is one plain TCP connection of its own that sends `XREAD COUNT
//!   n BLOCK 0 STREAMS k1..kn id1..idn` (the backlog after each id first, then live entries)
//!   and, as soon as a reply is in, the next one from the ids it just got, then hands out the
//!   entries. The command is packed by redis-rs; the reply is read by the small RESP reader
//!   below, zero-copy (a payload is a slice of the reply it came in), without redis-rs's
//!   multiplexer task and `Value` tree: a delivery then costs the load generator about what
//!   one costs the other adapters (tsmsg's reads its frames in place for the same reason).
//! * replay: `XRANGE key (after + COUNT page` until `count` entries or a short page, on a
//!   connection of its own (a client that syncs).
//! * idle: one connection with nothing pending (the server runs with `timeout 0`).
//!
//! Options (`--opt key=value`): `page` (XRANGE COUNT, default 5,000: tsmsg's `sync_max`, the
//! page its adapter asks for), `read_count` (XREAD COUNT per stream, default 5,000 likewise).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use bytes::BytesMut;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::system::{self, Bytes, Config, Delivery, Result};

/// A stream entry id, `<ms>-<seq>`; the default `0-0` is before every entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (ms, seq) = s
            .split_once('-')
            .ok_or_else(|| anyhow!("bad entry id {s:?}"))?;
        Ok(EntryId {
            ms: ms.parse()?,
            seq: seq.parse()?,
        })
    }
}

impl EntryId {
    fn from_value(v: &Value) -> Result<Self> {
        match v {
            Value::BulkString(b) => std::str::from_utf8(b)?.parse(),
            Value::SimpleString(s) => s.parse(),
            other => bail!("entry id: unexpected reply {other:?}"),
        }
    }
}

pub struct Redis {
    client: redis::Client,
    /// host:port, for the subscribers' plain connections.
    tcp_addr: String,
    page: usize,
    read_count: usize,
}

fn opt_usize(cfg: &Config, key: &str, default: usize) -> Result<usize> {
    cfg.opt(key).map_or(Ok(default), |v| {
        v.parse().with_context(|| format!("--opt {key}={v}"))
    })
}

impl Redis {
    async fn connection(&self) -> Result<MultiplexedConnection> {
        // No response timeout: under load an fsync-tier ack may take seconds, and a stall is
        // the figure being measured, not an error.
        let config = AsyncConnectionConfig::new();
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .context("redis connect")?;
        Ok(conn)
    }
}

/// The entries of an XRANGE reply: `[[id, [field, value]], ...]`.
/// Calls `f(id, payload)` for each; the payload buffer is moved, not copied.
fn for_each_entry(entries: Value, mut f: impl FnMut(EntryId, Bytes)) -> Result<()> {
    let Value::Array(entries) = entries else {
        bail!("entries: unexpected reply {entries:?}");
    };
    for entry in entries {
        let Value::Array(mut parts) = entry else {
            bail!("entry: unexpected reply {entry:?}");
        };
        if parts.len() != 2 {
            bail!("entry: {} parts", parts.len());
        }
        let fields = parts.pop().expect("two parts");
        let id = EntryId::from_value(&parts[0])?;
        let Value::Array(mut fields) = fields else {
            bail!("entry fields: unexpected reply {fields:?}");
        };
        if fields.len() != 2 {
            bail!(
                "entry {id}: {} field values, not 2 (p <payload>)",
                fields.len()
            );
        }
        match fields.pop().expect("two values") {
            Value::BulkString(b) => f(id, Bytes::from(b)),
            other => bail!("entry {id}: payload {other:?}"),
        }
    }
    Ok(())
}

impl system::System for Redis {
    type Pos = EntryId;
    type Publisher = Publisher;
    type Subscriber = Subscriber;
    type Idle = MultiplexedConnection;

    fn name(&self) -> &'static str {
        "redis"
    }

    async fn connect(cfg: Config) -> Result<Self> {
        let url = if cfg.addr.contains("://") {
            cfg.addr.clone()
        } else {
            format!("redis://{}/", cfg.addr)
        };
        let client = redis::Client::open(url).context("redis url")?;
        let tcp_addr = match &client.get_connection_info().addr {
            redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            other => bail!("redis: only plain TCP is supported, not {other:?}"),
        };
        let this = Redis {
            client,
            tcp_addr,
            page: opt_usize(&cfg, "page", 5000)?,
            read_count: opt_usize(&cfg, "read_count", 5000)?,
        };
        let mut conn = this.connection().await?;
        let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
        if pong != "PONG" {
            bail!("redis PING answered {pong:?}");
        }
        Ok(this)
    }

    async fn prepare(&self, _channels: &[String]) -> Result<()> {
        Ok(()) // XADD creates a stream; XREAD BLOCK waits on a key that does not exist yet
    }

    async fn publisher(&self, _id: usize) -> Result<Publisher> {
        Ok(Publisher {
            conn: self.connection().await?,
        })
    }

    async fn subscribe(&self, _id: usize, from: Vec<(String, EntryId)>) -> Result<Subscriber> {
        if from.is_empty() {
            bail!("subscribe to no channel");
        }
        let stream = TcpStream::connect(&self.tcp_addr)
            .await
            .with_context(|| format!("redis connect {}", self.tcp_addr))?;
        stream.set_nodelay(true)?;
        let mut sub = Subscriber {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            keys: Keys {
                index: from
                    .iter()
                    .enumerate()
                    .map(|(i, (c, _))| (c.as_bytes().into(), i))
                    .collect(),
                names: from.iter().map(|(c, _)| Arc::from(c.as_str())).collect(),
            },
            last: from.iter().map(|(_, p)| *p).collect(),
            read_count: self.read_count,
            buf: VecDeque::new(),
        };
        sub.send_xread().await?;
        Ok(sub)
    }

    async fn replay(&self, _id: usize, channel: &str, after: EntryId, count: u64) -> Result<u64> {
        let mut conn = self.connection().await?;
        let mut last = after;
        let mut read = 0u64;
        while read < count {
            let page = (count - read).min(self.page as u64);
            let reply: Value = redis::cmd("XRANGE")
                .arg(channel)
                .arg(format!("({last}"))
                .arg("+")
                .arg("COUNT")
                .arg(page)
                .query_async(&mut conn)
                .await?;
            let mut got = 0u64;
            for_each_entry(reply, |id, _payload| {
                last = id;
                got += 1;
            })?;
            read += got;
            if got < page {
                break; // the end of the stream
            }
        }
        Ok(read)
    }

    async fn idle(&self, _id: usize) -> Result<MultiplexedConnection> {
        self.connection().await
    }
}

/// A multiplexed connection; clones share it and pipeline their XADDs on it.
#[derive(Clone)]
pub struct Publisher {
    conn: MultiplexedConnection,
}

impl system::Publisher for Publisher {
    type Pos = EntryId;

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<EntryId> {
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XADD")
            .arg(channel)
            .arg("*")
            .arg("p")
            .arg(payload.as_ref())
            .query_async(&mut conn)
            .await
            .context("XADD")?;
        EntryId::from_value(&reply)
    }
}

/// One plain connection with one `XREAD` always outstanding.
pub struct Subscriber {
    stream: TcpStream,
    rbuf: BytesMut,
    keys: Keys,
    /// The id of the last entry received per key: where the next `XREAD` starts.
    last: Vec<EntryId>,
    read_count: usize,
    buf: VecDeque<Delivery<EntryId>>,
}

impl Subscriber {
    async fn send_xread(&mut self) -> Result<()> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(self.read_count)
            .arg("BLOCK")
            .arg(0)
            .arg("STREAMS");
        for name in &self.keys.names {
            cmd.arg(name.as_bytes());
        }
        for id in &self.last {
            cmd.arg(id.to_string());
        }
        self.stream.write_all(&cmd.get_packed_command()).await?;
        Ok(())
    }
}

/// The channels of one subscriber: key -> index, and index -> name.
struct Keys {
    index: HashMap<Box<[u8]>, usize>,
    names: Vec<Arc<str>>,
}

/// Parse one complete XREAD reply (RESP2) into `out`, advancing `last`.
fn parse_xread(
    frame: Bytes,
    keys: &Keys,
    last: &mut [EntryId],
    out: &mut VecDeque<Delivery<EntryId>>,
) -> Result<()> {
    let mut r = Resp::new(frame);
    let Some(streams) = r.array()? else {
        return Ok(()); // nil: a timeout (not with BLOCK 0)
    };
    for _ in 0..streams {
        if r.array()? != Some(2) {
            bail!("XREAD: a stream is not [key, entries]");
        }
        let key = r.bulk()?.ok_or_else(|| anyhow!("XREAD: nil key"))?;
        let i = *keys
            .index
            .get(&key[..])
            .ok_or_else(|| anyhow!("XREAD: a key not asked for"))?;
        let entries = r.array()?.unwrap_or(0);
        for _ in 0..entries {
            if r.array()? != Some(2) {
                bail!("XREAD: an entry is not [id, fields]");
            }
            let id = r.bulk()?.ok_or_else(|| anyhow!("XREAD: nil id"))?;
            let id: EntryId = std::str::from_utf8(&id)?.parse()?;
            if r.array()? != Some(2) {
                bail!("XREAD: entry {id} has not one field (p <payload>)");
            }
            r.bulk()?; // the field name, p
            let payload = r.bulk()?.ok_or_else(|| anyhow!("XREAD: nil payload"))?;
            last[i] = id;
            out.push_back(Delivery {
                channel: keys.names[i].clone(),
                pos: id,
                payload,
            });
        }
    }
    Ok(())
}

impl system::Subscriber for Subscriber {
    type Pos = EntryId;

    /// Cancel-safe while it waits for a reply (the partial reply stays in `rbuf`).
    async fn next(&mut self) -> Result<Delivery<EntryId>> {
        loop {
            if let Some(d) = self.buf.pop_front() {
                return Ok(d);
            }
            match resp_end(&self.rbuf, 0)? {
                Some(end) => {
                    let frame = self.rbuf.split_to(end).freeze();
                    parse_xread(frame, &self.keys, &mut self.last, &mut self.buf)?;
                    self.send_xread().await?; // the server fills it while these are handed out
                }
                None => {
                    // A large reply (a catch-up page) is rescanned from its start after
                    // each read: read in chunks that grow with it.
                    let want = (self.rbuf.len()).clamp(64 * 1024, 4 << 20);
                    if self.rbuf.capacity() - self.rbuf.len() < want / 2 {
                        self.rbuf.reserve(want);
                    }
                    if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                        bail!("redis subscriber: connection closed");
                    }
                }
            }
        }
    }
}

// --- RESP2 -----------------------------------------------------------------------------

/// The end of the CRLF-terminated line starting at `pos` (the index after its LF).
fn line_end(buf: &[u8], pos: usize) -> Option<usize> {
    let nl = buf.get(pos..)?.iter().position(|&b| b == b'\n')?;
    Some(pos + nl + 1)
}

fn line_int(line: &[u8]) -> Result<i64> {
    let text = std::str::from_utf8(line.strip_suffix(b"\r\n").unwrap_or(line))?;
    Ok(text.parse()?)
}

/// The end of the RESP2 value starting at `pos`, or None while it is incomplete.
fn resp_end(buf: &[u8], pos: usize) -> Result<Option<usize>> {
    let Some(end) = line_end(buf, pos) else {
        return Ok(None);
    };
    let line = &buf[pos + 1..end];
    match buf[pos] {
        b'+' | b':' => Ok(Some(end)),
        b'-' => bail!("redis: {}", String::from_utf8_lossy(line).trim_end()),
        b'$' => {
            let n = line_int(line)?;
            if n < 0 {
                return Ok(Some(end));
            }
            let stop = end + n as usize + 2;
            Ok((buf.len() >= stop).then_some(stop))
        }
        b'*' => {
            let n = line_int(line)?;
            let mut at = end;
            for _ in 0..n.max(0) {
                match resp_end(buf, at)? {
                    Some(next) => at = next,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        other => bail!("redis: RESP type byte {other:#04x} not expected (RESP2 only)"),
    }
}

/// A reader over one complete RESP2 value; bulk strings are zero-copy slices of it.
struct Resp {
    buf: Bytes,
    pos: usize,
}

impl Resp {
    fn new(buf: Bytes) -> Self {
        Resp { buf, pos: 0 }
    }

    fn header(&mut self, kind: u8) -> Result<i64> {
        let end = line_end(&self.buf, self.pos).ok_or_else(|| anyhow!("RESP cut short"))?;
        if self.buf[self.pos] != kind {
            bail!(
                "RESP: expected {:?}, got {:?}",
                kind as char,
                self.buf[self.pos] as char
            );
        }
        let n = line_int(&self.buf[self.pos + 1..end])?;
        self.pos = end;
        Ok(n)
    }

    /// An array's length; None for a nil array.
    fn array(&mut self) -> Result<Option<usize>> {
        let n = self.header(b'*')?;
        Ok((n >= 0).then_some(n as usize))
    }

    /// A bulk string; None for nil.
    fn bulk(&mut self) -> Result<Option<Bytes>> {
        let n = self.header(b'$')?;
        if n < 0 {
            return Ok(None);
        }
        let (start, stop) = (self.pos, self.pos + n as usize);
        if stop + 2 > self.buf.len() {
            bail!("RESP bulk string cut short");
        }
        self.pos = stop + 2;
        Ok(Some(self.buf.slice(start..stop)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_id_order_and_text() {
        let a: EntryId = "1767225600250-0".parse().unwrap();
        let b: EntryId = "1767225600250-7".parse().unwrap();
        assert!(EntryId::default() < a && a < b);
        assert_eq!(b.to_string(), "1767225600250-7");
        assert!("17".parse::<EntryId>().is_err());
    }

    #[test]
    fn parses_xread_reply_in_pieces() {
        let reply: &[u8] = b"*1\r\n*2\r\n$4\r\nroom\r\n*2\r\n\
            *2\r\n$3\r\n5-0\r\n*2\r\n$1\r\np\r\n$1\r\na\r\n\
            *2\r\n$3\r\n5-1\r\n*2\r\n$1\r\np\r\n$2\r\nbc\r\n";
        for cut in 0..reply.len() {
            assert_eq!(resp_end(&reply[..cut], 0).unwrap(), None, "cut at {cut}");
        }
        let mut two = reply.to_vec();
        two.extend_from_slice(b"+OK\r\n");
        assert_eq!(resp_end(&two, 0).unwrap(), Some(reply.len()));
        let keys = Keys {
            index: [(b"room".to_vec().into_boxed_slice(), 0)]
                .into_iter()
                .collect(),
            names: vec![Arc::from("room")],
        };
        let mut last = vec![EntryId::default()];
        let mut out = VecDeque::new();
        parse_xread(Bytes::copy_from_slice(reply), &keys, &mut last, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(&*out[1].channel, "room");
        assert_eq!(out[1].pos, EntryId { ms: 5, seq: 1 });
        assert_eq!(&out[1].payload[..], b"bc");
        assert_eq!(last[0], EntryId { ms: 5, seq: 1 });
        assert!(resp_end(b"-ERR wrong\r\n", 0).is_err());
        assert_eq!(resp_end(b"*-1\r\n", 0).unwrap(), Some(5));
    }
}
