//! The fallback backend: one `nft` process per command (about 4 ms, the process start dominates).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The `nft` binary, looked up on PATH.
pub const NFT_BINARY: &str = "nft";

/// Runs `nft ARGS`, feeding `stdin`; returns stdout, or stderr (with the exit status) on failure.
/// Arguments are passed as argv, never through a shell.
pub(crate) fn run(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let child = Command::new(NFT_BINARY)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run `{NFT_BINARY}` (is nftables installed and on PATH?): {e}")
        })?;
    // Its netlink socket is autobound to portid = its pid (in our pid namespace): the monitor must take
    // its commits for ours, also when their notifications are read after it exited.
    let pid = child.id();
    crate::monitor::remember_portid(pid, Duration::from_secs(3600));
    let result = finish(child, stdin);
    crate::monitor::retire_portid(pid);
    result
}

fn finish(mut child: std::process::Child, stdin: Option<&str>) -> Result<String, String> {
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
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}
