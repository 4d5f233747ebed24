//! The nft edge: runs one JSON transaction and reads back our table, nothing else.
//!
//! Two interchangeable backends: `exec` pipes the batch into `nft -j -f -` (one process per transaction),
//! `lib` calls libnftables in-process (dlopen'ed `libnftables.so.1`, so no build-time link). When the
//! library cannot be loaded, `lib` falls back to `exec` with a warning. Only our table is ever listed
//! (`list table inet palisade`); other tables are never parsed.

use crate::error::{Error, Result};
use palisade_contract::{PENDING_SET_V4, PENDING_SET_V6, TABLE_FAMILY, TABLE_NAME};
use palisade_policy::ruleset::names;
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The `nft` binary, looked up on PATH.
pub const NFT_BINARY: &str = "nft";
/// The libnftables shared object (runtime package `libnftables1`).
pub const LIBNFTABLES_SONAME: &str = "libnftables.so.1";
/// Base chains of our table (named by the compiler).
pub const BASE_CHAINS: [&str; 3] = [
    names::CHAIN_EGRESS,
    names::CHAIN_INGRESS,
    names::CHAIN_EGRESS_HOST,
];
/// What nft says when our table does not exist.
const ABSENT_MARKER: &str = "No such file or directory";

/// Which way transactions reach the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `nft -j -f -`, one process per transaction.
    Exec,
    /// libnftables in-process (falls back to exec when the library is missing).
    Lib,
}

/// Runs transactions and lists our table.
pub struct Nft {
    lib: Option<Mutex<lib::LibNft>>,
}

impl Nft {
    /// A runner for `backend`. A `Lib` backend whose library cannot be loaded degrades to exec.
    pub fn new(backend: Backend) -> Self {
        let lib = match backend {
            Backend::Exec => None,
            Backend::Lib => match lib::LibNft::open() {
                Ok(l) => Some(Mutex::new(l)),
                Err(e) => {
                    tracing::warn!(error = %e, "libnftables unavailable, using `nft -j -f -` instead");
                    None
                }
            },
        };
        Nft { lib }
    }

    /// The backend actually in use.
    pub fn backend(&self) -> Backend {
        if self.lib.is_some() {
            Backend::Lib
        } else {
            Backend::Exec
        }
    }

    /// Applies one JSON batch (`{"nftables":[...]}`) as one atomic transaction.
    pub fn apply(&self, batch: &str) -> Result<()> {
        match &self.lib {
            Some(l) => {
                let mut l = l.lock().map_err(|_| Error::Nft {
                    action: "apply",
                    message: "libnftables context poisoned".into(),
                })?;
                l.run(batch).map(|_| ()).map_err(|message| Error::Nft {
                    action: "apply",
                    message,
                })
            }
            None => exec(&["-j", "-f", "-"], Some(batch))
                .map(|_| ())
                .map_err(|message| Error::Nft {
                    action: "apply",
                    message,
                }),
        }
    }

    /// Lists our table as nft JSON; `None` when the table does not exist.
    pub fn list_table(&self) -> Result<Option<String>> {
        let out = match &self.lib {
            Some(l) => {
                let mut l = l.lock().map_err(|_| Error::Nft {
                    action: "list",
                    message: "libnftables context poisoned".into(),
                })?;
                l.run(&format!("list table {TABLE_FAMILY} {TABLE_NAME}"))
            }
            None => exec(&["-j", "list", "table", TABLE_FAMILY, TABLE_NAME], None),
        };
        match out {
            Ok(s) => Ok(Some(s)),
            Err(m) if m.contains(ABSENT_MARKER) => Ok(None),
            Err(message) => Err(Error::Nft {
                action: "list table",
                message,
            }),
        }
    }

    /// Deletes our table (cleanup). Absent is success.
    pub fn delete_table(&self) -> Result<bool> {
        let batch = serde_json::json!({"nftables": [
            {"add": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}},
            {"delete": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}}
        ]});
        let existed = self.list_table()?.is_some();
        self.apply(&batch.to_string())?;
        Ok(existed)
    }
}

/// Runs `nft ARGS`, feeding `stdin`; returns stdout, or stderr (with the exit status) on failure.
fn exec(args: &[&str], stdin: Option<&str>) -> std::result::Result<String, String> {
    let mut child = Command::new(NFT_BINARY)
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
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("writing the batch to nft: {e}"))?;
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

