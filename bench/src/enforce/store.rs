//! Where a benchmark puts the cluster's objects for the agent to see: a manifest directory (the
//! agent's `--manifests` source; each name is a file written atomically) or palisade-testkit's
//! in-test API server (the agent's `--kubeconfig` source, the one a cluster uses: each name stands
//! for the objects last put under it, applied and deleted through list/watch).
//!
//! Both keep the directory's meaning of a name: putting a name again replaces what it held,
//! removing it removes its objects; an object held by two names (a heartbeat override of a pod
//! that is also in the cluster list) falls back to the other name's version when one goes.

use crate::datapath::run::enter_netns;
use crate::{io_err, Error, Result};
use palisade_testkit::apiserver::ApiServer;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// The agent's source of objects in a run.
#[derive(Clone)]
pub enum Store {
    Dir(PathBuf),
    Api(Arc<ApiStore>),
}

impl Store {
    /// Writes `doc` (an object or a `List`) under `name`; returns the monotonic time just before it
    /// became visible.
    pub fn put(&self, name: &str, doc: &Value) -> Result<u64> {
        match self {
            Store::Dir(dir) => super::write_manifest(dir, name, doc),
            Store::Api(api) => api.put(name, doc),
        }
    }

    /// Removes what `name` holds; returns the monotonic time just before.
    pub fn remove(&self, name: &str) -> Result<u64> {
        match self {
            Store::Dir(dir) => super::remove_manifest(dir, name),
            Store::Api(api) => api.remove(name),
        }
    }

    /// [`Self::remove`] for a name that may hold nothing.
    pub fn clear(&self, name: &str) {
        let _ = self.remove(name);
    }

    /// The agent's source arguments.
    pub fn agent_args(&self) -> Result<Vec<String>> {
        let (flag, path) = match self {
            Store::Dir(dir) => ("--manifests", dir.as_path()),
            Store::Api(api) => ("--kubeconfig", api.kubeconfig.as_path()),
        };
        Ok(vec![flag.to_string(), super::path_str(path)?.to_string()])
    }

    /// What the report calls this source.
    pub fn describe(&self) -> &'static str {
        match self {
            Store::Dir(_) => "manifest directory",
            Store::Api(_) => "in-test API server (list/watch)",
        }
    }
}

/// (kind, namespace, name) of an object.
type Key = (String, String, String);

fn key_of(doc: &Value) -> Result<Key> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let key = (
        s(&doc["kind"]),
        s(&doc["metadata"]["namespace"]),
        s(&doc["metadata"]["name"]),
    );
    if key.0.is_empty() || key.2.is_empty() {
        return Err(Error::Invalid(format!(
            "object without kind or metadata.name: {doc}"
        )));
    }
    Ok(key)
}

#[derive(Default)]
struct Names {
    /// name → the objects it holds
    held: HashMap<String, Vec<Key>>,
    /// object → (name, version) of every name holding it, latest last
    owners: HashMap<Key, Vec<(String, Value)>>,
}

/// The in-test API server, listening on 127.0.0.1 inside a node's network namespace, served by a
/// thread of its own; dropped with this.
pub struct ApiStore {
    server: Option<ApiServer>,
    names: Mutex<Names>,
    kubeconfig: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiStore {
    /// Starts the server in `netns` (where the agent runs: 127.0.0.1 is per namespace) and writes
    /// a kubeconfig for it into `work`.
    pub fn start(netns: &str, work: &Path) -> Result<ApiStore> {
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ns = netns.to_string();
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || {
                let rt = match enter_netns(&ns).and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(io_err("building the API server's runtime"))
                }) {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let _ = tx.send(Ok(ApiServer::start().await));
                    let _ = stopped.await;
                });
            })
            .map_err(io_err("spawning the API server thread"))?;
        let server = rx
            .recv()
            .map_err(|_| Error::Invalid("the API server thread died".into()))??;
        let kubeconfig = work.join("kubeconfig");
        std::fs::write(&kubeconfig, palisade_testkit::kubeconfig(&server.url())).map_err(
            |source| Error::Write {
                path: kubeconfig.clone(),
                source,
            },
        )?;
        Ok(ApiStore {
            server: Some(server),
            names: Mutex::new(Names::default()),
            kubeconfig,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn server(&self) -> Result<&ApiServer> {
        self.server
            .as_ref()
            .ok_or_else(|| Error::Invalid("the API server is stopped".into()))
    }

    fn names(&self) -> Result<std::sync::MutexGuard<'_, Names>> {
        self.names
            .lock()
            .map_err(|_| Error::Invalid("a writer thread panicked holding the store".into()))
    }

    fn put(&self, name: &str, doc: &Value) -> Result<u64> {
        let docs: Vec<&Value> = match doc["items"].as_array() {
            Some(items) if doc["kind"] == "List" => items.iter().collect(),
            _ => vec![doc],
        };
        let keys = docs.iter().map(|d| key_of(d)).collect::<Result<Vec<_>>>()?;
        let server = self.server()?;
        let mut names = self.names()?;
        let before = names.held.insert(name.to_string(), keys.clone());
        let t = super::mono_ns();
        for (key, d) in keys.iter().zip(&docs) {
            let owners = names.owners.entry(key.clone()).or_default();
            owners.retain(|(n, _)| n != name);
            owners.push((name.to_string(), (*d).clone()));
            server.apply(strip_version((*d).clone()));
        }
        for gone in before.unwrap_or_default() {
            if !keys.contains(&gone) {
                release(server, &mut names, &gone, name);
            }
        }
        Ok(t)
    }

    fn remove(&self, name: &str) -> Result<u64> {
        let server = self.server()?;
        let mut names = self.names()?;
        let keys = names
            .held
            .remove(name)
            .ok_or_else(|| Error::Invalid(format!("{name}: nothing was put under this name")))?;
        let t = super::mono_ns();
        for key in keys {
            release(server, &mut names, &key, name);
        }
        Ok(t)
    }
}

/// `name` no longer holds `key`: the object goes back to another holder's version, or is deleted.
fn release(server: &ApiServer, names: &mut Names, key: &Key, name: &str) {
    let Some(owners) = names.owners.get_mut(key) else {
        return;
    };
    owners.retain(|(n, _)| n != name);
    match owners.last() {
        Some((_, doc)) => {
            server.apply(strip_version(doc.clone()));
        }
        None => {
            names.owners.remove(key);
            server.delete(&key.0, &key.1, &key.2);
        }
    }
}

/// The server sets resourceVersion itself.
fn strip_version(mut doc: Value) -> Value {
    if let Some(meta) = doc["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    doc
}

impl Drop for ApiStore {
    fn drop(&mut self) {
        drop(self.server.take());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
