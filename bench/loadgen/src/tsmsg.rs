//! The tsmsg adapter: a client of PROTOCOL.md written from the document alone.
//!
//! * Framing: a 4-byte big-endian length, then one msgpack map (section 3).
//! * Handshake: `hello {v: 1, token}` with an HS256 JWT minted here from the server's
//!   secret (`--opt secret=...` or `TSMSG_SECRET`), claims `sub`, `iat`, `exp`, `scope`
//!   `["chat:read", "chat:send"]`, `channels` `["*"]` (section 5.1). An admission refusal
//!   (`rate_limited` before `welcome`, section 4) is retried after `retry_after_ms`.
//! * Publish: `send {rid, channel, cid, text}`; the `ok` (after the commit, section 9
//!   rule 3) resolves the publish with its `seq`. Replies are matched by `rid` (section 2),
//!   so many sends may be in flight on one connection.
//! * Subscribe: `join` each channel, then the reconnect algorithm of section 13.3: `sync`
//!   from the last applied seq in pages until `more: false`, buffering live `event` pushes
//!   meanwhile, dropping duplicates (`seq <= last`, section 9 rule 7), syncing again on a
//!   gap or a `resync` push with reason `cut` (section 14). A `resync` reply (compacted,
//!   ahead, epoch) cannot happen to a bench channel and is reported as an error.
//! * Heartbeat: a `ping` when nothing was sent for half of `welcome.heartbeat_ms`.
//! * TLS (`--tls`, section 4; `src/tls.rs`): the same code over either kind of connection.
//!   A refused handshake (certificate not trusted, wrong name) is not retried, and no
//!   `hello` is sent on it.
//! * WebSocket (an address `ws://host:port[/path]`, section 19; `src/link.rs`): the same
//!   frames, one per binary message of subprotocol `tsmsg.v1.msgpack`, without the length
//!   prefix; everything above the framing is shared with TCP.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, Instant, Sleep};

use crate::link::{self, Endpoint, FrameRd, FrameWr};
use crate::mp::{self, Reader, Val};
use crate::system::{Bytes, Config, Delivery, Publisher, Result, Subscriber, System};
use crate::tls::{HandshakeRefused, TlsClient};

const WRITE_BATCH: usize = 256 * 1024;
const HELLO_ATTEMPTS: u32 = 100;

type Conn = (FrameRd, FrameWr, Welcome);

/// What the adapter learned from `welcome`.
#[derive(Clone, Copy, Debug)]
struct Welcome {
    heartbeat_ms: u64,
    max_frame: usize,
    sync_max: u64,
}

pub struct Tsmsg {
    /// The nodes publishers (and replay and idle connections) use, round robin by id.
    addrs: Vec<Endpoint>,
    /// The nodes subscribers use, round robin by id.
    sub_addrs: Vec<Endpoint>,
    /// `--tls`: connect with TLS.
    tls: Option<TlsClient>,
    secret: Vec<u8>,
    /// Each loadgen process uses its own user ids: `<prefix><id>`.
    user_prefix: String,
    welcome: Welcome,
}

/// The fields of a frame (or of one `events` element) the adapter needs, read in place.
#[derive(Default, Debug)]
struct Fields<'a> {
    t: &'a str,
    rid: Option<i64>,
    channel: &'a str,
    seq: u64,
    kind: &'a str,
    text: Range<usize>,
    more: bool,
    epoch: u64,
    head: u64,
    code: &'a str,
    message: &'a str,
    reason: &'a str,
    retry_after_ms: u64,
    /// Where the `events` array's first element starts, and its length.
    events: Option<(usize, usize)>,
    heartbeat_ms: u64,
    max_frame: u64,
    sync_max: u64,
}

