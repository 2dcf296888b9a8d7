//! The workloads of issue #8, generic over [`System`]. Each returns one JSON object.
//!
//! Latency modes: flat out (each publisher keeps `window` publishes in flight, closed loop)
//! or open loop (`rate` messages/s in total, sent at scheduled times by a pacer thread;
//! every latency is measured from the *scheduled* time, so a stalled system is charged for
//! the sends it delayed: no coordinated omission). In both modes the payload carries its
//! (scheduled) send time, which subscribers use for publish-to-deliver latency.
//!
//! Only samples whose send time falls in the measured window (after the warm-up) count.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use futures::stream::{self, StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::system::{now_ns, parse_stamp, stamp, Publisher, Result, Subscriber, System};

#[derive(Clone, Debug)]
pub struct Params {
    pub run_id: String,
    pub publishers: usize,
    pub window: usize,
    pub size: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Open loop: total offered messages/s. None: flat out.
    pub rate: Option<f64>,
    pub subscribers: usize,
    pub channels: usize,
    pub connections: usize,
    pub zipf_s: f64,
    pub entries: u64,
    pub clients: usize,
    pub backlog: u64,
    pub idle: usize,
    pub hold_s: f64,
    pub connect_concurrency: usize,
    /// The server processes whose CPU is measured (the first one's RSS for `idle`).
    pub server_pids: Vec<i32>,
    pub drain_s: f64,
}

// --- measurement ------------------------------------------------------------------------

pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 600_000_000_000, 3).expect("valid bounds")
}

fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.max(1_000));
}

/// Percentiles in milliseconds.
pub fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    let ms = |v: u64| (v as f64 / 1e6 * 1000.0).round() / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p90_ms": ms(h.value_at_quantile(0.9)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": ms(h.mean() as u64),
    })
}

