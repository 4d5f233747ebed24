//! A process a test started: killed and reaped when its guard drops (also on panic), so no helper
//! server, probe or agent outlives the test that started it.

use std::ops::{Deref, DerefMut};
use std::process::Child;

/// Owns a child process; `kill` + `wait` on drop. Derefs to the [`Child`] (pid, pipes).
#[derive(Debug)]
pub struct KillOnDrop(Child);

impl From<Child> for KillOnDrop {
    fn from(child: Child) -> Self {
        KillOnDrop(child)
    }
}

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_child_is_killed_and_reaped_when_its_guard_drops() {
        let guard = KillOnDrop::from(Command::new("sleep").arg("60").spawn().unwrap());
        let pid = guard.id();
        drop(guard);
        // Reaped: the pid no longer names a process of ours (no zombie left behind).
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