/// Parse the map at the reader's position.
fn fields<'a>(r: &mut Reader<'a>) -> Result<Fields<'a>> {
    let Val::Map(n) = r.next()? else {
        bail!("frame is not a map");
    };
    let mut f = Fields::default();
    for _ in 0..n {
        let key = r.next()?;
        let Val::Str(key) = key else {
            bail!("a map key that is not a string");
        };
        let v = r.next()?;
        match key {
            b"t" => f.t = v.as_str().unwrap_or(""),
            b"rid" => f.rid = v.as_i64(),
            b"channel" => f.channel = v.as_str().unwrap_or(""),
            b"seq" => f.seq = v.as_u64().unwrap_or(0),
            b"kind" => f.kind = v.as_str().unwrap_or(""),
            b"text" => {
                if let Val::Str(s) = v {
                    f.text = r.pos - s.len()..r.pos;
                }
            }
            b"more" => f.more = v.as_bool().unwrap_or(false),
            b"epoch" => f.epoch = v.as_u64().unwrap_or(0),
            b"head" => f.head = v.as_u64().unwrap_or(0),
            b"code" => f.code = v.as_str().unwrap_or(""),
            b"message" => f.message = v.as_str().unwrap_or(""),
            b"reason" => f.reason = v.as_str().unwrap_or(""),
            b"retry_after_ms" => f.retry_after_ms = v.as_u64().unwrap_or(0),
            b"heartbeat_ms" => f.heartbeat_ms = v.as_u64().unwrap_or(0),
            b"max_frame" => f.max_frame = v.as_u64().unwrap_or(0),
            b"events" => {
                if let Val::Array(k) = v {
                    f.events = Some((r.pos, k));
                }
            }
            b"limits" => {
                if let Val::Map(k) = v {
                    for _ in 0..k {
                        let lk = r.next()?;
                        let lv = r.next()?;
                        if lk == Val::Str(b"sync_max") {
                            f.sync_max = lv.as_u64().unwrap_or(0);
                        }
                        r.skip_rest(lv)?;
                    }
                    continue;
                }
            }
            _ => {}
        }
        r.skip_rest(v)?;
    }
    Ok(f)
}

fn parse(body: &[u8]) -> Result<Fields<'_>> {
    let mut r = Reader::new(body);
    let f = fields(&mut r)?;
    if r.pos != body.len() {
        bail!("bytes left after the frame's map");
    }
    Ok(f)
}

fn hs256_token(secret: &[u8], user: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({
        "sub": user,
        "iat": now,
        "exp": now + 24 * 3600,
        "scope": ["chat:read", "chat:send"],
        "channels": ["*"],
    });
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(signing.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing}.{sig}")
}

fn frame(build: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let at = mp::begin(&mut out);
    build(&mut out);
    mp::finish(&mut out, at);
    out
}

fn kv_str(out: &mut Vec<u8>, k: &str, v: &[u8]) {
    mp::str(out, k.as_bytes());
    mp::str(out, v);
}

fn kv_int(out: &mut Vec<u8>, k: &str, v: i64) {
    mp::str(out, k.as_bytes());
    mp::int(out, v);
}

fn sync_frame(rid: i64, channel: &str, since: u64, limit: u64, epoch: u64) -> Vec<u8> {
    frame(|o| {
        mp::map(o, if epoch != 0 { 6 } else { 5 });
        kv_str(o, "t", b"sync");
        kv_int(o, "rid", rid);
        kv_str(o, "channel", channel.as_bytes());
        kv_int(o, "since", since as i64);
        kv_int(o, "limit", limit as i64);
        if epoch != 0 {
            kv_int(o, "epoch", epoch as i64);
        }
    })
}

fn ping_frame() -> Vec<u8> {
    frame(|o| {
        mp::map(o, 1);
        kv_str(o, "t", b"ping");
    })
}

impl Tsmsg {
    fn user(&self, id: usize) -> String {
        format!("{}{id}", self.user_prefix)
    }

    /// Connection `id`'s node: round robin over `addrs`.
    fn addr<T>(addrs: &[T], id: usize) -> &T {
        &addrs[id % addrs.len()]
    }

