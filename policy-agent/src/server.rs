//! `/healthz` (process alive), `/readyz` (first sync committed), `/metrics`, served by hyper's
//! HTTP/1 connection on tokio: one request per connection (no keep-alive), GET and HEAD only, a
//! request head of at most `MAX_REQUEST` bytes (431 beyond; hyper answers that itself),
//! `READ_TIMEOUT` per connection, and at most [`MAX_CONNECTIONS`] connections at once.
//!
//! When the cap is reached, a new connection is accepted and the oldest connection that has not sent
//! its request yet is closed (if every connection is already being answered, the new one is closed
//! at once). Waiting for a free slot instead (not accepting) would let a client that opens connections
//! and sends nothing hold every slot until the read timeout, again and again: kubelet's liveness probe
//! would queue behind them and fail, and the agent be restarted. Closing the newcomer would fail the
//! probe the same way. Closing the oldest idle one serves any client that sends its request promptly
//! (a probe sends it within a millisecond of connecting) however many idle connections others hold.
//! A connection counts as answering from the moment hyper hands its parsed request to our service.

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Largest request head we read (hyper's smallest read buffer); a longer one is answered 431.
const MAX_REQUEST: usize = 8192;
/// How long a client may take to send its request (and we to answer it).
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Most connections open at once. Probes and a scraper need a handful; 64 leaves room for bursts
/// while bounding memory and file descriptors (17.6k were held open before there was a cap).
pub const MAX_CONNECTIONS: usize = 64;

/// Binds `addr` (so a bad address fails at start) and returns the serving future.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Server {
            addr: addr.to_string(),
            source,
        })
}

/// The open connections: those still waiting for their request (evictable, oldest first) and those
/// being answered. Dropping a connection's sender closes it. Counts go to [`Metrics`]
/// (`palisade_http_open_connections`, `palisade_http_closed_connections_total`).
struct Conns {
    metrics: Arc<Metrics>,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    next_id: u64,
    reading: BTreeMap<u64, oneshot::Sender<()>>,
    answering: BTreeMap<u64, oneshot::Sender<()>>,
}

impl ConnState {
    fn open(&self) -> usize {
        self.reading.len() + self.answering.len()
    }
}

impl Conns {
    fn new(metrics: Arc<Metrics>) -> Self {
        Conns {
            metrics,
            state: Mutex::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ConnState) -> T) -> T {
        // A poisoned lock only means a panic in another connection; the bookkeeping stays usable.
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut g);
        self.metrics.http_open_connections(g.open());
        r
    }

    /// A slot for a new connection, closing the oldest one still reading when all are taken; `None`
    /// when every slot is answering (the new connection is to be closed).
    fn admit(&self) -> Option<(u64, oneshot::Receiver<()>)> {
        self.with(|s| {
            if s.open() >= MAX_CONNECTIONS {
                if s.reading.pop_first().is_some() {
                    self.metrics.http_connection_closed("evicted");
                } else {
                    self.metrics.http_connection_closed("refused");
                    return None;
                }
            }
            let id = s.next_id;
            s.next_id += 1;
            let (tx, rx) = oneshot::channel();
            s.reading.insert(id, tx);
            Some((id, rx))
        })
    }

    /// The connection sent its request: it is no longer evictable.
    fn answering(&self, id: u64) {
        self.with(|s| {
            if let Some(tx) = s.reading.remove(&id) {
                s.answering.insert(id, tx);
            }
        });
    }

    fn close(&self, id: u64) {
        self.with(|s| {
            s.reading.remove(&id);
            s.answering.remove(&id);
        });
    }
}

/// Removes its connection from [`Conns`] however the connection's task ends.
struct Slot {
    conns: Arc<Conns>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.close(self.id);
    }
}