/// Starts a thread running `nft monitor destroy` and calls `wake` whenever our table or one of its base
/// chains is deleted (e.g. `nft flush ruleset`), so the check runs at once instead of at the next resync.
/// Incremental commits never delete those, so our own churn does not wake it (a full replace does, once).
/// Smaller changes behind our back are found by the periodic check. The monitor dies with the agent
/// (PR_SET_PDEATHSIG) and is restarted when it exits.
pub fn watch_destroy(wake: impl Fn() -> bool + Send + 'static) -> Result<()> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let table = format!("delete table {TABLE_FAMILY} {TABLE_NAME}");
    let chains: Vec<String> = BASE_CHAINS
        .iter()
        .map(|c| format!("delete chain {TABLE_FAMILY} {TABLE_NAME} {c}"))
        .collect();
    std::thread::Builder::new()
        .name("nft-monitor".into())
        .spawn(move || loop {
            let mut cmd = Command::new(NFT_BINARY);
            cmd.args(["monitor", "destroy"]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
            // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child with us.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot run `nft monitor`; changes to our table are noticed at resync only");
                    return;
                }
            };
            if let Some(out) = child.stdout.take() {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let line = line.trim_end();
                    let ours = line == table || chains.iter().any(|c| line == c);
                    if ours && !wake() {
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(std::time::Duration::from_secs(1));
        })
        .map_err(|e| Error::io("spawn nft monitor thread", NFT_BINARY, e))?;
    Ok(())
}

/// What we compare to notice our table was changed behind our back, and what the gauges show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableSummary {
    /// Hash of the listing without handles, counter values and pending elements (which the plugin owns).
    pub fingerprint: u64,
    pub chains: u64,
    pub rules: u64,
    /// Named sets and maps.
    pub sets: u64,
    /// Elements of all sets and maps, pending ones included.
    pub elements: u64,
    /// Elements of the pending sets.
    pub pending: u64,
}

/// Summarises a listing of our table (see [`TableSummary`]). Unknown shapes are hashed as they are.
pub fn summarize(listing: &str) -> Result<TableSummary> {
    let mut v: Value = serde_json::from_str(listing).map_err(|e| Error::Nft {
        action: "parse listing",
        message: e.to_string(),
    })?;
    let mut s = TableSummary::default();
    if let Some(items) = v.get_mut("nftables").and_then(Value::as_array_mut) {
        items.retain(|i| i.get("metainfo").is_none());
        for item in items.iter_mut() {
            let Some(obj) = item.as_object_mut() else {
                continue;
            };
            if obj.contains_key("chain") {
                s.chains += 1;
            } else if obj.contains_key("rule") {
                s.rules += 1;
            }
            for key in ["set", "map"] {
                if let Some(set) = obj.get_mut(key).and_then(Value::as_object_mut) {
                    s.sets += 1;
                    let n = set
                        .get("elem")
                        .and_then(Value::as_array)
                        .map_or(0, |a| a.len() as u64);
                    s.elements += n;
                    let name = set.get("name").and_then(Value::as_str).unwrap_or_default();
                    if name == PENDING_SET_V4 || name == PENDING_SET_V6 {
                        s.pending += n;
                        set.remove("elem");
                    }
                }
            }
        }
    }
    normalize(&mut v);
    s.fingerprint = fnv1a(v.to_string().as_bytes());
    Ok(s)
}

