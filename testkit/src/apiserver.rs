//! A small in-test Kubernetes API server speaking the real list/watch protocol over HTTP/1.1 on
//! 127.0.0.1, enough for kube-rs' watcher used unchanged:
//!
//! - list: `GET /api/v1/pods?limit=500[&continue=T]` → `{"kind":"PodList","metadata":{"resourceVersion":
//!   "N","continue":"T"},"items":[..]}` (pages honour `limit` / `continue`; a token names the last
//!   key served);
//! - watch: `GET /api/v1/pods?watch=true&timeoutSeconds=S&allowWatchBookmarks=true&resourceVersion=N` →
//!   chunked newline-delimited JSON events (ADDED/MODIFIED/DELETED) replayed from the history after `N`,
//!   then live; the stream ends cleanly after `S` seconds (with a BOOKMARK first when allowed); a
//!   `resourceVersion` older than the compaction point gets an `ERROR` event with a 410 Status.
//!
//! Test controls: [`ApiServer::disconnect`] cuts every watch connection and answers 503 to every request
//! until [`ApiServer::reconnect`]; [`ApiServer::compact`] drops the history (resumes then get 410);
//! [`ApiServer::refuse`] answers 503 for one resource; [`ApiServer::installed`] takes a resource (a
//! CRD's) out of the API, which then answers 404 for it, and back. Every request line is recorded.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The resources the agent watches, by URL path.
pub const RESOURCES: [(&str, &str, &str, &str); 5] = [
    ("/api/v1/pods", "pods", "v1", "Pod"),
    ("/api/v1/namespaces", "namespaces", "v1", "Namespace"),
    ("/api/v1/nodes", "nodes", "v1", "Node"),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networkpolicies",
        "networking.k8s.io/v1",
        "NetworkPolicy",
    ),
    (
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        "clusternetworkpolicies",
        "policy.networking.k8s.io/v1alpha2",
        "ClusterNetworkPolicy",
    ),
];

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Request {
    pub resource: String,
    pub watch: bool,
    pub params: BTreeMap<String, String>,
    /// HTTP status answered (200, 404, 503) and, for watches, whether a 410 ERROR event was sent.
    pub status: u16,
    pub gone: bool,
    pub line: String,
}

#[derive(Debug, Clone)]
struct HistoryEvent {
    rv: u64,
    resource: &'static str,
    /// ADDED, MODIFIED or DELETED
    ty: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// resource → (namespace, name) → object
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    history: Vec<HistoryEvent>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    compacted_below: u64,
    down: bool,
    /// Bumped by `disconnect`: watch streams of an older epoch are cut.
    epoch: u64,
    refused: HashSet<String>,
    /// Resources the API does not serve (a CRD not installed): 404.
    missing: HashSet<String>,
    requests: Vec<Request>,
}