/// Serves until the task is dropped. `policies` adds the per-policy counters to `/metrics`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    policies: Option<Arc<crate::policy_metrics::PolicyMetrics>>,
) {
    let conns = Arc::new(Conns::new(metrics.clone()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(false)
        .max_buf_size(MAX_REQUEST)
        .max_header_size(MAX_REQUEST);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some((id, evicted)) = conns.admit() else {
                    tracing::debug!(%peer, "http: {MAX_CONNECTIONS} connections are being answered; closing a new one");
                    drop(stream);
                    continue;
                };
                let slot = Slot {
                    conns: conns.clone(),
                    id,
                };
                let (m, c, p) = (metrics.clone(), conns.clone(), policies.clone());
                let service = service_fn(move |req| {
                    c.answering(id);
                    let mut resp = answer(&req, &m);
                    let more = p.clone().filter(|_| {
                        req.uri().path() == "/metrics" && resp.status() == StatusCode::OK
                    });
                    async move {
                        if let Some(p) = more {
                            let text = p.render().await;
                            resp.body_mut().push_str(&text);
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let conn = http.serve_connection(TokioIo::new(stream), service);
                tokio::spawn(async move {
                    tokio::select! {
                        _ = evicted => {}
                        r = tokio::time::timeout(READ_TIMEOUT, conn) => {
                            if let Ok(Err(e)) = r {
                                tracing::debug!(%peer, error = %e, "http connection failed");
                            }
                        }
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed (out of file descriptors?); retrying in 100 ms");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The response for a request path: status, content type, body.
pub fn respond(path: &str, metrics: &Metrics) -> (StatusCode, &'static str, String) {
    match path {
        "/healthz" => (StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" if metrics.is_ready() => (StatusCode::OK, TEXT, "ready\n".into()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: first sync not committed yet\n".into(),
        ),
        "/metrics" => (
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            metrics.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

/// One request's response (hyper leaves out the body of a HEAD response).
fn answer<B>(req: &Request<B>, metrics: &Metrics) -> Response<String> {
    let (status, ctype, body) = if req.method() == Method::GET || req.method() == Method::HEAD {
        respond(req.uri().path(), metrics)
    } else {
        (StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn readyz_is_503_until_the_first_commit() {
        let m = Metrics::default();
        assert!(respond("/readyz", &m).0 == 503);
        assert!(respond("/healthz", &m).0 == 200);
        m.commit_ok(
            std::time::Duration::from_millis(1),
            true,
            Default::default(),
        );
        m.set_ready();
        assert!(respond("/readyz", &m).0 == 200);
        assert!(respond("/metrics", &m).2.contains("palisade_ready 1"));
        assert!(respond("/nope", &m).0 == 404);
    }

    #[tokio::test]
    async fn serves_metrics_over_tcp() {
        let l = bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        let srv = tokio::spawn(serve(l, m, None));
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

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Whether the server closed `s` (EOF or reset) within `wait`.
    async fn closed(s: &mut TcpStream, wait: std::time::Duration) -> bool {
        let mut b = [0u8; 16];
        match tokio::time::timeout(wait, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn healthz_answers_while_many_idle_connections_are_held_and_open_ones_stay_capped() {
        let l = bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(serve(l, Arc::new(Metrics::default()), None));
        // 300 connections that never send a request (17.6k were held before the cap).
        let mut held = Vec::new();
        for _ in 0..300 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        for _ in 0..3 {
            let out = get(addr, "/healthz").await;
            assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        }
        let metrics = get(addr, "/metrics").await;
        let open: usize = metrics
            .lines()
            .find_map(|l| l.strip_prefix("palisade_http_open_connections "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no open-connections gauge in {metrics}"));
        assert!(open <= MAX_CONNECTIONS, "{open} open");
        let mut still_open = 0;
        for s in &mut held {
            if !closed(s, std::time::Duration::from_millis(20)).await {
                still_open += 1;
            }
        }
        srv.abort();
        assert!(
            still_open < MAX_CONNECTIONS,
            "{still_open} of the idle connections are still open"
        );
        assert!(
            metrics.contains("palisade_http_closed_connections_total{reason=\"evicted\"}"),
            "{metrics}"
        );
    }

    /// Sends `request` as is and reads the whole answer (the server closes after one response).
    async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn http_1_0_head_and_other_methods() {
        let l = bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(serve(l, Arc::new(Metrics::default()), None));
        // The benchmarks scrape with HTTP/1.0 and read to EOF.
        let old = raw(addr, "GET /metrics?x=1 HTTP/1.0\r\nHost: x\r\n\r\n").await;
        assert!(old.starts_with("HTTP/1.0 200 OK"), "{old}");
        assert!(old.contains("palisade_ready 0"), "{old}");
        let head = raw(addr, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "a body after HEAD: {head}");
        let post = raw(
            addr,
            "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let none = raw(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(none.starts_with("HTTP/1.1 404"), "{none}");
        srv.abort();
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused_with_431() {
        let l = bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(serve(l, Arc::new(Metrics::default()), None));
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST)
        );
        let _ = s.write_all(head.as_bytes()).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        srv.abort();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    }
}
