//! `palisade-agent`: see `palisade-agent --help`.

use clap::Parser;
use palisade_agent::cli::{Cli, Command, LogFormat};
use palisade_agent::commands;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// Worker threads of the runtime: sources and the HTTP server are light; the reconcile engine has its own thread.
const WORKER_THREADS: usize = 2;

/// The agent's Rust heap is mimalloc, told to give freed pages back to the kernel at once. With glibc
/// malloc the start-up peak (a 10k-pod listing parsed, compiled, rendered for the full replace) left
/// its holes scattered between the long-lived objects, and `malloc_trim` cannot return a page that
/// still holds one live chunk: at 10k pods / 1k policies resident memory stays at ~82 MiB with ~29
/// MiB live. mimalloc keeps small objects in size-class pages and frees whole pages: ~49 MiB with the
/// same code (BENCHMARKS.md, "Scale"). libnftables, a C library, still uses glibc malloc; see
/// [`MALLOC_ARENAS`].
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_t` values (mimalloc.h; stable across v2 and v3, deprecated entries keep
/// their numbers).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Purge freed pages immediately instead of after 10 ms: mimalloc purges only when the allocator is
/// next called, and an idle agent (the normal state between changes) otherwise keeps its start-up
/// peak. And commit arena memory as it is used: in an eagerly committed arena a purge only resets
/// pages (`MADV_FREE`, which stays resident until the kernel runs short), where a lazily committed
/// one decommits them. Measured at 10k pods / 1k policies: RSS ~59 MiB with both, 69-81 with the
/// purge delay alone.
///
/// The arena mode is read when mimalloc initializes, in its constructor, before `main`; so this runs
/// as a constructor that precedes it (a prioritized `.init_array` entry runs before the plain ones
/// gcc emits for mimalloc). It only sets defaults: `MIMALLOC_PURGE_DELAY` and
/// `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still win.
extern "C" fn tune_allocator() {
    // SAFETY: mi_option_set_default writes one entry of mimalloc's static option table; it neither
    // allocates nor needs mimalloc initialized, and no other thread exists yet.
    unsafe {
        libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0);
    }
}

#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00101"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

/// glibc malloc arenas, now used by libnftables (and the few C-library allocations) only. The default
/// (8 per core) gives each thread that allocates its own heap, and each would keep the peak of the
/// large commands run on it; with one, palisade-nft's trim after a large command returns it all.
/// Before mimalloc took the Rust heap, one arena took the agent at 10k pods from ~200 to ~124 MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 1;

/// Applies [`MALLOC_ARENAS`] before any thread starts. `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log_level).unwrap_or_else(|e| {
        eprintln!("bad --log-level {:?} ({e}); using info", cli.log_level);
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Run(a) => commands::run(a).await,
            Command::Cleanup(a) => commands::cleanup(a).await,
            Command::Explain(a) => commands::explain(a).await,
            Command::Compile(a) => commands::compile(a).await,
            Command::Flows(a) => commands::flows(a).await,
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, kind = e.kind(), "palisade-agent failed");
            ExitCode::FAILURE
        }
    }
}