    /// Connect to `addr` and complete the hello, retrying admission refusals and refused
    /// connects.
    async fn open(&self, addr: &Endpoint, user: &str) -> Result<Conn> {
        let token = hs256_token(&self.secret, user);
        let hello = frame(|o| {
            mp::map(o, 4);
            kv_str(o, "t", b"hello");
            kv_int(o, "rid", 0);
            kv_int(o, "v", 1);
            kv_str(o, "token", token.as_bytes());
        });
        let mut backoff = Duration::from_millis(20);
        let mut last_err = anyhow!("no attempt");
        for _ in 0..HELLO_ATTEMPTS {
            match self.try_hello(addr, &hello).await {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(retry_ms)) => sleep(Duration::from_millis(retry_ms.max(1))).await,
                Err(e) if e.is::<HandshakeRefused>() => return Err(e),
                Err(e) => {
                    last_err = e;
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        Err(last_err.context(format!("hello for {user} failed {HELLO_ATTEMPTS} times")))
    }

    /// Ok(Ok(conn)), Ok(Err(retry_after_ms)) on an admission refusal, Err otherwise.
    async fn try_hello(
        &self,
        addr: &Endpoint,
        hello: &[u8],
    ) -> Result<std::result::Result<Conn, u64>> {
        let (mut rd, mut wr) = link::connect(addr, self.tls.as_ref()).await?;
        wr.send(hello).await?;
        let body = rd.read_frame(self.welcome.max_frame).await?;
        let f = parse(&body)?;
        match f.t {
            "welcome" => {
                let mut w = self.welcome;
                if f.heartbeat_ms > 0 {
                    w.heartbeat_ms = f.heartbeat_ms;
                }
                if f.max_frame > 0 {
                    w.max_frame = f.max_frame as usize;
                }
                if f.sync_max > 0 {
                    w.sync_max = f.sync_max;
                }
                Ok(Ok((rd, wr, w)))
            }
            "error" if f.code == "rate_limited" => Ok(Err(f.retry_after_ms)),
            _ => bail!("hello refused: {} {}", f.code, f.message),
        }
    }
}

impl System for Tsmsg {
    type Pos = u64;
    type Publisher = TsPublisher;
    type Subscriber = TsSubscriber;
    type Idle = IdleConn;

    fn name(&self) -> &'static str {
        "tsmsg"
    }

    async fn connect(cfg: Config) -> Result<Self> {
        let secret = cfg
            .opt("secret")
            .map(str::to_owned)
            .or_else(|| std::env::var("TSMSG_SECRET").ok())
            .context("tsmsg needs the server's HS256 secret: --opt secret=... or TSMSG_SECRET")?;
        let parse = |v: &[String]| {
            v.iter()
                .map(|a| Endpoint::parse(a))
                .collect::<Result<Vec<_>>>()
        };
        let addrs = if cfg.addrs.is_empty() {
            vec![Endpoint::parse(&cfg.addr)?]
        } else {
            parse(&cfg.addrs)?
        };
        let sub_addrs = if cfg.sub_addrs.is_empty() {
            addrs.clone()
        } else {
            parse(&cfg.sub_addrs)?
        };
        // --tls: TLS on every connection, TCP or WebSocket (then wss://).
        let tls = match &cfg.tls {
            Some(args) => Some(TlsClient::new(args, addrs[0].host_port())?),
            None => None,
        };
        let mut sys = Tsmsg {
            addrs,
            sub_addrs,
            tls,
            secret: secret.into_bytes(),
            user_prefix: format!("{}-u", cfg.run_id),
            welcome: Welcome {
                heartbeat_ms: 30_000,
                max_frame: 1 << 20,
                sync_max: 5000,
            },
        };
        // Learn the limits from one welcome.
        let (_rd, _wr, w) = sys.open(&sys.addrs[0], &sys.user(0)).await?;
        sys.welcome = w;
        Ok(sys)
    }

    async fn prepare(&self, _channels: &[String]) -> Result<()> {
        Ok(()) // a channel's log is created by its first send
    }

    async fn publisher(&self, id: usize) -> Result<TsPublisher> {
        let user = self.user(id);
        let (rd, wr, _) = self.open(Self::addr(&self.addrs, id), &user).await?;
        let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let inner = Arc::new(PubInner {
            tx,
            pending: Mutex::new(HashMap::new()),
            rid: AtomicI64::new(1),
            cid_prefix: format!("{user}-{:x}", crate::system::now_ns()),
            dead: AtomicBool::new(false),
        });
        tokio::spawn(writer(wr, rx));
        tokio::spawn(pub_reader(rd, inner.clone(), self.welcome.max_frame));
        Ok(TsPublisher(inner))
    }

    async fn subscribe(&self, id: usize, from: Vec<(String, u64)>) -> Result<TsSubscriber> {
        let addr = Self::addr(&self.sub_addrs, id);
        let (rd, mut wr, _) = self.open(addr, &self.user(id)).await?;
        let (ftx, frx) = mpsc::channel(4096);
        let reader = tokio::spawn(sub_reader(rd, ftx, self.welcome.max_frame));
        let mut sub = TsSubscriber {
            frames: frx,
            reader,
            wr_buf: Vec::new(),
            writer_tx: None,
            chans: HashMap::new(),
            sync_rids: HashMap::new(),
            out: VecDeque::new(),
            rid: 1,
            sync_limit: self.welcome.sync_max,
            joins_pending: 0,
            ping_every: Duration::from_millis(self.welcome.heartbeat_ms / 2),
            ping_at: Box::pin(sleep(Duration::from_millis(self.welcome.heartbeat_ms / 2))),
        };
        let mut buf = Vec::new();
        for (name, last) in from {
            let rid = sub.next_rid();
            buf.extend(frame(|o| {
                mp::map(o, 3);
                kv_str(o, "t", b"join");
                kv_int(o, "rid", rid);
                kv_str(o, "channel", name.as_bytes());
            }));
            sub.joins_pending += 1;
            let name: Arc<str> = name.into();
            sub.chans.insert(
                name.clone(),
                Chan {
                    name,
                    last,
                    epoch: 0,
                    syncing: false,
                    pending: BTreeMap::new(),
                },
            );
        }
        let names: Vec<Arc<str>> = sub.chans.keys().cloned().collect();
        for name in names {
            sub.catch_up(&name);
        }
        buf.append(&mut sub.wr_buf);
        wr.send(&buf).await?;
        sub.wr_buf = Vec::new();
        let (wtx, wrx) = mpsc::unbounded_channel();
        tokio::spawn(writer(wr, wrx));
        sub.writer_tx = Some(wtx);
        // Wait until every join is answered: live pushes flow from then on.
        while sub.joins_pending > 0 {
            let body = sub
                .frames
                .recv()
                .await
                .context("connection closed during join")??;
            sub.handle(body)?;
        }
        Ok(sub)
    }

    async fn replay(&self, id: usize, channel: &str, after: u64, count: u64) -> Result<u64> {
        let addr = Self::addr(&self.addrs, id);
        let (mut rd, mut wr, _) = self.open(addr, &self.user(id)).await?;
        let mut since = after;
        let mut got = 0u64;
        let mut rid = 1;
        let mut epoch = 0;
        while got < count {
            let limit = self.welcome.sync_max.min(count - got);
            wr.send(&sync_frame(rid, channel, since, limit, epoch))
                .await?;
            let body = loop {
                let body = rd.read_frame(self.welcome.max_frame).await?;
                let f = parse(&body)?;
                if f.rid == Some(rid) {
                    break body;
                }
            };
            let f = parse(&body)?;
            match f.t {
                "ok" => {}
                "resync" => bail!("sync of {channel} answered resync ({})", f.reason),
                _ => bail!("sync of {channel} failed: {} {}", f.code, f.message),
            }
            epoch = f.epoch;
            let (at, n) = f.events.unwrap_or((0, 0));
            if n > 0 {
                // The last element's seq is the next `since`.
                let mut r = Reader {
                    buf: &body,
                    pos: at,
                };
                let mut last = since;
                for _ in 0..n {
                    last = fields(&mut r)?.seq;
                }
                since = last;
            }
            got += n as u64;
            rid += 1;
            if !f.more {
                break;
            }
        }
        Ok(got)
    }

    async fn idle(&self, id: usize) -> Result<IdleConn> {
        let addr = Self::addr(&self.addrs, id);
        let (mut rd, mut wr, _) = self.open(addr, &self.user(id)).await?;
        let every = Duration::from_millis(self.welcome.heartbeat_ms / 2);
        let max = self.welcome.max_frame;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if wr.send(&ping_frame()).await.is_err() {
                            break;
                        }
                    }
                    r = rd.read_frame(max) => {
                        if r.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(IdleConn(task))
    }
}

/// One batched writer per connection: frames queued by concurrent callers go out in as
/// few `write` calls as possible.
async fn writer(mut wr: FrameWr, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if wr.send(&buf).await.is_err() {
            break;
        }
    }
}

