//! What tests and benchmarks share, so that each piece of harness exists once (one copy of each
//! guard and fake, not one per test file):
//!
//! - [`netns`]: the network-namespace guard (created with a unique name, deleted on drop).
//! - [`nft`]: our table listed in a comparable form ([`nft::normalized`]), loaded and listed in a
//!   test namespace.
//! - [`temp`]: temporary directories (`tempfile`) and atomic writes.
//! - [`cmd`]: running commands with a panic that names them; [`cmd::require_root`].
//! - [`http`]: a plain HTTP GET, also from inside a namespace (the agent's endpoints).
//! - [`process::KillOnDrop`]: a child process killed and reaped when its guard drops.
//! - [`names::unique`], [`wait::wait_until`].
//! - [`libcni`]: the small libcni that runs a whole conflist inside a node namespace (chaining,
//!   capability args, the `CNI_*` environment, CNI errors as values), for the CNI tests and the lab.
//! - `apiserver` (feature `apiserver`): an in-test Kubernetes API server (list/watch over HTTP/1.1) that kube-rs'
//!   client and watcher use unchanged, and [`kubeconfig`] pointing a client at it.
//!
//! Test support, not product code: a broken invariant panics with a message (`expect`), as a test
//! would. Nothing here touches the host's own network namespace.

#[cfg(feature = "apiserver")]
pub mod apiserver;
pub mod cmd;
pub mod http;
pub mod libcni;
pub mod names;
pub mod netns;
pub mod nft;
pub mod process;
pub mod temp;
pub mod wait;

pub use names::unique;
pub use netns::Netns;
pub use wait::wait_until;

/// A kubeconfig (YAML) for a client of `server` (e.g. `apiserver::ApiServer::url`), no auth.
pub fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"{server}\"}}}}]\n\
         users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: t, user: u}}}}]\n\
         current-context: c\n"
    )
}