/// Handle to a running fake API server. Dropping it stops accepting connections.
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl ApiServer {
    /// Starts a server on an ephemeral port of 127.0.0.1.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            ..State::default()
        }));
        let (changed, _) = watch::channel(0u64);
        let accept = {
            let state = state.clone();
            let changed = changed.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let state = state.clone();
                    let changed = changed.subscribe();
                    tokio::spawn(serve_connection(stream, state, changed));
                }
            })
        };
        ApiServer {
            addr,
            state,
            changed,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server, built the ordinary way.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("server url"));
        kube::Client::try_from(config).expect("kube client")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("server state lock")
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Creates or replaces an object (given without metadata.resourceVersion); returns its new
    /// resourceVersion. `object` must carry apiVersion, kind and metadata.name.
    pub fn apply(&self, mut object: Value) -> u64 {
        let kind = object["kind"].as_str().expect("object kind").to_owned();
        let (_, resource, _, _) = resource_of_kind(&kind);
        let key = key_of(&object);
        let rv = {
            let mut state = self.lock();
            state.rv += 1;
            let rv = state.rv;
            // An update keeps the object's uid, as the API server does; a new object gets one.
            let uid = state
                .objects
                .get(resource)
                .and_then(|objects| objects.get(&key))
                .map(|old| old["metadata"]["uid"].clone())
                .unwrap_or_else(|| json!(format!("uid-{}-{}", key.1, rv)));
            let meta = object["metadata"].as_object_mut().expect("object metadata");
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.entry("uid").or_insert(uid);
            let previous = state
                .objects
                .entry(resource)
                .or_default()
                .insert(key, object.clone());
            let ty = if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            state.history.push(HistoryEvent {
                rv,
                resource,
                ty,
                object,
            });
            rv
        };
        self.bump();
        rv
    }

    /// Deletes an object; returns the resourceVersion of the deletion. Panics if it does not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> u64 {
        let (_, resource, _, kind) = resource_of_kind(kind);
        let rv = {
            let mut state = self.lock();
            let mut object = state
                .objects
                .get_mut(resource)
                .and_then(|objects| objects.remove(&(namespace.to_owned(), name.to_owned())))
                .unwrap_or_else(|| panic!("delete of unknown {kind} {namespace}/{name}"));
            state.rv += 1;
            let rv = state.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            state.history.push(HistoryEvent {
                rv,
                resource,
                ty: "DELETED",
                object,
            });
            rv
        };
        self.bump();
        rv
    }

    /// Drops the watch history: resuming from any resourceVersion before now gets 410 Gone.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted_below = state.rv;
        state.history.clear();
    }

    /// Cuts every open watch connection and answers 503 to every request until [`Self::reconnect`].
    pub fn disconnect(&self) {
        {
            let mut state = self.lock();
            state.down = true;
            state.epoch += 1;
        }
        self.bump();
    }

    /// Ends a [`Self::disconnect`].
    pub fn reconnect(&self) {
        self.lock().down = false;
        self.bump();
    }

    /// Answers 503 to requests for `resource` ("pods", "nodes", ...) while `refused`.
    pub fn refuse(&self, resource: &str, refused: bool) {
        let mut state = self.lock();
        if refused {
            state.refused.insert(resource.to_owned());
        } else {
            state.refused.remove(resource);
        }
    }

    /// Serves `resource` ("clusternetworkpolicies", ...) or not (404, as for a CRD that is not
    /// installed). Every resource is served at start.
    pub fn installed(&self, resource: &str, installed: bool) {
        {
            let mut state = self.lock();
            if installed {
                state.missing.remove(resource);
            } else {
                state.missing.insert(resource.to_owned());
                state.epoch += 1; // every open watch ends (watchers resume; its relist gets 404)
            }
        }
        self.bump();
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Requests for one resource, list or watch.
    pub fn requests_for(&self, resource: &str, watch: bool) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.resource == resource && r.watch == watch)
            .collect()
    }

    /// Waits (bounded) until `pred` holds for the recorded requests.
    pub async fn wait_for_requests(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Request]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.requests()) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let lines: Vec<String> = self
                    .requests()
                    .iter()
                    .map(|r| format!("{} -> {}", r.line, r.status))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for requests: {what}; requests:\n{}",
                    lines.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn resource_of_kind(kind: &str) -> (&'static str, &'static str, &'static str, &'static str) {
    RESOURCES
        .into_iter()
        .find(|r| r.3 == kind)
        .unwrap_or_else(|| panic!("unknown kind {kind}"))
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().expect("metadata.name").to_owned(),
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn serve_connection(
    stream: TcpStream,
    state: Arc<Mutex<State>>,
    changed: watch::Receiver<u64>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        // Request head; GET requests carry no body.
        let mut line = String::new();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header).await {
                Ok(0) | Err(_) => return,
                Ok(_) if header == "\r\n" || header == "\n" => break,
                Ok(_) => {}
            }
        }
        let line = line.trim_end().to_owned();
        let target = line.split(' ').nth(1).unwrap_or_default().to_owned();
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        let params = query_params(query);
        let watch = params.get("watch").map(String::as_str) == Some("true");
        let resource = RESOURCES
            .into_iter()
            .find(|r| r.0 == path)
            .filter(|r| !state.lock().expect("state").missing.contains(r.1));
        let mut request = Request {
            resource: resource
                .map(|r| r.1.to_owned())
                .unwrap_or_else(|| path.to_owned()),
            watch,
            params: params.clone(),
            status: 200,
            gone: false,
            line: line.clone(),
        };
        let Some(resource) = resource else {
            request.status = 404;
            record(&state, request);
            if respond_json(&mut write, 404, &status(404, "NotFound", "no such path"))
                .await
                .is_err()
            {
                return;
            }
            continue;
        };
        let refused = {
            let s = state.lock().expect("state");
            s.down || s.refused.contains(resource.1)
        };
        if refused {
            request.status = 503;
            record(&state, request);
            if respond_json(
                &mut write,
                503,
                &status(503, "ServiceUnavailable", "test server is down"),
            )
            .await
            .is_err()
            {
                return;
            }
            continue;
        }
        if watch {
            let keep = serve_watch(
                &mut write,
                &state,
                changed.clone(),
                resource,
                &params,
                request,
            )
            .await;
            if !keep {
                return;
            }
        } else {
            let body = list(&state, resource, &params);
            record(&state, request);
            if respond_bytes(&mut write, 200, &body).await.is_err() {
                return;
            }
        }
    }
}

