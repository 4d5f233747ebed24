//! Traffic generators, run inside the pod namespaces: a connect/close loop (TCP_CRR-like), a
//! request/response ping-pong on one connection (TCP_RR-like), a bulk stream in acknowledged
//! chunks, their server, and a SYN probe. Every loop is bounded by a duration and a count.

use crate::{io_err, Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Upper bound of connections or transactions in one run.
pub const MAX_COUNT: u64 = 50_000_000;

/// Pins the calling thread to `cpu` (best effort: a failure is logged, not fatal).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it, and
    // sched_setaffinity reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, "could not pin to the CPU; the run continues unpinned");
        }
    }
}

/// Sets SO_RCVTIMEO on a listener so that `accept` returns periodically.
fn set_accept_timeout(listener: &TcpListener, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd owned by `listener`, and a pointer to a timeval of the advertised size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::Io {
            context: "setting the accept timeout".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Closes with RST instead of FIN (no TIME_WAIT), for probes.
fn set_linger_zero(stream: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd owned by `stream`, pointer to a linger of the advertised size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Bytes of one turn of [`stream_alternate`]: the server answers each with one byte.
pub const STREAM_CHUNK: usize = 4 << 20;

/// Serves until `duration` has passed: on `crr_port` each connection gets one byte back for its
/// one-byte request and is then closed by the server; on `rr_port` every byte is echoed; on
/// `stream_port` (when given) every [`STREAM_CHUNK`] bytes read are acknowledged with one byte.
/// Prints `ready` on stdout once every listener is bound.
pub fn serve(
    ip: &str,
    crr_port: u16,
    rr_port: u16,
    stream_port: Option<u16>,
    duration: Duration,
) -> Result<()> {
    let deadline = Instant::now() + duration;
    let crr = listen(ip, crr_port)?;
    let rr = listen(ip, rr_port)?;
    let stream = match stream_port {
        Some(port) => {
            let l = listen(ip, port)?;
            Some(std::thread::spawn(move || {
                while Instant::now() < deadline {
                    if let Ok((s, _)) = l.accept() {
                        std::thread::spawn(move || sink(s, deadline));
                    }
                }
            }))
        }
        None => None,
    };
    println!("ready");
    let _ = std::io::stdout().flush();
    let rr_thread = std::thread::spawn(move || {
        while Instant::now() < deadline {
            let Ok((s, _)) = rr.accept() else {
                continue;
            };
            answer_reads(s, deadline, 64, |s, bytes| s.write_all(bytes).is_ok());
        }
    });
    let mut buf = [0u8; 1];
    while Instant::now() < deadline {
        let Ok((mut s, _)) = crr.accept() else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if matches!(s.read(&mut buf), Ok(1)) {
            let _ = s.write_all(&buf);
        }
        drop(s);
    }
    let _ = rr_thread.join();
    if let Some(t) = stream {
        let _ = t.join();
    }
    Ok(())
}

/// A listener on `ip:port` whose accept gives up every 200 ms (so a serving loop sees its deadline).
fn listen(ip: &str, port: u16) -> Result<TcpListener> {
    let l = TcpListener::bind((ip, port)).map_err(io_err(format!("binding {ip}:{port}")))?;
    set_accept_timeout(&l, Duration::from_millis(200))?;
    Ok(l)
}

/// The server's side of one long-lived connection: reads (up to `buf_len` bytes at a time) until
/// the client closes, an error, or `deadline`, handing each read to `answer`, which replies on the
/// stream and says whether to go on. A read times out every 500 ms to look at the deadline.
fn answer_reads(
    mut s: TcpStream,
    deadline: Instant,
    buf_len: usize,
    mut answer: impl FnMut(&mut TcpStream, &[u8]) -> bool,
) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = vec![0u8; buf_len];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !answer(&mut s, &buf[..n]) {
                    break;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
}

/// The stream server's side of one connection: acknowledges every [`STREAM_CHUNK`] bytes read
/// with one byte, until the client closes or `deadline`.
fn sink(s: TcpStream, deadline: Instant) {
    let mut got = 0usize;
    answer_reads(s, deadline, 256 << 10, |s, bytes| {
        got += bytes.len();
        while got >= STREAM_CHUNK {
            got -= STREAM_CHUNK;
            if s.write_all(b"k").is_err() {
                return false;
            }
        }
        true
    });
}

/// Result of a connect/close loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrrResult {
    pub connections: u64,
    pub failures: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One connection: connect, a 1-byte request, its 1-byte response, close.
fn one_connection(target: SocketAddr, buf: &mut [u8; 8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"x")?;
    s.read_exact(&mut buf[..1])?;
    // The server closes first; wait for its FIN so the TIME_WAIT is on its side.
    let _ = s.read(buf);
    let _ = s.shutdown(Shutdown::Both);
    Ok(())
}

/// Connections of one side counted: successes, failures, the time they took, their latencies.
struct Tally {
    ok: u64,
    failures: u64,
    busy: Duration,
    samples: Vec<f64>,
}

impl Tally {
    /// Room for 64k latencies up front, so a slice rarely grows the vector while it is timed.
    fn new() -> Tally {
        Tally {
            ok: 0,
            failures: 0,
            busy: Duration::ZERO,
            samples: Vec::with_capacity(1 << 16),
        }
    }

    fn add(&mut self, took: Duration, outcome: std::io::Result<()>) {
        self.busy += took;
        match outcome {
            Ok(()) => {
                self.ok += 1;
                if self.samples.len() < 1_000_000 {
                    self.samples.push(took.as_secs_f64() * 1e6);
                }
            }
            Err(_) => self.failures += 1,
        }
    }

    /// The result over `seconds` (the slice's wall time, or this side's share of it).
    fn result(&self, seconds: f64) -> CrrResult {
        CrrResult {
            connections: self.ok,
            failures: self.failures,
            seconds,
            per_second: self.ok as f64 / seconds,
            p50_us: super::stats::median(&self.samples).unwrap_or(f64::NAN),
            p99_us: super::stats::quantile(&self.samples, 0.99).unwrap_or(f64::NAN),
        }
    }
}

/// Opens, uses (1-byte request, 1-byte response) and closes connections one after another.
pub fn crr(target: SocketAddr, duration: Duration) -> Result<CrrResult> {
    let start = Instant::now();
    let mut tally = Tally::new();
    let mut buf = [0u8; 8];
    while start.elapsed() < duration && tally.ok + tally.failures < MAX_COUNT {
        let t0 = Instant::now();
        let outcome = one_connection(target, &mut buf);
        tally.add(t0.elapsed(), outcome);
    }
    Ok(tally.result(start.elapsed().as_secs_f64()))
}

/// Opens the network namespace `ns` (an `ip netns` name) for [`set_netns`].
pub fn open_netns(ns: &str) -> Result<std::fs::File> {
    let path = format!("/run/netns/{ns}");
    std::fs::File::open(&path).map_err(io_err(format!("opening {path}")))
}

/// Moves the calling thread (only it) into the network namespace open as `ns`.
pub fn set_netns(ns: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: setns on an open namespace fd; it changes only this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Like [`crr`], but in turns from each of `sides` (a client pod's network namespace and the
/// server it connects to): `turn` connections from the first, `turn` from the second, and so on.
/// Two labs measured this way meet the same machine within a few connections of each other, so
/// their ratio resolves costs far below the machine's drift between two slices. A turn of one
/// connection measures each with the caches the other lab's left (what a node busy with many
/// flows sees); longer turns, with its own warm. Each side's rate is its connections over the
/// time they took (`seconds`: that side's share of the slice).
pub fn crr_alternate(
    sides: &[(std::fs::File, SocketAddr)],
    turn: usize,
    duration: Duration,
) -> Result<Vec<CrrResult>> {
    let mut tallies: Vec<Tally> = sides.iter().map(|_| Tally::new()).collect();
    let start = Instant::now();
    let mut buf = [0u8; 8];
    let mut n = 0u64;
    while start.elapsed() < duration && n < MAX_COUNT {
        for ((ns, target), tally) in sides.iter().zip(tallies.iter_mut()) {
            set_netns(ns).map_err(io_err("entering a client pod's network namespace"))?;
            for _ in 0..turn.max(1) {
                let t0 = Instant::now();
                let outcome = one_connection(*target, &mut buf);
                tally.add(t0.elapsed(), outcome);
                n += 1;
            }
        }
    }
    Ok(tallies
        .iter()
        .map(|t| t.result(t.busy.as_secs_f64()))
        .collect())
}

/// One side's bulk throughput from [`stream_alternate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamResult {
    /// Chunks sent and acknowledged (after the warm-up).
    pub turns: u64,
    pub bytes: u64,
    /// The time this side's turns took (its share of the slice).
    pub seconds: f64,
    pub gbps: f64,
    /// Median time of one turn (a chunk sent until its acknowledgement).
    pub p50_ms: f64,
}

/// Bulk throughput in turns over one TCP connection per side (a client pod's network namespace
/// and the stream server it connects to): [`STREAM_CHUNK`] bytes to the first side's server and
/// its one-byte acknowledgement, then the same on the second, and so on, for `duration` after
/// `warmup` unmeasured turns each (slow start, buffers). Where iperf3 measures one lab for a
/// second while the machine drifts, both sides here meet the same machine within a few
/// milliseconds of each other. Each side's figure is its bytes over the time its turns took.
/// The connections stay open across turns (a turn is a few ms, under TCP's idle restart).
pub fn stream_alternate(
    sides: &[(std::fs::File, SocketAddr)],
    warmup: usize,
    duration: Duration,
) -> Result<Vec<StreamResult>> {
    // A socket stays in the namespace it was created in: one per side, made from inside it.
    let mut conns = Vec::with_capacity(sides.len());
    for (i, (ns, target)) in sides.iter().enumerate() {
        set_netns(ns).map_err(io_err("entering a client pod's network namespace"))?;
        let s = TcpStream::connect_timeout(target, Duration::from_secs(2)).map_err(io_err(
            format!("side {i}: connecting to the stream server {target}"),
        ))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(io_err("setting the read timeout"))?;
        conns.push(s);
    }
    let chunk = vec![0u8; STREAM_CHUNK];
    let turn = |i: usize, s: &mut TcpStream| -> Result<Duration> {
        let t0 = Instant::now();
        let mut ack = [0u8; 1];
        s.write_all(&chunk)
            .and_then(|()| s.read_exact(&mut ack))
            .map_err(|e| io_err(format!("side {i}: a chunk and its acknowledgement"))(e))?;
        Ok(t0.elapsed())
    };
    for _ in 0..warmup {
        for (i, s) in conns.iter_mut().enumerate() {
            turn(i, s)?;
        }
    }
    let mut took: Vec<Vec<f64>> = conns.iter().map(|_| Vec::with_capacity(4096)).collect();
    let start = Instant::now();
    while start.elapsed() < duration && (took[0].len() as u64) < MAX_COUNT {
        for (i, s) in conns.iter_mut().enumerate() {
            took[i].push(turn(i, s)?.as_secs_f64() * 1e3);
        }
    }
    Ok(took
        .iter()
        .map(|t| {
            let bytes = (t.len() * STREAM_CHUNK) as u64;
            let seconds = t.iter().sum::<f64>() / 1e3;
            StreamResult {
                turns: t.len() as u64,
                bytes,
                seconds,
                gbps: bytes as f64 * 8.0 / seconds / 1e9,
                p50_ms: super::stats::median(t).unwrap_or(f64::NAN),
            }
        })
        .collect())
}

/// Result of a request/response run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RrResult {
    pub transactions: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One connection, one-byte ping-pong, per-transaction latency.
pub fn rr(target: SocketAddr, duration: Duration) -> Result<RrResult> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(io_err(format!("connecting to {target}")))?;
    s.set_nodelay(true).map_err(io_err("setting TCP_NODELAY"))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(io_err("setting read timeout"))?;
    let start = Instant::now();
    let mut samples: Vec<f64> = Vec::with_capacity(1 << 18);
    let mut n = 0u64;
    let mut buf = [0u8; 1];
    while start.elapsed() < duration && n < MAX_COUNT {
        let t0 = Instant::now();
        s.write_all(b"x").map_err(io_err("request"))?;
        s.read_exact(&mut buf).map_err(io_err("response"))?;
        if samples.len() < 5_000_000 {
            samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        n += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(RrResult {
        transactions: n,
        seconds,
        per_second: n as f64 / seconds,
        p50_us: super::stats::median(&samples).unwrap_or(f64::NAN),
        p99_us: super::stats::quantile(&samples, 0.99).unwrap_or(f64::NAN),
    })
}

/// Outcome of one SYN probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The handshake completed.
    Open,
    /// The SYN reached the target, which answered with RST (nothing listens): the path is open.
    Refused,
    /// No answer within the timeout (dropped), or another error.
    Blocked,
}

impl ProbeOutcome {
    pub fn name(self) -> &'static str {
        match self {
            ProbeOutcome::Open => "open",
            ProbeOutcome::Refused => "refused",
            ProbeOutcome::Blocked => "blocked",
        }
    }

    /// Whether the SYN got through the network (open or refused).
    pub fn reached(self) -> bool {
        self != ProbeOutcome::Blocked
    }
}

/// One SYN probe to `target` with a timeout. A completed handshake is closed with RST.
pub fn probe_once(target: SocketAddr, timeout: Duration) -> ProbeOutcome {
    match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => {
            set_linger_zero(&s);
            ProbeOutcome::Open
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => ProbeOutcome::Refused,
        Err(_) => ProbeOutcome::Blocked,
    }
}
