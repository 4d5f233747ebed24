//! Running the few external commands the lab needs (`ip`, `nft`, our binaries), with arguments as
//! separate strings (never a shell) and their stderr in every error.

use crate::error::{LabError, Result};
use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `program args..` to completion, feeding `stdin` when given; returns stdout on exit 0.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S], stdin: Option<&[u8]>) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    output(cmd, stdin)
}

/// Runs a prepared command to completion; returns stdout on exit 0, an error naming it otherwise.
pub fn output(mut cmd: Command, stdin: Option<&[u8]>) -> Result<String> {
    let what = describe(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| LabError::Command {
        what: what.clone(),
        detail: format!("cannot start: {e}"),
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).map_err(|e| LabError::Command {
            what: what.clone(),
            detail: format!("writing stdin: {e}"),
        })?;
    }
    let out = child.wait_with_output().map_err(|e| LabError::Command {
        what: what.clone(),
        detail: format!("waiting: {e}"),
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(LabError::Command {
            what,
            detail: format!(
                "{} (stderr: {} stdout: {})",
                out.status,
                stderr.trim(),
                stdout.trim()
            ),
        })
    }
}

/// `program arg arg ...` for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `ip args..` (always with `-n NS` or `netns` in args: the lab never touches the host netns).
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String> {
    run("ip", args, None)
}