fn own_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// utime + stime of a process (all threads) from /proc/<pid>/stat.
pub fn proc_cpu_s(pid: i32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

pub fn proc_rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// CPU of both sides over a phase. The server side is the sum over `--server-pid`s; with
/// more than one (several nodes and their Redis), `per_pid` has each one's share.
pub struct Meter {
    t0: std::time::Instant,
    own0: f64,
    servers0: Vec<(i32, Option<f64>)>,
}

impl Meter {
    pub fn start(pids: &[i32]) -> Self {
        Meter {
            t0: std::time::Instant::now(),
            own0: own_cpu_s(),
            servers0: pids.iter().map(|&pid| (pid, proc_cpu_s(pid))).collect(),
        }
    }

    /// CPU figures for `messages` messages (and optionally `deliveries` deliveries).
    pub fn finish(&self, messages: u64, deliveries: Option<u64>) -> Value {
        let wall = self.t0.elapsed().as_secs_f64();
        let own = own_cpu_s() - self.own0;
        let per_pid: Option<Vec<(i32, f64)>> = self
            .servers0
            .iter()
            .map(|&(pid, a)| Some((pid, proc_cpu_s(pid)? - a?)))
            .collect();
        let server = per_pid
            .as_ref()
            .filter(|v| !v.is_empty())
            .map(|v| v.iter().map(|(_, s)| s).sum::<f64>());
        let per_m = |cpu: f64, n: u64| {
            if n > 0 {
                cpu / n as f64 * 1e6
            } else {
                f64::NAN
            }
        };
        let mut v = json!({
            "phase_wall_s": wall,
            "loadgen_cpu_s": own,
            "loadgen_cpu_share": own / wall,
            "loadgen_cpu_us_per_msg": per_m(own, messages),
        });
        if let Some(s) = server {
            v["server_cpu_s"] = json!(s);
            v["server_cpu_share"] = json!(s / wall);
            v["server_cpu_s_per_million_msgs"] = json!(per_m(s, messages));
        }
        if let Some(each) = per_pid.filter(|v| v.len() > 1) {
            v["per_pid"] = each
                .iter()
                .map(|&(pid, s)| json!({"pid": pid, "cpu_s": s, "cpu_share": s / wall}))
                .collect();
        }
        if let Some(d) = deliveries {
            v["loadgen_cpu_us_per_delivery"] = json!(per_m(own, d));
            if let Some(s) = server {
                v["server_cpu_s_per_million_deliveries"] = json!(per_m(s, d));
            }
        }
        v
    }
}

/// Counts and latencies of one task, shared so the task can be aborted at the end.
#[derive(Clone)]
struct Stats(Arc<Mutex<(Histogram<u64>, u64)>>);

impl Stats {
    fn new() -> Self {
        Stats(Arc::new(Mutex::new((hist(), 0))))
    }
    fn add(&self, ns: u64) {
        let mut g = self.0.lock().unwrap();
        record(&mut g.0, ns);
        g.1 += 1;
    }
    fn merge(all: &[Stats]) -> (Histogram<u64>, u64) {
        let mut h = hist();
        let mut n = 0;
        for s in all {
            let g = s.0.lock().unwrap();
            h.add(&g.0).expect("same bounds");
            n += g.1;
        }
        (h, n)
    }
}

/// The measured window, in [`now_ns`] time.
#[derive(Clone, Copy)]
struct Window {
    from: u64,
    to: u64,
}

impl Window {
    fn new(p: &Params) -> Self {
        let from = now_ns() + (p.warmup_s * 1e9) as u64;
        Window {
            from,
            to: from + (p.duration_s * 1e9) as u64,
        }
    }
    fn contains(&self, t: u64) -> bool {
        (self.from..self.to).contains(&t)
    }
    fn secs(&self) -> f64 {
        (self.to - self.from) as f64 / 1e9
    }
}

async fn sleep_until_ns(t: u64) {
    let now = now_ns();
    if t > now {
        tokio::time::sleep(Duration::from_nanos(t - now)).await;
    }
}

// --- publishing -------------------------------------------------------------------------

/// Chooses the channel of each message.
#[derive(Clone)]
enum Chooser {
    One(Arc<str>),
    Zipf(Arc<Vec<String>>, Arc<Vec<f64>>),
}

impl Chooser {
    fn zipf(names: Vec<String>, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(names.len());
        let mut acc = 0.0;
        for k in 1..=names.len() {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Chooser::Zipf(Arc::new(names), Arc::new(cdf))
    }
    fn pick(&self, rng: &mut SmallRng) -> &str {
        match self {
            Chooser::One(c) => c,
            Chooser::Zipf(names, cdf) => {
                let u: f64 = rng.gen();
                let i = cdf.partition_point(|&c| c < u).min(names.len() - 1);
                &names[i]
            }
        }
    }
}

struct PubResult {
    acked: Stats,
    sent: Arc<AtomicU64>,
    acked_total: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    pacer_lag: Stats,
}

/// Run publishers over the window (flat out or open loop) and wait for their last acks.
/// One publish's outcome: an ack counts (its latency from `sent`, scheduled or actual,
/// when inside the window); the first error is printed. False on an error.
fn count_ack<T>(
    r: Result<T>,
    sent: u64,
    w: &Window,
    st: &Stats,
    acked: &AtomicU64,
    errors: &AtomicU64,
) -> bool {
    match r {
        Ok(_) => {
            acked.fetch_add(1, Ordering::Relaxed);
            if w.contains(sent) {
                st.add(now_ns() - sent);
            }
            true
        }
        Err(e) => {
            if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("publish error: {e:#}");
            }
            false
        }
    }
}

async fn run_publishers<S: System>(
    pubs: &[S::Publisher],
    chooser: Chooser,
    p: &Params,
    w: Window,
) -> Result<PubResult> {
    let acked = Stats::new();
    let pacer_lag = Stats::new();
    let sent = Arc::new(AtomicU64::new(0));
    let acked_total = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let size = p.size;
    match p.rate {
        None => {
            for (i, pb) in pubs.iter().enumerate() {
                for j in 0..p.window {
                    let (pb, ch, st) = (pb.clone(), chooser.clone(), acked.clone());
                    let (sent, at, err) = (sent.clone(), acked_total.clone(), errors.clone());
                    let mut rng = SmallRng::seed_from_u64((i * 1000 + j) as u64);
                    tasks.push(tokio::spawn(async move {
                        loop {
                            let t = now_ns();
                            if t >= w.to {
                                break;
                            }
                            sent.fetch_add(1, Ordering::Relaxed);
                            let c = ch.pick(&mut rng).to_owned();
                            let r = pb.publish(&c, stamp(t, size)).await;
                            if !count_ack(r, t, &w, &st, &at, &err) {
                                break;
                            }
                        }
                    }));
                }
            }
        }
        Some(rate) => {
            // One pacer thread computes every send time (round robin over publishers) and
            // hands them to per-publisher dispatchers; each holds `window` permits.
            let n = pubs.len();
            let mut txs = Vec::new();
            for (i, pb) in pubs.iter().enumerate() {
                let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
                txs.push(tx);
                let sem = Arc::new(Semaphore::new(p.window.max(1)));
                let (pb, ch, st, lag) = (
                    pb.clone(),
                    chooser.clone(),
                    acked.clone(),
                    pacer_lag.clone(),
                );
                let (sent, at, err) = (sent.clone(), acked_total.clone(), errors.clone());
                let mut rng = SmallRng::seed_from_u64(i as u64);
                tasks.push(tokio::spawn(async move {
                    let mut inflight = Vec::new();
                    while let Some(sched) = rx.recv().await {
                        let permit = sem.clone().acquire_owned().await.expect("open");
                        let issued = now_ns();
                        if w.contains(sched) {
                            lag.add(issued.saturating_sub(sched));
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        let c = ch.pick(&mut rng).to_owned();
                        let (pb, st, at, err) = (pb.clone(), st.clone(), at.clone(), err.clone());
                        inflight.push(tokio::spawn(async move {
                            let r = pb.publish(&c, stamp(sched, size)).await;
                            drop(permit);
                            count_ack(r, sched, &w, &st, &at, &err);
                        }));
                        if inflight.len() > 4096 {
                            inflight.retain(|h: &JoinHandle<()>| !h.is_finished());
                        }
                    }
                    for h in inflight {
                        let _ = h.await;
                    }
                }));
            }
            let interval = 1e9 / rate;
            let start = now_ns();
            std::thread::spawn(move || {
                let mut k: u64 = 0;
                loop {
                    let sched = start + (k as f64 * interval) as u64;
                    if sched >= w.to {
                        break;
                    }
                    let now = now_ns();
                    if sched > now {
                        std::thread::sleep(Duration::from_nanos(sched - now));
                    }
                    if txs[(k as usize) % n].send(sched).is_err() {
                        break;
                    }
                    k += 1;
                }
            });
        }
    }
    // Wait for the window, then for the last acks (bounded).
    sleep_until_ns(w.to).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(p.drain_s);
    for t in tasks {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(left, t).await.is_err() {
            eprintln!("publishers still busy {:.0} s after the window", p.drain_s);
            break;
        }
    }
    Ok(PubResult {
        acked,
        sent,
        acked_total,
        errors,
        pacer_lag,
    })
}

async fn open_publishers<S: System>(
    sys: &Arc<S>,
    n: usize,
    base: usize,
    conc: usize,
) -> Result<Vec<S::Publisher>> {
    stream::iter(0..n)
        .map(|i| {
            let sys = sys.clone();
            async move { sys.publisher(base + i).await }
        })
        .buffered(conc.max(1))
        .try_collect()
        .await
}

/// Subscribers, each a task counting deliveries (total, and latency in the window).
struct Subs<P> {
    tasks: Vec<JoinHandle<()>>,
    stats: Vec<Stats>,
    received: Vec<Arc<AtomicU64>>,
    /// The position of each subscriber's last delivery (the default before any).
    last: Vec<Arc<Mutex<P>>>,
    failed: Arc<AtomicBool>,
}

impl<P> Subs<P> {
    fn total(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum()
    }
    async fn wait_total(&self, want: u64, secs: f64) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(secs);
        while self.total() < want {
            if std::time::Instant::now() > deadline || self.failed.load(Ordering::Relaxed) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

impl<P> Drop for Subs<P> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn start_subscribers<S: System>(
    sys: &Arc<S>,
    groups: Vec<Vec<String>>,
    base: usize,
    conc: usize,
    window_of: Option<&Params>,
) -> Result<(Subs<S::Pos>, Option<Window>)> {
    let opened: Vec<S::Subscriber> = stream::iter(groups.into_iter().enumerate())
        .map(|(i, chans)| {
            let sys = sys.clone();
            async move {
                let from = chans.into_iter().map(|c| (c, S::Pos::default())).collect();
                sys.subscribe(base + i, from).await
            }
        })
        .buffered(conc.max(1))
        .try_collect()
        .await?;
    // The measured window starts a warm-up after every subscriber is open.
    let w = window_of.map(Window::new);
    let failed = Arc::new(AtomicBool::new(false));
    let mut subs = Subs {
        tasks: Vec::new(),
        stats: Vec::new(),
        received: Vec::new(),
        last: Vec::new(),
        failed: failed.clone(),
    };
    for mut s in opened {
        let st = Stats::new();
        let rc = Arc::new(AtomicU64::new(0));
        let last = Arc::new(Mutex::new(S::Pos::default()));
        let failed = failed.clone();
        subs.stats.push(st.clone());
        subs.received.push(rc.clone());
        subs.last.push(last.clone());
        subs.tasks.push(tokio::spawn(async move {
            loop {
                match s.next().await {
                    Ok(d) if d.channel.is_empty() => {
                        failed.store(true, Ordering::Relaxed);
                        eprintln!("subscriber: a delivery without a channel");
                        break;
                    }
                    Ok(d) => {
                        let now = now_ns();
                        rc.fetch_add(1, Ordering::Relaxed);
                        *last.lock().unwrap() = d.pos.clone();
                        if let (Some(t), Some(w)) = (parse_stamp(&d.payload), w) {
                            if w.contains(t) {
                                st.add(now.saturating_sub(t));
                            }
                        }
                    }
                    Err(e) => {
                        if !failed.swap(true, Ordering::Relaxed) {
                            eprintln!("subscriber error: {e:#}");
                        }
                        break;
                    }
                }
            }
        }));
    }
    Ok((subs, w))
}

fn publish_json(r: &PubResult, w: &Window) -> Value {
    let (h, n) = Stats::merge(std::slice::from_ref(&r.acked));
    let (lag, _) = Stats::merge(std::slice::from_ref(&r.pacer_lag));
    json!({
        "sent": r.sent.load(Ordering::Relaxed),
        "acked": r.acked_total.load(Ordering::Relaxed),
        "errors": r.errors.load(Ordering::Relaxed),
        "acked_in_window": n,
        "throughput_msgs_s": n as f64 / w.secs(),
        "ack_latency": summary(&h),
        "pacer_lag": summary(&lag),
    })
}

// --- (a) fan-in -------------------------------------------------------------------------

pub async fn fanin<S: System>(sys: Arc<S>, p: &Params) -> Result<Value> {
    let channel = format!("{}.fanin", p.run_id);
    sys.prepare(std::slice::from_ref(&channel)).await?;
    let pubs = open_publishers(&sys, p.publishers, 0, p.connect_concurrency).await?;
    let w = Window::new(p);
    let meter = Meter::start(&p.server_pids);
    let r = run_publishers::<S>(&pubs, Chooser::One(channel.into()), p, w).await?;
    let acked = r.acked_total.load(Ordering::Relaxed);
    let mut v = publish_json(&r, &w);
    v["cpu"] = meter.finish(acked, None);
    v["complete"] = json!(r.errors.load(Ordering::Relaxed) == 0);
    Ok(v)
}

// --- (b) fan-out ------------------------------------------------------------------------

pub async fn fanout<S: System>(sys: Arc<S>, p: &Params) -> Result<Value> {
    let channel = format!("{}.fanout", p.run_id);
    sys.prepare(std::slice::from_ref(&channel)).await?;
    let groups = vec![vec![channel.clone()]; p.subscribers];
    let t_open = std::time::Instant::now();
    let pubs = open_publishers(&sys, p.publishers.max(1), 0, p.connect_concurrency).await?;
    let (subs, w) =
        start_subscribers(&sys, groups, 100_000, p.connect_concurrency, Some(p)).await?;
    let w = w.expect("a window was asked for");
    let open_s = t_open.elapsed().as_secs_f64();
    let meter = Meter::start(&p.server_pids);
    let r = run_publishers::<S>(&pubs, Chooser::One(channel.into()), p, w).await?;
    let acked = r.acked_total.load(Ordering::Relaxed);
    let want = acked * p.subscribers as u64;
    let complete = subs.wait_total(want, p.drain_s.max(30.0)).await;
    let (h, n) = Stats::merge(&subs.stats);
    let mut v = publish_json(&r, &w);
    v["subscribers"] = json!(p.subscribers);
    v["subscribe_open_s"] = json!(open_s);
    v["deliveries"] = json!(subs.total());
    v["deliveries_expected"] = json!(want);
    v["deliveries_in_window"] = json!(n);
    v["deliveries_s"] = json!(n as f64 / w.secs());
    v["deliver_latency"] = summary(&h);
    v["cpu"] = meter.finish(acked, Some(subs.total()));
    v["complete"] = json!(complete && r.errors.load(Ordering::Relaxed) == 0);
    Ok(v)
}

// --- (c) many channels ------------------------------------------------------------------

pub async fn channels<S: System>(sys: Arc<S>, p: &Params) -> Result<Value> {
    let names: Vec<String> = (0..p.channels)
        .map(|i| format!("{}.ch{i}", p.run_id))
        .collect();
    sys.prepare(&names).await?;
    let conns = p.connections.max(1);
    let mut groups = vec![Vec::new(); conns];
    for (i, n) in names.iter().enumerate() {
        groups[i % conns].push(n.clone());
    }
    let t_open = std::time::Instant::now();
    let pubs = open_publishers(&sys, p.publishers.max(1), 0, p.connect_concurrency).await?;
    let (subs, w) =
        start_subscribers(&sys, groups, 100_000, p.connect_concurrency, Some(p)).await?;
    let w = w.expect("a window was asked for");
    let open_s = t_open.elapsed().as_secs_f64();
    let meter = Meter::start(&p.server_pids);
    let r = run_publishers::<S>(&pubs, Chooser::zipf(names, p.zipf_s), p, w).await?;
    let acked = r.acked_total.load(Ordering::Relaxed);
    let complete = subs.wait_total(acked, p.drain_s.max(30.0)).await;
    let (h, n) = Stats::merge(&subs.stats);
    let mut v = publish_json(&r, &w);
    v["channels"] = json!(p.channels);
    v["subscriber_connections"] = json!(conns);
    v["zipf_s"] = json!(p.zipf_s);
    v["subscribe_open_s"] = json!(open_s);
    v["deliveries"] = json!(subs.total());
    v["deliveries_in_window"] = json!(n);
    v["deliveries_s"] = json!(n as f64 / w.secs());
    v["deliver_latency"] = summary(&h);
    v["cpu"] = meter.finish(acked, Some(subs.total()));
    v["complete"] = json!(complete && r.errors.load(Ordering::Relaxed) == 0);
    Ok(v)
}

// --- filling a channel ------------------------------------------------------------------

/// Append `n` entries to each channel, flat out with `publishers` x 32 in flight.
async fn fill<S: System>(
    sys: &Arc<S>,
    channels: &[String],
    n: u64,
    p: &Params,
    base: usize,
) -> Result<f64> {
    let pubs = open_publishers(sys, p.publishers.clamp(1, 8), base, p.connect_concurrency).await?;
    let t0 = std::time::Instant::now();
    let mut jobs = Vec::new();
    for c in channels {
        for i in 0..n {
            jobs.push((c.clone(), i));
        }
    }
    let total = jobs.len();
    let size = p.size;
    let inflight = pubs.len() * 32;
    stream::iter(jobs.into_iter().enumerate())
        .map(|(k, (c, _))| {
            let pb = pubs[k % pubs.len()].clone();
            async move { pb.publish(&c, stamp(now_ns(), size)).await }
        })
        .buffer_unordered(inflight)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

// --- (d) replay -------------------------------------------------------------------------

pub async fn replay<S: System>(sys: Arc<S>, p: &Params) -> Result<Value> {
    let channel = format!("{}.replay", p.run_id);
    sys.prepare(std::slice::from_ref(&channel)).await?;
    eprintln!("filling {channel} with {} entries", p.entries);
    let fill_rate = fill(&sys, std::slice::from_ref(&channel), p.entries, p, 0).await?;
    let mut runs = Vec::new();
    let meter = Meter::start(&p.server_pids);
    let rounds = 3;
    for i in 0..rounds {
        let t0 = std::time::Instant::now();
        let got = sys
            .replay(1000 + i, &channel, S::Pos::default(), p.entries)
            .await?;
        let secs = t0.elapsed().as_secs_f64();
        if got != p.entries {
            bail!("replay read {got} entries, expected {}", p.entries);
        }
        runs.push(json!({"seconds": secs, "entries_s": got as f64 / secs}));
    }
    let mut rates: Vec<f64> = runs
        .iter()
        .map(|r| r["entries_s"].as_f64().unwrap())
        .collect();
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(json!({
        "entries": p.entries,
        "fill_rate_msgs_s": fill_rate,
        "rounds": runs,
        "entries_s_median": rates[rates.len() / 2],
        "entries_s_best": rates[rates.len() - 1],
        "seconds_median": p.entries as f64 / rates[rates.len() / 2],
        "cpu": meter.finish(p.entries * rounds as u64, None),
        "complete": true,
    }))
}

// --- (e) reconnect storm ----------------------------------------------------------------

pub async fn reconnect<S: System>(sys: Arc<S>, p: &Params) -> Result<Value> {
    let k = p.channels.clamp(1, p.clients.max(1));
    let names: Vec<String> = (0..k).map(|i| format!("{}.rc{i}", p.run_id)).collect();
    sys.prepare(&names).await?;
    let clients = p.clients;
    // Phase 1: everyone connected and caught up on a first few entries per channel.
    let initial = 5u64;
    let groups: Vec<Vec<String>> = (0..clients).map(|i| vec![names[i % k].clone()]).collect();
    eprintln!("reconnect: opening {clients} subscribers on {k} channels");
    let (subs, _) =
        start_subscribers(&sys, groups.clone(), 100_000, p.connect_concurrency, None).await?;
    fill(&sys, &names, initial, p, 0).await?;
    if !subs.wait_total(initial * clients as u64, 60.0).await {
        bail!("subscribers did not receive the initial entries");
    }
    // Phase 2: all drop, remembering their last position; a backlog is written while
    // they are away; then all reconnect at once and resume after their position.
    let positions: Vec<S::Pos> = subs
        .last
        .iter()
        .map(|l| l.lock().unwrap().clone())
        .collect();
    drop(subs);
    tokio::time::sleep(Duration::from_millis(200)).await;
    eprintln!("reconnect: writing a backlog of {} per channel", p.backlog);
    fill(&sys, &names, p.backlog, p, 10).await?;
    let want = p.backlog;
    let meter = Meter::start(&p.server_pids);
    let t0 = now_ns();
    let done = Arc::new(AtomicU64::new(0));
    let times = Stats::new();
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, (g, pos)) in groups.into_iter().zip(positions).enumerate() {
        let (sys, done, times, failed) = (sys.clone(), done.clone(), times.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let r: Result<()> = async {
                let from = g.into_iter().map(|c| (c, pos.clone())).collect();
                let mut s = sys.subscribe(200_000 + i, from).await?;
                let mut got = 0;
                while got < want {
                    s.next().await?;
                    got += 1;
                }
                Ok(())
            }
            .await;
            match r {
                Ok(()) => {
                    times.add(now_ns() - t0);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("reconnect client error: {e:#}");
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs_f64(p.drain_s.max(60.0)), t).await;
    }
    let all_s = (now_ns() - t0) as f64 / 1e9;
    let (h, n) = Stats::merge(std::slice::from_ref(&times));
    let replayed = n * want;
    Ok(json!({
        "clients": clients,
        "channels": k,
        "backlog_per_channel": p.backlog,
        "caught_up": n,
        "failed": failed.load(Ordering::Relaxed),
        "all_caught_up_s": all_s,
        "catch_up_time": summary(&h),
        "entries_replayed": replayed,
        "entries_replayed_s": replayed as f64 / all_s,
        "cpu": meter.finish(replayed, None),
        "complete": n == clients as u64,
    }))
}

// --- (f) idle connections ---------------------------------------------------------------

pub async fn idle<S: System>(sys: Arc<S>, p: &Params) -> Result<Value> {
    let pid = p.server_pids.first().copied();
    let rss0 = pid.and_then(proc_rss_bytes);
    let t0 = std::time::Instant::now();
    let conns: Vec<S::Idle> = stream::iter(0..p.idle)
        .map(|i| {
            let sys = sys.clone();
            async move { sys.idle(300_000 + i).await }
        })
        .buffer_unordered(p.connect_concurrency.max(1))
        .try_collect()
        .await
        .context("opening idle connections")?;
    let open_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = pid.and_then(proc_rss_bytes);
    let meter = Meter::start(&p.server_pids);
    tokio::time::sleep(Duration::from_secs_f64(p.hold_s)).await;
    let cpu = meter.finish(0, None);
    let rss2 = pid.and_then(proc_rss_bytes);
    let n = conns.len();
    drop(conns);
    let per_conn = match (rss0, rss2) {
        (Some(a), Some(b)) => json!((b as f64 - a as f64) / n as f64),
        _ => Value::Null,
    };
    Ok(json!({
        "connections": n,
        "open_s": open_s,
        "connects_s": n as f64 / open_s,
        "server_rss_before": rss0,
        "server_rss_after_open": rss1,
        "server_rss_after_hold": rss2,
        "server_rss_per_conn_bytes": per_conn,
        "hold_s": p.hold_s,
        "server_cpu_share_idle": cpu.get("server_cpu_share"),
        "cpu": cpu,
        "complete": n == p.idle,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_ranks() {
        let names: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let c = Chooser::zipf(names, 1.0);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut first = 0;
        for _ in 0..10_000 {
            if c.pick(&mut rng) == "0" {
                first += 1;
            }
        }
        // P(rank 1) = 1 / H(100) ~ 0.193
        assert!((1700..2200).contains(&first), "{first}");
    }
}