// --- publisher --------------------------------------------------------------------------

type Pending = Mutex<HashMap<i64, oneshot::Sender<Result<u64>>>>;

struct PubInner {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    rid: AtomicI64,
    cid_prefix: String,
    dead: AtomicBool,
}

#[derive(Clone)]
pub struct TsPublisher(Arc<PubInner>);

impl Publisher for TsPublisher {
    type Pos = u64;

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<u64> {
        let p = &self.0;
        let rid = p.rid.fetch_add(1, Ordering::Relaxed);
        let mut cid = [0u8; 80];
        let cid_len = {
            use std::io::Write;
            let mut w = &mut cid[..];
            write!(w, "{}-{rid}", p.cid_prefix)?;
            80 - w.len()
        };
        let mut out = Vec::with_capacity(payload.len() + channel.len() + 64);
        let at = mp::begin(&mut out);
        mp::map(&mut out, 5);
        kv_str(&mut out, "t", b"send");
        kv_int(&mut out, "rid", rid);
        kv_str(&mut out, "channel", channel.as_bytes());
        kv_str(&mut out, "cid", &cid[..cid_len]);
        kv_str(&mut out, "text", &payload);
        mp::finish(&mut out, at);
        let (tx, rx) = oneshot::channel();
        p.pending.lock().unwrap().insert(rid, tx);
        if p.dead.load(Ordering::Acquire) || p.tx.send(out).is_err() {
            p.pending.lock().unwrap().remove(&rid);
            bail!("publisher connection closed");
        }
        rx.await
            .map_err(|_| anyhow!("publisher connection closed"))?
    }
}

