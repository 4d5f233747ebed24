//! The fallback backend: one `nft` process per command (about 4 ms, the process start dominates).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `nft` binary, looked up on PATH.
pub const NFT_BINARY: &str = "nft";

/// Runs `nft ARGS`, feeding `stdin`; returns stdout, or stderr (with the exit status) on failure.
/// Arguments are passed as argv, never through a shell.
pub(crate) fn run(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let child = spawn(args, stdin.is_some())?;
    as_ours(child, |child| finish(child, stdin))
}

/// `nft ARGS` started, stdout and stderr piped, stdin piped only when there is input.
fn spawn(args: &[&str], stdin: bool) -> Result<Child, String> {
    Command::new(NFT_BINARY)
        .args(args)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{NFT_BINARY}` (is nftables installed and on PATH?): {e}"))
}

/// Runs `f` on `child` while the drift monitor takes its commits for ours: its netlink socket is
/// autobound to portid = its pid (in our pid namespace), also when their notifications are read
/// after it exited.
fn as_ours<T>(child: Child, f: impl FnOnce(Child) -> T) -> T {
    let pid = child.id();
    crate::monitor::remember_portid(pid, Duration::from_secs(3600));
    let result = f(child);
    crate::monitor::retire_portid(pid);
    result
}

fn finish(mut child: Child, stdin: Option<&str>) -> Result<String, String> {
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // On a write error nft has exited; its stderr (read below) says why.
        let written = pipe.write_all(input.as_bytes());
        drop(pipe);
        if let Err(e) = written {
            let out = child
                .wait_with_output()
                .map_err(|e| format!("waiting for nft: {e}"))?;
            return Err(format!(
                "writing the batch to nft: {e}; nft said: {} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ));
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        // The output as read, not a copy of it: a listing of a 100k-pod node's table is ~12 MB.
        Ok(String::from_utf8(out.stdout)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    } else {
        Err(format!(
            "{} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}
