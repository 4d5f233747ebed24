//! A plain HTTP/1.1 GET (`Connection: close`) for tests, benchmarks and the lab: the agent's
//! `/healthz`, `/readyz` and `/metrics`, from the calling thread or from inside a namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An HTTP answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` at `addr` from this thread's network namespace, each step bounded by `timeout`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("timeouts on {addr}: {e}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP answer from {addr}: {:?}",
                head.lines().next().unwrap_or_default()
            )
        })?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

/// [`get`] from inside the network namespace at `netns` (a bind mount such as `/run/netns/x`): a
/// thread of ours enters it and does the request; nothing else changes namespace.
pub fn get_in(
    netns: &Path,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Response, String> {
    let (netns, path): (PathBuf, String) = (netns.to_path_buf(), path.to_string());
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).map_err(|e| format!("{}: {e}", netns.display()))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering {}: {e}", netns.display()))?;
        get(addr, &path, timeout)
    })
    .join()
    .map_err(|_| "the HTTP thread panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_get_returns_the_status_and_the_body() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 512];
            let n = c.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /readyz HTTP/1.1\r\n"));
            c.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready")
                .unwrap();
        });
        let r = get(addr, "/readyz", Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        assert_eq!(
            r,
            Response {
                status: 503,
                body: "not ready".into()
            }
        );
    }

    #[test]
    fn nothing_listening_is_an_error_naming_the_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = get(addr, "/", Duration::from_secs(1)).unwrap_err();
        assert!(e.contains(&addr.to_string()), "{e}");
    }
}