async fn pub_reader(mut rd: FrameRd, p: Arc<PubInner>, max: usize) {
    let err = loop {
        let body = match rd.read_frame(max).await {
            Ok(b) => b,
            Err(e) => break e,
        };
        let f = match parse(&body) {
            Ok(f) => f,
            Err(e) => break e,
        };
        let reply = match (f.t, f.rid) {
            ("ok", Some(rid)) => (rid, Ok(f.seq)),
            ("error", Some(rid)) => (rid, Err(anyhow!("send failed: {} {}", f.code, f.message))),
            ("error", None) => break anyhow!("connection error: {} {}", f.code, f.message),
            ("bye", _) => break anyhow!("server said bye"),
            _ => continue, // pong, pushes of other kinds
        };
        if let Some(tx) = p.pending.lock().unwrap().remove(&reply.0) {
            let _ = tx.send(reply.1);
        }
    };
    p.dead.store(true, Ordering::Release);
    for (_, tx) in p.pending.lock().unwrap().drain() {
        let _ = tx.send(Err(anyhow!("publisher connection lost: {err:#}")));
    }
}

// --- subscriber -------------------------------------------------------------------------

struct Chan {
    name: Arc<str>,
    last: u64,
    epoch: u64,
    syncing: bool,
    pending: BTreeMap<u64, Bytes>,
}

pub struct TsSubscriber {
    frames: mpsc::Receiver<Result<Bytes>>,
    reader: tokio::task::JoinHandle<()>,
    wr_buf: Vec<u8>,
    writer_tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    chans: HashMap<Arc<str>, Chan>,
    sync_rids: HashMap<i64, Arc<str>>,
    out: VecDeque<Delivery<u64>>,
    rid: i64,
    sync_limit: u64,
    joins_pending: usize,
    ping_every: Duration,
    ping_at: Pin<Box<Sleep>>,
}

impl Drop for TsSubscriber {
    fn drop(&mut self) {
        self.reader.abort(); // closes the read half; the writer ends with its channel
    }
}

async fn sub_reader(mut rd: FrameRd, tx: mpsc::Sender<Result<Bytes>>, max: usize) {
    loop {
        let r = rd.read_frame(max).await;
        let end = r.is_err();
        if tx.send(r).await.is_err() || end {
            break;
        }
    }
}