/// A request's query as sent (`application/x-www-form-urlencoded`: `%XX` escapes, `+` for a space;
/// kube encodes a continue token so).
fn query_params(query: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn record(state: &Mutex<State>, request: Request) {
    eprintln!(
        "apiserver: {} -> {}{}",
        request.line,
        request.status,
        if request.gone {
            " (410 Gone event)"
        } else {
            ""
        }
    );
    state.lock().expect("state").requests.push(request);
}

/// One page of a list, serialized under the lock. The continue token names the last key served
/// (a real server's token does, opaquely): the next page starts after it however many objects came
/// or went meanwhile, and finding it is a B-tree search, not a walk over the pages before it. Items
/// are written from the stored objects, without a copy.
fn list(
    state: &Mutex<State>,
    resource: (&str, &'static str, &str, &str),
    params: &BTreeMap<String, String>,
) -> Vec<u8> {
    let s = state.lock().expect("state");
    let (_, name, api_version, kind) = resource;
    let empty = BTreeMap::new();
    let objects = s.objects.get(name).unwrap_or(&empty);
    let after: Option<(String, String)> = params
        .get("continue")
        .and_then(|c| c.strip_prefix("after:"))
        .and_then(|k| k.split_once('/'))
        .map(|(ns, n)| (ns.to_owned(), n.to_owned()));
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let mut rest = match after {
        Some(key) => objects.range((Bound::Excluded(key), Bound::Unbounded)),
        None => objects.range::<(String, String), _>(..),
    };
    let page: Vec<(&(String, String), &Value)> = rest.by_ref().take(limit).collect();
    let mut metadata = json!({"resourceVersion": s.rv.to_string()});
    if let (Some(_), Some(((ns, n), _))) = (rest.next(), page.last()) {
        metadata["continue"] = json!(format!("after:{ns}/{n}"));
    }
    serde_json::to_vec(&ListBody {
        api_version,
        kind: format!("{kind}List"),
        metadata,
        items: page.into_iter().map(|(_, v)| ListItem(v)).collect(),
    })
    .expect("json")
}

#[derive(serde::Serialize)]
struct ListBody<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    kind: String,
    metadata: Value,
    items: Vec<ListItem<'a>>,
}

/// A stored object as a list item: items of a list carry no apiVersion/kind on a real server.
struct ListItem<'a>(&'a Value);

impl serde::Serialize for ListItem<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Value::Object(fields) = self.0 else {
            return self.0.serialize(serializer);
        };
        let kept = || {
            fields
                .iter()
                .filter(|(k, _)| k.as_str() != "apiVersion" && k.as_str() != "kind")
        };
        let mut map = serializer.serialize_map(Some(kept().count()))?;
        for (k, v) in kept() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

async fn respond_json(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    code: u16,
    body: &Value,
) -> std::io::Result<()> {
    respond_bytes(write, code, &serde_json::to_vec(body).expect("json")).await
}

async fn respond_bytes(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    code: u16,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body).await?;
    write.flush().await
}

async fn write_chunk(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    event: &Value,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).expect("json");
    line.push(b'\n');
    write
        .write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .await?;
    write.write_all(&line).await?;
    write.write_all(b"\r\n").await?;
    write.flush().await
}