/// Drops what changes without anyone changing our rules: handles and counter values.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("handle");
            if let Some(Value::Object(c)) = m.get_mut("counter") {
                c.remove("packets");
                c.remove("bytes");
            }
            m.values_mut().for_each(normalize);
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// libnftables through dlopen: `nft_ctx_new`, buffered output and error, `nft_run_cmd_from_buffer`
/// with the JSON output flag set (which makes the parser take JSON input too).
mod lib {
    use super::LIBNFTABLES_SONAME;
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};

    const NFT_CTX_DEFAULT: u32 = 0;
    const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

    type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
    type CtxFree = unsafe extern "C" fn(*mut c_void);
    type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
    type Buffer = unsafe extern "C" fn(*mut c_void) -> c_int;
    type GetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
    type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

    /// One libnftables context. Not thread-safe: the caller wraps it in a mutex.
    pub struct LibNft {
        handle: *mut c_void,
        ctx: *mut c_void,
        free: CtxFree,
        get_output: GetBuffer,
        get_error: GetBuffer,
        run: RunCmd,
    }

    // SAFETY: the context is only ever used by one thread at a time (behind a Mutex); libnftables keeps
    // no thread-local state tied to the creating thread.
    unsafe impl Send for LibNft {}

    unsafe fn sym<T: Copy>(handle: *mut c_void, name: &CStr) -> Result<T, String> {
        // SAFETY: handle comes from dlopen; the caller names the symbol's true C signature as T.
        let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if p.is_null() {
            return Err(format!(
                "{LIBNFTABLES_SONAME} lacks {}",
                name.to_string_lossy()
            ));
        }
        // SAFETY: T is a function pointer type of the same size as *mut c_void.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
    }

    impl LibNft {
        pub fn open() -> Result<Self, String> {
            let soname = CString::new(LIBNFTABLES_SONAME).map_err(|e| e.to_string())?;
            // SAFETY: dlopen with a valid C string; the handle is kept for the life of LibNft.
            let handle =
                unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if handle.is_null() {
                return Err(format!(
                    "cannot load {LIBNFTABLES_SONAME} (install libnftables1)"
                ));
            }
            // SAFETY: the symbol types match libnftables.h.
            unsafe {
                let new: CtxNew = sym(handle, c"nft_ctx_new")?;
                let free: CtxFree = sym(handle, c"nft_ctx_free")?;
                let set_flags: SetFlags = sym(handle, c"nft_ctx_output_set_flags")?;
                let buf_out: Buffer = sym(handle, c"nft_ctx_buffer_output")?;
                let buf_err: Buffer = sym(handle, c"nft_ctx_buffer_error")?;
                let get_output: GetBuffer = sym(handle, c"nft_ctx_get_output_buffer")?;
                let get_error: GetBuffer = sym(handle, c"nft_ctx_get_error_buffer")?;
                let run: RunCmd = sym(handle, c"nft_run_cmd_from_buffer")?;
                let ctx = new(NFT_CTX_DEFAULT);
                if ctx.is_null() {
                    return Err("nft_ctx_new returned NULL".into());
                }
                set_flags(ctx, NFT_CTX_OUTPUT_JSON);
                if buf_out(ctx) != 0 || buf_err(ctx) != 0 {
                    free(ctx);
                    return Err("cannot buffer libnftables output".into());
                }
                Ok(LibNft {
                    handle,
                    ctx,
                    free,
                    get_output,
                    get_error,
                    run,
                })
            }
        }

        /// Runs one command buffer (JSON or nft syntax); stdout on success, the error buffer on failure.
        pub fn run(&mut self, cmd: &str) -> Result<String, String> {
            let c = CString::new(cmd).map_err(|_| "command contains a NUL byte".to_string())?;
            // SAFETY: ctx is live; buffers are read right after the call, before the next one replaces them.
            unsafe {
                let rc = (self.run)(self.ctx, c.as_ptr());
                let out = read((self.get_output)(self.ctx));
                let err = read((self.get_error)(self.ctx));
                if rc == 0 {
                    Ok(out)
                } else {
                    Err(if err.trim().is_empty() {
                        format!("libnftables returned {rc}")
                    } else {
                        err.trim().to_string()
                    })
                }
            }
        }
    }

    unsafe fn read(p: *const c_char) -> String {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: libnftables returns a NUL-terminated buffer it owns until the next call.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    }

    impl Drop for LibNft {
        fn drop(&mut self) {
            // SAFETY: ctx and handle were created in open() and are freed exactly once.
            unsafe {
                (self.free)(self.ctx);
                libc::dlclose(self.handle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
      {"table":{"family":"inet","name":"palisade","handle":7}},
      {"set":{"family":"inet","name":"pending_v4","table":"palisade","type":"ipv4_addr","handle":2,"elem":["10.0.0.9"]}},
      {"map":{"family":"inet","name":"egress_v4","table":"palisade","type":"ipv4_addr","map":"verdict","handle":3,"elem":[["10.0.0.2",{"goto":{"target":"eg_1"}}]]}},
      {"chain":{"family":"inet","table":"palisade","name":"egress","handle":1}},
      {"rule":{"family":"inet","table":"palisade","chain":"egress","handle":4,"expr":[{"counter":{"packets":3,"bytes":180}},{"drop":null}]}}]}"#;

    #[test]
    fn summary_ignores_counters_handles_and_pending_elements() {
        let a = summarize(LISTING).unwrap();
        let b = summarize(
            &LISTING
                .replace("\"packets\":3", "\"packets\":99")
                .replace("\"handle\":4", "\"handle\":40")
                .replace("[\"10.0.0.9\"]", "[\"10.0.0.9\",\"10.0.0.10\"]"),
        )
        .unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(
            (a.chains, a.rules, a.sets, a.elements, a.pending),
            (1, 1, 2, 2, 1)
        );
        assert_eq!(b.pending, 2);
    }

    #[test]
    fn summary_notices_a_removed_rule_or_map_element() {
        let a = summarize(LISTING).unwrap();
        let b = summarize(&LISTING.replace(r#"["10.0.0.2",{"goto":{"target":"eg_1"}}]"#, ""))
            .unwrap_or_default();
        assert_ne!(a.fingerprint, b.fingerprint);
    }

    #[test]
    fn summary_rejects_garbage_with_an_error() {
        assert!(summarize("not json").is_err());
    }
}