impl TsSubscriber {
    fn next_rid(&mut self) -> i64 {
        self.rid += 1;
        self.rid
    }

    /// Queue a frame: into `wr_buf` until the writer task exists, then to it.
    fn write(&mut self, f: Vec<u8>) {
        match &self.writer_tx {
            Some(tx) => {
                let _ = tx.send(f);
            }
            None => self.wr_buf.extend(f),
        }
        self.ping_at
            .as_mut()
            .reset(Instant::now() + self.ping_every);
    }

    fn catch_up(&mut self, name: &Arc<str>) {
        let rid = self.next_rid();
        let Some(ch) = self.chans.get_mut(name) else {
            return;
        };
        ch.syncing = true;
        let f = sync_frame(rid, &ch.name, ch.last, self.sync_limit, ch.epoch);
        self.sync_rids.insert(rid, ch.name.clone());
        self.write(f);
    }

    fn on_live(&mut self, channel: &str, seq: u64, payload: Bytes) {
        let Some(ch) = self.chans.get_mut(channel) else {
            return;
        };
        if ch.syncing {
            ch.pending.insert(seq, payload);
        } else if seq <= ch.last {
        } else if seq == ch.last + 1 {
            ch.last = seq;
            self.out.push_back(Delivery {
                channel: ch.name.clone(),
                pos: seq,
                payload,
            });
        } else {
            ch.pending.insert(seq, payload);
            let name = ch.name.clone();
            self.catch_up(&name);
        }
    }

    fn handle(&mut self, body: Bytes) -> Result<()> {
        let f = parse(&body)?;
        match f.t {
            "event" => {
                let payload = body.slice(f.text.clone());
                let (channel, seq) = (f.channel, f.seq);
                self.on_live(channel, seq, payload);
            }
            "ok" => {
                let Some(rid) = f.rid else { return Ok(()) };
                if let Some(name) = self.sync_rids.remove(&rid) {
                    self.on_page(&name, &body, &f)?;
                } else if f.channel.is_empty() {
                    // pong-like replies
                } else {
                    self.joins_pending = self.joins_pending.saturating_sub(1);
                }
            }
            "resync" => {
                if f.rid.is_some() || f.reason != "cut" {
                    bail!(
                        "{} answered resync ({}): not expected in a bench",
                        f.channel,
                        f.reason
                    );
                }
                if let Some(ch) = self.chans.get(f.channel) {
                    if !ch.syncing {
                        let name = ch.name.clone();
                        self.catch_up(&name);
                    }
                }
            }
            "error" => bail!("server error: {} {}", f.code, f.message),
            "bye" => bail!("server said bye"),
            _ => {}
        }
        Ok(())
    }

    fn on_page(&mut self, name: &Arc<str>, body: &Bytes, f: &Fields<'_>) -> Result<()> {
        let ch = self
            .chans
            .get_mut(name)
            .context("sync reply for an unknown channel")?;
        if f.epoch != 0 {
            ch.epoch = f.epoch;
        }
        if let Some((at, n)) = f.events {
            let mut r = Reader { buf: body, pos: at };
            for _ in 0..n {
                let e = fields(&mut r)?;
                if e.seq <= ch.last {
                    continue;
                }
                ch.last = e.seq;
                if e.kind == "message" {
                    self.out.push_back(Delivery {
                        channel: ch.name.clone(),
                        pos: e.seq,
                        payload: body.slice(e.text.clone()),
                    });
                }
            }
        }
        if f.more {
            let name = ch.name.clone();
            self.catch_up(&name);
            return Ok(());
        }
        ch.syncing = false;
        let pending = std::mem::take(&mut ch.pending);
        let mut iter = pending.into_iter();
        for (seq, payload) in iter.by_ref() {
            if seq <= ch.last {
                continue;
            }
            if seq == ch.last + 1 {
                ch.last = seq;
                self.out.push_back(Delivery {
                    channel: ch.name.clone(),
                    pos: seq,
                    payload,
                });
            } else {
                ch.pending.insert(seq, payload);
                ch.pending.extend(iter);
                let name = ch.name.clone();
                self.catch_up(&name);
                break;
            }
        }
        Ok(())
    }
}

