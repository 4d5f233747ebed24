//! `palisade`: the CNI plugin binary. Reads `CNI_*` and the config on stdin, prints only JSON on
//! stdout (a result, or a CNI error object with a non-zero exit), logs to stderr
//! (filter: `PALISADE_LOG`, default `info`).

use palisade_cni::{cni::Env, config, run};
use std::io::{Read, Write};
use std::process::ExitCode;

/// Environment variable holding the tracing filter.
const LOG_ENV: &str = "PALISADE_LOG";

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env(LOG_ENV)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = config::peek_version(&stdin)
        .unwrap_or_else(|| palisade_cni::cni::CniVersion::LATEST.to_string());
    let outcome = match read {
        Err(e) => Err(palisade_cni::error::Error::io("reading stdin", e)),
        Ok(_) => Env::from_lookup(|k| std::env::var(k).ok()).and_then(|env| run(&env, &stdin)),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = e.code(), "{e}");
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
