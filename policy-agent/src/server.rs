//! A tiny HTTP/1.1 server: `/healthz` (process alive), `/readyz` (first sync committed), `/metrics`.
//! Hand-rolled on tokio: one request per connection, GET only, bounded request size.

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head we read.
const MAX_REQUEST: usize = 8192;
/// How long a client may take to send its request.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds `addr` (so a bad address fails at start) and returns the serving future.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Server {
            addr: addr.to_string(),
            source,
        })
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let m = metrics.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(READ_TIMEOUT, handle(stream, m)).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// The response for a request path: status line, content type, body.
pub fn respond(path: &str, metrics: &Metrics) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" if metrics.is_ready() => ("200 OK", TEXT, "ready\n".into()),
        "/readyz" => (
            "503 Service Unavailable",
            TEXT,
            "not ready: first sync not committed yet\n".into(),
        ),
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            "404 Not Found",
            TEXT,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

async fn handle(mut stream: TcpStream, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    let (status, ctype, body) = if method == "GET" || method == "HEAD" {
        respond(path, &metrics)
    } else {
        ("405 Method Not Allowed", "text/plain", "GET only\n".into())
    };
    let mut resp = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    if method != "HEAD" {
        resp.push_str(&body);
    }
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_is_503_until_the_first_commit() {
        let m = Metrics::default();
        assert!(respond("/readyz", &m).0.starts_with("503"));
        assert!(respond("/healthz", &m).0.starts_with("200"));
        m.commit_ok(
            std::time::Duration::from_millis(1),
            true,
            Default::default(),
        );
        assert!(respond("/readyz", &m).0.starts_with("200"));
        assert!(respond("/metrics", &m).2.contains("palisade_ready 1"));
        assert!(respond("/nope", &m).0.starts_with("404"));
    }

    #[tokio::test]
    async fn serves_metrics_over_tcp() {
        let l = bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        let srv = tokio::spawn(serve(l, m));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        srv.abort();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(
            out.contains("palisade_reconcile_duration_seconds_count 0"),
            "{out}"
        );
    }
}
