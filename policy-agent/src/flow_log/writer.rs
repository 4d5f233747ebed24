//! The flow log's writer task: appends each line to the output (stdout or a file), keeps the last
//! [`RECENT`] lines, and serves them on a unix socket in the state directory (owner-only: the lines
//! name pods and addresses): a client sends `recent` (the kept lines, then the connection closes) or
//! `follow` (the kept lines, then every new one as it comes). A follower too slow to keep up is told
//! how many lines it missed (`{"missed": n}`) and goes on.

use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc};
use tracing::warn;

/// Lines kept for `palisade-agent flows`.
pub const RECENT: usize = 1000;
/// Name of the socket in the state directory.
pub const SOCKET: &str = "flows.sock";
/// How long a client may take to say what it wants.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Where lines go besides the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

impl Output {
    /// `-` is stdout; anything else a file appended to.
    pub fn parse(s: &str) -> Self {
        if s == "-" {
            Output::Stdout
        } else {
            Output::File(PathBuf::from(s))
        }
    }
}

type Recent = Arc<Mutex<VecDeque<Arc<str>>>>;

/// Opens the output and the socket (so a bad path fails at start), and returns the task that
/// writes and serves until every sender of `rx` is gone.
pub async fn start(
    output: Output,
    state_dir: &Path,
    mut rx: mpsc::Receiver<Arc<str>>,
) -> Result<impl std::future::Future<Output = ()>> {
    let mut out: Box<dyn AsyncWrite + Unpin + Send> = match &output {
        Output::Stdout => Box::new(tokio::io::stdout()),
        Output::File(path) => Box::new(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .map_err(|e| Error::io("open flow log", path.display().to_string(), e))?,
        ),
    };
    let listener = listen(state_dir)?;
    let recent: Recent = Arc::new(Mutex::new(VecDeque::with_capacity(RECENT)));
    let (tx, _) = broadcast::channel::<Arc<str>>(1024);
    let serving = tokio::spawn(serve(listener, recent.clone(), tx.clone()));
    Ok(async move {
        // Warned once per failing stretch, not per line (a full disk would repeat it 100 times a second).
        let mut failing = false;
        while let Some(line) = rx.recv().await {
            match write_line(&mut out, &line).await {
                Err(e) if !failing => {
                    failing = true;
                    warn!(error = %e, "cannot write the flow log; lines are still served on the socket (said once until a write succeeds)");
                }
                Err(_) => {}
                Ok(()) => failing = false,
            }
            if let Ok(mut r) = recent.lock() {
                if r.len() == RECENT {
                    r.pop_front();
                }
                r.push_back(line.clone());
            }
            let _ = tx.send(line); // no follower: nothing to do
        }
        serving.abort();
    })
}

async fn write_line(out: &mut (dyn AsyncWrite + Unpin + Send), line: &str) -> std::io::Result<()> {
    out.write_all(line.as_bytes()).await?;
    out.write_all(b"\n").await?;
    out.flush().await
}

/// Removes the socket a previous run left in `state_dir` (only a socket: anything else of that name
/// is refused); true when there was one.
pub fn remove_socket(state_dir: &Path) -> Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    let path = state_dir.join(SOCKET);
    let shown = || path.display().to_string();
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return Ok(false);
    };
    if !meta.file_type().is_socket() {
        return Err(Error::io(
            "flow log socket",
            shown(),
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; remove it",
            ),
        ));
    }
    std::fs::remove_file(&path).map_err(|e| Error::io("remove flow log socket", shown(), e))?;
    Ok(true)
}

/// Binds the socket in `state_dir`, replacing a stale one of a previous run, readable by its owner
/// only.
fn listen(state_dir: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    remove_socket(state_dir)?;
    let path = state_dir.join(SOCKET);
    let shown = || path.display().to_string();
    let l = UnixListener::bind(&path).map_err(|e| Error::io("bind flow log socket", shown(), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("restrict flow log socket", shown(), e))?;
    Ok(l)
}

async fn serve(listener: UnixListener, recent: Recent, tx: broadcast::Sender<Arc<str>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Subscribed before the recent lines are copied: a line written in between is sent twice
        // at worst, never missed.
        let rx = tx.subscribe();
        tokio::spawn(client(stream, recent.clone(), rx));
    }
}

async fn client(stream: UnixStream, recent: Recent, mut rx: broadcast::Receiver<Arc<str>>) {
    let (read, mut write) = stream.into_split();
    let mut request = String::new();
    let mut reader = BufReader::new(read.take(64));
    let asked = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut request)).await;
    let follow = match (asked, request.trim()) {
        (Ok(Ok(_)), "follow") => true,
        (Ok(Ok(_)), "recent") => false,
        _ => {
            let _ = write
                .write_all(b"{\"error\": \"send `recent` or `follow` and a newline\"}\n")
                .await;
            return;
        }
    };
    let kept: Vec<Arc<str>> = match recent.lock() {
        Ok(r) => r.iter().cloned().collect(),
        Err(_) => Vec::new(),
    };
    for line in kept {
        if write_line(&mut write, &line).await.is_err() {
            return;
        }
    }
    if !follow {
        return;
    }
    loop {
        let line: Arc<str> = match rx.recv().await {
            Ok(l) => l,
            Err(broadcast::error::RecvError::Lagged(n)) => format!("{{\"missed\": {n}}}").into(),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if write_line(&mut write, &line).await.is_err() {
            return;
        }
    }
}

/// `palisade-agent flows`: the node agent's recent lines (and with `follow`, every new one) to
/// stdout.
pub async fn read(state_dir: &Path, follow: bool) -> Result<()> {
    let path = state_dir.join(SOCKET);
    let shown = path.display().to_string();
    let mut stream = UnixStream::connect(&path).await.map_err(|e| {
        Error::io(
            "connect to the agent's flow log (is it running with --flow-log on this node?)",
            shown.clone(),
            e,
        )
    })?;
    let ask: &[u8] = if follow { b"follow\n" } else { b"recent\n" };
    stream
        .write_all(ask)
        .await
        .map_err(|e| Error::io("ask the flow log", shown.clone(), e))?;
    let mut out = tokio::io::stdout();
    // A reader of our stdout that went away (`| head`) ends the command, no error.
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::BrokenPipe;
    match tokio::io::copy(&mut stream, &mut out).await {
        Err(e) if gone(&e) => return Ok(()),
        r => r.map_err(|e| Error::io("read the flow log", shown, e))?,
    };
    match out.flush().await {
        Err(e) if !gone(&e) => Err(Error::io("write stdout", "-", e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_socket_removes_only_a_socket() {
        let dir = palisade_testkit::temp::temp_dir("pa-flowsock");
        assert!(!remove_socket(dir.path()).unwrap(), "nothing there");
        let _l = std::os::unix::net::UnixListener::bind(dir.path().join(SOCKET)).unwrap();
        assert!(remove_socket(dir.path()).unwrap());
        assert!(!dir.path().join(SOCKET).exists());
        std::fs::write(dir.path().join(SOCKET), "not a socket").unwrap();
        assert!(
            remove_socket(dir.path()).is_err(),
            "a regular file is left alone"
        );
        assert!(dir.path().join(SOCKET).exists());
    }
}
