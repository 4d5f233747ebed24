//! Running external programs (`ip`, `nft`, `iptables-restore`, `ipset`, `iperf3`), always with an
//! argument vector (never a shell string), and running them inside a named network namespace.

use crate::{Error, Result};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Renders a command for error messages.
fn describe(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs `program args`, feeding `stdin` if given; returns stdout. Fails on a non-zero exit.
pub fn run_with_stdin(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
    let command = describe(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if let Some(input) = stdin {
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(input).map_err(|source| Error::Io {
                context: format!("writing stdin of `{command}`"),
                source,
            })?;
        }
    }
    let out = child.wait_with_output().map_err(|source| Error::Io {
        context: format!("waiting for `{command}`"),
        source,
    })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.truncate(2000);
        return Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args` and returns stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    run_with_stdin(program, args, None)
}

/// Runs `program args` inside network namespace `ns` (`ip netns exec`).
pub fn run_in(ns: &str, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run_with_stdin("ip", &full, stdin)
}

/// Like [`run_in`], and also returns how long the command took.
pub fn timed_in(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<(String, Duration)> {
    let start = Instant::now();
    let out = run_in(ns, program, args, stdin)?;
    Ok((out, start.elapsed()))
}

/// A background process that is killed (by its pid) and reaped when dropped.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `program args` inside `ns` with stdout piped and stderr inherited.
    pub fn spawn_in(ns: &str, program: &str, args: &[&str]) -> Result<ChildGuard> {
        Self::spawn_with(ns, program, args, Stdio::piped(), Stdio::inherit())
    }

    fn spawn_with(
        ns: &str,
        program: &str,
        args: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<ChildGuard> {
        let command = describe(program, args);
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| Error::Spawn {
                command: command.clone(),
                source,
            })?;
        Ok(ChildGuard {
            name: command,
            child: Some(child),
        })
    }

    /// Spawns `program args` inside `ns` with stdout and stderr appended to `log`.
    pub fn spawn_in_logged(
        ns: &str,
        program: &str,
        args: &[&str],
        log: &std::path::Path,
    ) -> Result<ChildGuard> {
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|source| Error::Write {
                    path: log.to_path_buf(),
                    source,
                })
        };
        Self::spawn_with(ns, program, args, open()?.into(), open()?.into())
    }

    /// Process id of the child (`ip netns exec` execs the program, so this is the program's pid).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The child, to read its stdout.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Waits up to `limit` for the child to exit on its own, then kills it. Returns its stdout.
    pub fn finish(mut self, limit: Duration) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok(String::new());
        };
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) | Err(_) => {
                    tracing::warn!(process = %self.name, "still running after its time limit; killing it");
                    let _ = child.kill();
                    break;
                }
            }
        }
        let out = child.wait_with_output().map_err(|source| Error::Io {
            context: format!("reaping `{}`", self.name),
            source,
        })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