impl Subscriber for TsSubscriber {
    type Pos = u64;

    async fn next(&mut self) -> Result<Delivery<u64>> {
        loop {
            if let Some(d) = self.out.pop_front() {
                return Ok(d);
            }
            let body = match self.frames.try_recv() {
                Ok(b) => b,
                Err(_) => tokio::select! {
                    b = self.frames.recv() => b.context("connection closed")?,
                    _ = self.ping_at.as_mut() => {
                        self.write(ping_frame());
                        continue;
                    }
                },
            }?;
            self.handle(body)?;
        }
    }
}

/// An idle connection; dropping it closes the connection.
pub struct IdleConn(tokio::task::JoinHandle<()>);

impl Drop for IdleConn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_spread_round_robin_over_nodes() {
        let nodes: Vec<String> = ["n1", "n2", "n3"].map(String::from).to_vec();
        let got: Vec<&str> = (0..4).map(|id| Tsmsg::addr(&nodes, id).as_str()).collect();
        assert_eq!(got, ["n1", "n2", "n3", "n1"]);
    }

    #[test]
    fn token_is_three_base64url_parts() {
        let t = hs256_token(b"0123456789abcdef0123456789abcdef", "u1");
        assert_eq!(t.split('.').count(), 3);
        let claims = URL_SAFE_NO_PAD
            .decode(t.split('.').nth(1).unwrap())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&claims).unwrap();
        assert_eq!(v["sub"], "u1");
        assert!(v["scope"].is_array());
    }

    /// A certificate the CA does not vouch for stops `connect` at the first attempt (no
    /// retries, no hello), with an error that says why.
    #[tokio::test]
    async fn untrusted_server_certificate_fails_at_once() {
        let cfg = Config {
            addr: crate::tls::tests::echo_server().await,
            extra: vec![("secret".into(), "s".repeat(32))],
            tls: Some(crate::tls::TlsArgs {
                ca: Some(crate::tls::tests::testdata("other-ca.pem")),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let err = Tsmsg::connect(cfg).await.err().unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "retried: {err:#}");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("UnknownIssuer") && msg.contains("--tls-ca"),
            "{msg}"
        );
    }

    /// With --tls a ws:// address is wss://: the name verified is the address's host
    /// (127.0.0.1), not a name made of the URL. A server of an untrusted CA: refused at
    /// once, naming the name it was verified as.
    #[tokio::test]
    async fn tls_with_a_websocket_address_verifies_its_host() {
        let addr = crate::tls::tests::echo_server().await;
        let cfg = Config {
            addr: format!("ws://{addr}/connect"),
            extra: vec![("secret".into(), "s".repeat(32))],
            tls: Some(crate::tls::TlsArgs {
                ca: Some(crate::tls::tests::testdata("other-ca.pem")),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = Tsmsg::connect(cfg).await.err().unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("verifying the server as \"127.0.0.1\""),
            "{msg}"
        );
    }

    #[test]
    fn parses_protocol_example_sync_reply() {
        // PROTOCOL.md section 18, "Example: ok (sync)", without the length prefix.
        let hex = "87a174a26f6ba372696405a76368616e6e656ca6726f6f6d2d31a66576656e747391\
                   88a174a56576656e74a76368616e6e656ca6726f6f6d2d31a373657101a46b696e64\
                   a76d657373616765a269 64a3312d31a673656e646572a5616c696365a274 73cf00\
                   00019b76daa8faa474657874a26869a46d6f7265c2a468656164 01a565706f636801";
        let b: Vec<u8> = hex
            .split_whitespace()
            .collect::<String>()
            .as_bytes()
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
            .collect();
        let f = parse(&b).unwrap();
        assert_eq!(
            (f.t, f.rid, f.channel, f.more, f.head, f.epoch),
            ("ok", Some(5), "room-1", false, 1, 1)
        );
        let (at, n) = f.events.unwrap();
        assert_eq!(n, 1);
        let e = fields(&mut Reader { buf: &b, pos: at }).unwrap();
        assert_eq!(
            (e.seq, e.kind, &b[e.text.clone()]),
            (1, "message", &b"hi"[..])
        );
    }
}
