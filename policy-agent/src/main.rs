//! `palisade-agent`: see `palisade-agent --help`.

use clap::Parser;
use palisade_agent::cli::{Cli, Command, LogFormat};
use palisade_agent::commands;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// Worker threads of the runtime: sources and the HTTP server are light; the reconcile engine has its own thread.
const WORKER_THREADS: usize = 2;

/// glibc malloc arenas. The default (8 per core) gives each thread that allocates its own heap: the
/// source's parse and the engine's full-replace render each leave their peak behind in a separate arena,
/// never returned. The agent has little parallelism, so one arena costs nothing measurable and at 10k
/// pods keeps resident memory at ~124 MiB instead of ~200 MiB.
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