/// Serves one watch; returns whether the connection may be reused (false: cut or broken).
async fn serve_watch(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    state: &Arc<Mutex<State>>,
    mut changed: watch::Receiver<u64>,
    resource: (&str, &'static str, &'static str, &'static str),
    params: &BTreeMap<String, String>,
    mut request: Request,
) -> bool {
    let (_, name, api_version, kind) = resource;
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(290);
    let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let from: Option<u64> = params.get("resourceVersion").and_then(|v| v.parse().ok());
    let (epoch, gone) = {
        let s = state.lock().expect("state");
        (s.epoch, from.is_none_or(|rv| rv < s.compacted_below))
    };
    request.gone = gone;
    record(state, request);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if write.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    if gone {
        let message = format!(
            "too old resource version: {} ({})",
            from.unwrap_or(0),
            state.lock().expect("state").compacted_below
        );
        let event = json!({"type": "ERROR", "object": status(410, "Expired", &message)});
        return write_chunk(write, &event).await.is_ok()
            && write.write_all(b"0\r\n\r\n").await.is_ok();
    }
    let mut cursor = from.unwrap_or(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        changed.borrow_and_update();
        let (events, cut, rv) = {
            let s = state.lock().expect("state");
            // The history is in resourceVersion order: start after the cursor, not at the
            // beginning (a benchmark streams thousands of events a second into a long history).
            let start = s.history.partition_point(|e| e.rv <= cursor);
            let events: Vec<HistoryEvent> = s.history[start..]
                .iter()
                .filter(|e| e.resource == name)
                .cloned()
                .collect();
            (events, s.epoch != epoch, s.rv)
        };
        if cut {
            return false; // drop the connection without a final chunk: a broken stream
        }
        for event in events {
            cursor = event.rv;
            if write_chunk(write, &json!({"type": event.ty, "object": event.object}))
                .await
                .is_err()
            {
                return false;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                if bookmarks {
                    let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                        "metadata": {"resourceVersion": rv.max(cursor).to_string()}}});
                    if write_chunk(write, &bookmark).await.is_err() {
                        return false;
                    }
                }
                return write.write_all(b"0\r\n\r\n").await.is_ok() && write.flush().await.is_ok();
            }
            res = changed.changed() => {
                if res.is_err() {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams};

    fn pod(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "ns", "name": name}})
    }

    /// One page through kube's client, as the agent's watcher lists: names and continue token.
    async fn page(server: &ApiServer, token: Option<String>) -> (Vec<String>, Option<String>) {
        let mut params = ListParams::default().limit(2);
        if let Some(token) = token {
            params = params.continue_token(&token);
        }
        let list = Api::<Pod>::all(server.client())
            .list(&params)
            .await
            .expect("list");
        let names = list
            .items
            .iter()
            .map(|p| p.metadata.name.clone().expect("name"))
            .collect();
        (names, list.metadata.continue_.filter(|c| !c.is_empty()))
    }

    #[tokio::test]
    async fn pages_continue_after_the_last_key_served_even_when_objects_go_between_pages() {
        let server = ApiServer::start().await;
        for name in ["a", "b", "c", "d", "e"] {
            server.apply(pod(name));
        }
        let (first, token) = page(&server, None).await;
        assert_eq!(first, ["a", "b"]);
        // A deletion before the continue point shifts nothing: "c" is neither skipped nor repeated.
        server.delete("Pod", "ns", "a");
        let (second, token) = page(&server, token).await;
        assert_eq!(second, ["c", "d"]);
        let (last, token) = page(&server, token).await;
        assert_eq!(last, ["e"]);
        assert_eq!(token, None, "the last page has no continue token");
    }

    #[test]
    fn list_items_carry_no_api_version_or_kind() {
        let item = serde_json::to_value(ListItem(&pod("a"))).expect("json");
        assert_eq!(item, json!({"metadata": {"namespace": "ns", "name": "a"}}));
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let params = query_params("&limit=2&continue=after%3Ans%2Fa+b");
        assert_eq!(params["continue"], "after:ns/a b");
        assert_eq!(params["limit"], "2");
    }
}
