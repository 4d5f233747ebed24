//! libnftables loaded at run time with `libloading` (dlopen, so no build-time link): `nft_ctx_new`,
//! buffered output and error, `nft_run_cmd_from_buffer` with the JSON output flag set (which makes
//! the parser take JSON input too).
//!
//! A context keeps its netlink socket from `nft_ctx_new` on, so it acts on the network namespace of
//! the thread that opened it.

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};

/// The libnftables shared object (runtime package `libnftables1`).
pub const LIBNFTABLES_SONAME: &str = "libnftables.so.1";

const NFT_CTX_DEFAULT: u32 = 0;
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

/// A command or output at least this large leaves libnftables' cache holding (a copy of) the table, ~6 MB
/// after a full replace of a 10k-pod node and more after listing it: the context is then replaced by a
/// fresh one (a fraction of a millisecond), so that memory is freed. Small incremental commits keep it.
pub const RESET_CACHE_AT_BYTES: usize = 64 * 1024;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type Buffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// One libnftables context. Not thread-safe: the caller wraps it in a mutex.
pub struct LibNft {
    /// The loaded library: the function pointers below are valid while it is (it is unloaded when
    /// dropped, after [`Drop::drop`] freed the context).
    _lib: Library,
    ctx: *mut c_void,
    /// Network namespace (device, inode) of the thread that opened the context: a replacement context
    /// is only made from a thread in that same namespace.
    netns: Option<(u64, u64)>,
    new: CtxNew,
    set_flags: SetFlags,
    buf_out: Buffer,
    buf_err: Buffer,
    free: CtxFree,
    get_output: GetBuffer,
    get_error: GetBuffer,
    run: RunCmd,
}

// SAFETY: the context is only ever used by one thread at a time (behind a Mutex); libnftables keeps
// no thread-local state tied to the creating thread.
unsafe impl Send for LibNft {}

/// Loads `soname` (RTLD_NOW: a library lacking a symbol it needs fails here, not later).
fn load(soname: &str) -> Result<Library, String> {
    // SAFETY: loading libnftables runs its initialisers, which have no requirements; the caller keeps
    // the library for as long as it uses anything from it.
    unsafe { Library::open(Some(soname), RTLD_NOW | RTLD_LOCAL) }
        .map_err(|_| format!("cannot load {soname} (install libnftables1)"))
}

/// The function `name` of `lib`, as a plain function pointer (valid while `lib` is loaded).
unsafe fn sym<T: Copy>(lib: &Library, name: &CStr) -> Result<T, String> {
    // SAFETY: the caller names the symbol's true C signature as T.
    match unsafe { lib.get::<T>(name) } {
        Ok(f) => Ok(*f),
        Err(_) => Err(format!(
            "{LIBNFTABLES_SONAME} lacks {}",
            name.to_string_lossy()
        )),
    }
}

impl LibNft {
    pub fn open() -> Result<Self, String> {
        let lib = load(LIBNFTABLES_SONAME)?;
        // SAFETY: the symbol types match libnftables.h.
        unsafe {
            let new: CtxNew = sym(&lib, c"nft_ctx_new")?;
            let free: CtxFree = sym(&lib, c"nft_ctx_free")?;
            let set_flags: SetFlags = sym(&lib, c"nft_ctx_output_set_flags")?;
            let buf_out: Buffer = sym(&lib, c"nft_ctx_buffer_output")?;
            let buf_err: Buffer = sym(&lib, c"nft_ctx_buffer_error")?;
            let get_output: GetBuffer = sym(&lib, c"nft_ctx_get_output_buffer")?;
            let get_error: GetBuffer = sym(&lib, c"nft_ctx_get_error_buffer")?;
            let run: RunCmd = sym(&lib, c"nft_run_cmd_from_buffer")?;
            let ctx = new_ctx(new, set_flags, buf_out, buf_err, free)?;
            Ok(LibNft {
                _lib: lib,
                ctx,
                netns: thread_netns(),
                new,
                set_flags,
                buf_out,
                buf_err,
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
            if cmd.len().max(out.len()) >= RESET_CACHE_AT_BYTES {
                self.reset_cache();
                release_free_heap();
            }
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

/// libnftables allocates with the C library's malloc: a full replace or a listing of a 10k-pod table
/// peaks at ~23 MB there, and glibc keeps freed heap pages resident unless asked. Measured at 10k
/// pods: the agent's RSS stayed ~20 MB higher after each large command until trimmed. (The Rust side
/// of our binaries may use another allocator; this is only about libnftables' heap.)
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl LibNft {
    /// Replaces the context by a fresh one (dropping libnftables' cache and output buffer), when this
    /// thread is in the namespace the context was opened in; otherwise, or if that fails, keeps it.
    fn reset_cache(&mut self) {
        if self.netns.is_none() || thread_netns() != self.netns {
            return;
        }
        // SAFETY: the function pointers come from open(); the old context is freed exactly once, after
        // its replacement exists.
        unsafe {
            if let Ok(ctx) = new_ctx(
                self.new,
                self.set_flags,
                self.buf_out,
                self.buf_err,
                self.free,
            ) {
                // Notifications of what this context committed may still be queued for the monitor.
                crate::monitor::remember_own_sockets();
                (self.free)(self.ctx);
                self.ctx = ctx;
            }
        }
    }
}

/// A context with JSON output and buffered output and error.
unsafe fn new_ctx(
    new: CtxNew,
    set_flags: SetFlags,
    buf_out: Buffer,
    buf_err: Buffer,
    free: CtxFree,
) -> Result<*mut c_void, String> {
    // SAFETY: the caller passes libnftables' functions with their true signatures.
    unsafe {
        let ctx = new(NFT_CTX_DEFAULT);
        if ctx.is_null() {
            return Err("nft_ctx_new returned NULL".into());
        }
        set_flags(ctx, NFT_CTX_OUTPUT_JSON);
        if buf_out(ctx) != 0 || buf_err(ctx) != 0 {
            free(ctx);
            return Err("cannot buffer libnftables output".into());
        }
        Ok(ctx)
    }
}

/// The calling thread's network namespace as (device, inode); `None` if it cannot be read.
fn thread_netns() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/thread-self/ns/net").ok()?;
    Some((meta.dev(), meta.ino()))
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
        // Notifications of what this context committed may still be queued for the monitor.
        crate::monitor::remember_own_sockets();
        // SAFETY: ctx was created in open() (or reset_cache) and is freed exactly once, before the
        // library is unloaded (fields drop after this).
        unsafe {
            (self.free)(self.ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_or_symbol_is_named_in_the_error() {
        let err = load("libpalisade-no-such-library.so.1").unwrap_err();
        assert_eq!(
            err,
            "cannot load libpalisade-no-such-library.so.1 (install libnftables1)"
        );
        // libnftables itself is installed with nft (the kernel tests need both).
        let lib = load(LIBNFTABLES_SONAME).unwrap();
        // SAFETY: never called.
        let err = unsafe { sym::<CtxFree>(&lib, c"nft_no_such_function") }.unwrap_err();
        assert_eq!(err, "libnftables.so.1 lacks nft_no_such_function");
        // SAFETY: the true signature of nft_ctx_free; not called.
        assert!(unsafe { sym::<CtxFree>(&lib, c"nft_ctx_free") }.is_ok());
    }
}
