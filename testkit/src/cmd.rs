//! Running a command from a test: its output, or a panic that names the command and its stderr.

use std::process::{Command, Output};

/// Runs `cmd` and returns its output whatever its status; panics if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, panics (with its stdout and stderr) unless it succeeds, and returns its stdout.
pub fn must(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test (never skips it) when not root: tests that make namespaces run as root, as in CI.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and must run as root"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn must_returns_stdout_of_a_command_that_succeeds() {
        assert_eq!(must(Command::new("echo").arg("hi")), "hi\n");
    }

    #[test]
    #[should_panic(expected = "failed")]
    fn must_panics_on_a_command_that_fails() {
        must(&mut Command::new("false"));
    }
}
