//! What runs inside the pod namespaces: the SYN probe (one attempt per interval, a line per flip),
//! the long-lived stream whose revocation is measured and its echo server, and the reader of the
//! probe's flips.

use super::*;

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The probe: one SYN every `interval`; prints `<mono_ns> open|blocked` at start and at every flip.
/// The timestamp of a flip is the send time of the first attempt with the new outcome.
pub fn probe_loop(
    target: std::net::SocketAddr,
    interval: Duration,
    timeout: Duration,
    duration: Duration,
) {
    use std::io::Write;
    let start = Instant::now();
    let mut last: Option<bool> = None;
    let mut next = Instant::now();
    let stdout = std::io::stdout();
    while start.elapsed() < duration {
        let sent = mono_ns();
        let open = crate::datapath::traffic::probe_once(target, timeout)
            == crate::datapath::traffic::ProbeOutcome::Open;
        if last != Some(open) {
            let mut out = stdout.lock();
            let _ = writeln!(out, "{sent} {}", if open { "open" } else { "blocked" });
            let _ = out.flush();
            last = Some(open);
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// Denied SYNs as fast as one thread sends them: a non-blocking connect per SYN (a new source port
/// each), the socket closed at once (a SYN_SENT socket sends nothing when closed). Prints how many
/// it sent when `duration` is over.
pub fn syn_flood(target: std::net::SocketAddr, duration: Duration) {
    let start = Instant::now();
    let mut sent: u64 = 0;
    let (family, addr) = match target {
        std::net::SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            (libc::AF_INET, sin)
        }
        std::net::SocketAddr::V6(_) => {
            eprintln!("syn-flood: IPv4 targets only");
            return;
        }
    };
    while start.elapsed() < duration {
        // SAFETY: plain socket calls on a descriptor we own and close; `addr` lives across them.
        unsafe {
            let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            if fd < 0 {
                continue;
            }
            let r = libc::connect(
                fd,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            if r == 0 || *libc::__errno_location() == libc::EINPROGRESS {
                sent += 1;
            }
            libc::close(fd);
        }
    }
    println!("{sent}");
}

/// The measured established flow, client side: connects (a 1 ms attempt every `interval` while
/// blocked), then sends one byte every `interval` on that one connection and waits for its echo.
/// Prints `<mono_ns> open` when connected, `<mono_ns> blocked` with the send time of the first
/// message whose echo did not come within `reply_timeout` (then drops the connection and reconnects).
pub fn stream_loop(
    target: std::net::SocketAddr,
    interval: Duration,
    reply_timeout: Duration,
    duration: Duration,
) {
    use std::io::{Read, Write};
    let start = Instant::now();
    let stdout = std::io::stdout();
    let say = |ns: u64, open: bool| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "{ns} {}", if open { "open" } else { "blocked" });
        let _ = out.flush();
    };
    let mut said_blocked = false;
    let mut next = Instant::now();
    let pace = |next: &mut Instant| {
        *next += interval;
        let now = Instant::now();
        if *next > now {
            std::thread::sleep(*next - now);
        } else {
            *next = now;
        }
    };
    while start.elapsed() < duration {
        let sent = mono_ns();
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&target, interval) else {
            if !said_blocked {
                say(sent, false);
                said_blocked = true;
            }
            pace(&mut next);
            continue;
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(reply_timeout));
        say(sent, true);
        said_blocked = false;
        let mut buf = [0u8; 1];
        while start.elapsed() < duration {
            let sent = mono_ns();
            let ok = s.write_all(b"m").is_ok() && matches!(s.read(&mut buf), Ok(1));
            if !ok {
                say(sent, false);
                said_blocked = true;
                break;
            }
            pace(&mut next);
        }
    }
}

/// The measured flow's server: echoes every byte, a thread per connection; a connection silent for
/// 5 s is dropped (a cut flow never closes cleanly).
pub fn stream_serve(ip: &str, port: u16, duration: Duration) -> Result<()> {
    use std::io::{Read, Write};
    let listener =
        std::net::TcpListener::bind((ip, port)).map_err(io_err(format!("binding {ip}:{port}")))?;
    println!("ready");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // `accept` blocks: the process ends at the deadline whatever its connections do.
    std::thread::spawn(move || {
        std::thread::sleep(duration);
        std::process::exit(0);
    });
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Flip events from the probe process.
pub(super) struct Probe {
    _guard: ChildGuard,
    rx: mpsc::Receiver<(u64, bool)>,
    state: Option<bool>,
}

impl Probe {
    pub(super) fn start(lab: &Lab, exe: &str) -> Result<Probe> {
        let target = format!("{SERVER_IP}:{PROBE_PORT}");
        Self::spawn(
            lab,
            exe,
            &["probe-loop", "--target", &target, "--secs", "7200"],
        )
    }

    /// The established flow (`stream-loop`): `open` while its connection echoes.
    pub(super) fn stream(lab: &Lab, exe: &str) -> Result<Probe> {
        let target = format!("{SERVER_IP}:{STREAM_PORT}");
        Self::spawn(
            lab,
            exe,
            &["stream-loop", "--target", &target, "--secs", "7200"],
        )
    }

    pub(super) fn spawn(lab: &Lab, exe: &str, args: &[&str]) -> Result<Probe> {
        let mut guard = ChildGuard::spawn_in(&lab.client, exe, args)?;
        let stdout = guard
            .child_mut()
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| Error::Invalid("probe stdout not captured".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                let mut it = line.split_whitespace();
                if let (Some(ns), Some(state)) =
                    (it.next().and_then(|v| v.parse::<u64>().ok()), it.next())
                {
                    if tx.send((ns, state == "open")).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Probe {
            _guard: guard,
            rx,
            state: None,
        })
    }

    /// Waits until the probe reports `open` (true) or `blocked`; returns the flip time.
    pub(super) fn wait_for(&mut self, open: bool, limit: Duration) -> Option<u64> {
        let deadline = Instant::now() + limit;
        loop {
            if self.state == Some(open) {
                return Some(0);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok((ns, state)) => {
                    self.state = Some(state);
                    if state == open {
                        return Some(ns);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Applies a change and waits for the flip to `open`; returns the latency in ms.
    pub(super) fn measure(
        &mut self,
        open: bool,
        change: impl FnOnce() -> Result<u64>,
    ) -> Result<Option<f64>> {
        // Drain anything pending so `state` is current.
        while let Ok((_, s)) = self.rx.try_recv() {
            self.state = Some(s);
        }
        if self.state == Some(open) {
            return Err(Error::Invalid(format!(
                "probe already {} before the change",
                if open { "open" } else { "blocked" }
            )));
        }
        let t0 = change()?;
        Ok(self
            .wait_for(open, FLIP_TIMEOUT)
            .map(|t| (t.saturating_sub(t0)) as f64 / 1e6))
    }
}
