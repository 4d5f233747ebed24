//! Long-running processes of the lab (agents, pod servers): started detached in their own process
//! group, marked with an environment variable so a later `down` can tell ours from a reused pid.

use crate::error::{LabError, Result};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Lab processes spawned by this process and not reaped yet.
static CHILDREN: std::sync::Mutex<Vec<std::process::Child>> = std::sync::Mutex::new(Vec::new());

/// Environment variable every lab process carries: `PALISADE_LAB=<lab name>`.
pub const MARKER_ENV: &str = "PALISADE_LAB";

/// Starts `ip netns exec NS program args..` detached (own process group, so a terminal's Ctrl-C
/// reaches only the lab CLI, which tears down in order), logging to `log`. Returns the pid.
pub fn spawn_in_netns(
    lab: &str,
    netns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<u32> {
    let out = File::create(log).map_err(LabError::io(log))?;
    spawn_logging_to(lab, netns, program, args, out, log)
}

/// [`spawn_in_netns`], appending to `log` (a restarted process keeps its predecessor's log).
pub fn spawn_in_netns_appending(
    lab: &str,
    netns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<u32> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(LabError::io(log))?;
    spawn_logging_to(lab, netns, program, args, out, log)
}

fn spawn_logging_to(
    lab: &str,
    netns: &str,
    program: &Path,
    args: &[String],
    out: File,
    log: &Path,
) -> Result<u32> {
    let err = out.try_clone().map_err(LabError::io(log))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(program)
        .args(args)
        .env(MARKER_ENV, lab)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = cmd.spawn().map_err(|e| LabError::Command {
        what: crate::cmd::describe(&cmd),
        detail: format!("cannot start: {e}"),
    })?;
    let pid = child.id();
    // Reaped by `reap` (same process), or by init once the CLI exits.
    if let Ok(mut children) = CHILDREN.lock() {
        children.push(child);
    }
    Ok(pid)
}

/// Whether `pid` is alive and carries our marker for `lab` (so never a reused pid of someone else).
pub fn is_ours(pid: u32, lab: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("{MARKER_ENV}={lab}");
    environ.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
}

/// Whether a process is still running: some thread of it is not a zombie. The leader alone is
/// not enough: on exit it can turn zombie while another thread still runs and still holds the
/// process's files (a restarted agent then found the old one's NFLOG socket bound).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(threads) => threads
            .flatten()
            .any(|t| thread_running(&t.path().join("stat"))),
        Err(_) => false,
    }
}

/// Whether the thread whose `/proc/.../stat` is at `stat` still exists and is not a zombie.
fn thread_running(stat: &std::path::Path) -> bool {
    match std::fs::read_to_string(stat) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Reaps the lab processes this process spawned that have exited, without blocking. Only our own
/// `Child` handles are waited on, never `waitpid(-1)`, so other threads' commands keep their exit
/// statuses.
pub fn reap() {
    if let Ok(mut children) = CHILDREN.lock() {
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
    }
}

/// SIGTERM, then SIGKILL after a grace period; waits until the process is gone (bounded).
pub fn kill_and_wait(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let p = Pid::from_raw(pid);
    if kill(p, Signal::SIGTERM).is_err() {
        return;
    }
    let start = Instant::now();
    while alive(pid) && start.elapsed() < Duration::from_millis(1500) {
        reap();
        std::thread::sleep(Duration::from_millis(10));
    }
    if alive(pid) {
        let _ = kill(p, Signal::SIGKILL);
        while alive(pid) && start.elapsed() < Duration::from_secs(5) {
            reap();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    reap();
}

/// Kills a recorded lab process if it is still ours.
pub fn stop(pid: u32, lab: &str) {
    if is_ours(pid, lab) {
        if let Ok(p) = i32::try_from(pid) {
            kill_and_wait(p);
        }
    }
}

/// Every live process carrying the marker of `lab` (ours by construction: only the lab sets it).
pub fn lab_pids(lab: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| *pid != me && is_ours(*pid, lab) && alive(*pid as i32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running child is alive; killed and not yet reaped (a zombie) it is gone.
    #[test]
    fn a_zombie_is_gone_and_a_running_process_alive() {
        assert!(alive(std::process::id() as i32), "this test's own process");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        assert!(alive(pid), "a running child");
        child.kill().expect("kill our child");
        let start = Instant::now();
        while alive(pid) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(pid), "killed, not reaped: a zombie counts as gone");
        child.wait().expect("reap our child");
        assert!(!alive(pid), "reaped");
    }
}
