//! What the agent's tests and the benchmarks share, so that both drive the agent's production
//! paths the same way (one copy of each fake, not one per user):
//!
//! - [`apiserver`]: an in-test Kubernetes API server (list/watch over HTTP/1.1) that kube-rs'
//!   client and watcher use unchanged, and [`kubeconfig`] pointing a client at it.
//!
//! Test support, not product code: a broken invariant panics with a message (`expect`), as a test
//! would.

pub mod apiserver;

/// A kubeconfig (YAML) for a client of `server` (e.g. [`apiserver::ApiServer::url`]), no auth.
pub fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"{server}\"}}}}]\n\
         users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: t, user: u}}}}]\n\
         current-context: c\n"
    )
}
