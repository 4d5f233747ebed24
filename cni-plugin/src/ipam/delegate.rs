//! Delegation to another IPAM plugin found in `CNI_PATH`, executed as libcni would (the network
//! configuration on stdin unchanged, the environment of the attachment it is about).

use crate::cni::{CniResult, Env};
use crate::error::{Error, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

/// The attachment a delegate call is about (the current one, or a stale one during GC).
#[derive(Debug, Clone)]
pub struct DelegateTarget {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<String>,
}

impl DelegateTarget {
    pub fn from_env(env: &Env) -> Self {
        DelegateTarget {
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
            netns: env.netns.clone(),
        }
    }
}

/// Finds `plugin` in `CNI_PATH`.
pub fn find_plugin(plugin: &str, path: &[PathBuf]) -> Result<PathBuf> {
    path.iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::config(
                "ipam.type",
                format!(
                    "plugin {plugin:?} not found in CNI_PATH ({})",
                    path.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                ),
            )
        })
}

/// Executes a delegate exactly as libcni does: the whole config on stdin, the CNI environment with
/// `CNI_COMMAND` set; stdout is the result (or an error object when the exit status is non-zero).
pub fn exec_delegate(
    plugin: &str,
    command: &str,
    env: &Env,
    target: &DelegateTarget,
    stdin: &[u8],
) -> Result<Option<CniResult>> {
    let bin = find_plugin(plugin, &env.path)?;
    let mut cmd = Process::new(&bin);
    cmd.env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if command == "GC" || command == "STATUS" {
        cmd.env_remove("CNI_CONTAINERID")
            .env_remove("CNI_IFNAME")
            .env_remove("CNI_NETNS");
    } else {
        cmd.env("CNI_CONTAINERID", &target.container_id)
            .env("CNI_IFNAME", &target.ifname);
        match &target.netns {
            Some(n) => cmd.env("CNI_NETNS", n),
            None => cmd.env_remove("CNI_NETNS"),
        };
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("executing IPAM plugin {}", bin.display()), e))?;
    if let Some(mut s) = child.stdin.take() {
        s.write_all(stdin).map_err(|e| {
            Error::io(
                format!("writing config to IPAM plugin {}", bin.display()),
                e,
            )
        })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("waiting for IPAM plugin {}", bin.display()), e))?;
    if !out.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        return Err(Error::Delegate {
            plugin: plugin.to_string(),
            code: v["code"]
                .as_u64()
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(crate::error::code::IO),
            msg: v["msg"].as_str().map(str::to_string).unwrap_or_else(|| {
                format!(
                    "{command} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout)
                )
            }),
            details: v["details"].as_str().unwrap_or_default().to_string(),
        });
    }
    if command != "ADD" || out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| Error::Delegate {
            plugin: plugin.to_string(),
            code: crate::error::code::DECODE,
            msg: format!("cannot parse its ADD result: {e}"),
            details: String::from_utf8_lossy(&out.stdout).into_owned(),
        })
}
