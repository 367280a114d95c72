//! The agent's end of the `ambit-cni` plugin's socket (Kubernetes mode).
//!
//! Each connection carries one [`Request`] and its [`Reply`], one JSON line
//! each. The requests go to the agent's main loop, which owns the pods'
//! networks and enrolment, and which answers once it knows (`kubernetes`).

use std::path::{Path, PathBuf};

use ambit_cni_api::{ANSWER_TIMEOUT_SECS, CAPTURE_NAMESPACES_FILE, CaptureNamespaces, Reply, Request};
use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

/// One request from the plugin and the way back to it.
pub struct CniCall {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// Listens on `path`, replacing the socket a previous agent left.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().with_context(|| format!("--cni-socket {}: no directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("--cni-socket: create {}", dir.display()))?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("--cni-socket: remove the old {}", path.display())),
    }
    UnixListener::bind(path).with_context(|| format!("--cni-socket {}: cannot listen", path.display()))
}

/// Accepts the plugin's connections and passes each request to `calls`.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<CniCall>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let calls = calls.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, calls).await {
                        tracing::warn!(error = %format!("{error:#}"), "CNI plugin request");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a CNI plugin connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, calls: mpsc::Sender<CniCall>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let deadline = std::time::Duration::from_secs(ANSWER_TIMEOUT_SECS);
    tokio::time::timeout(deadline, BufReader::new(read).read_line(&mut line))
        .await
        .context("the plugin sent no request")??;
    let request: Request = serde_json::from_str(&line).with_context(|| format!("unreadable request {line:?}"))?;
    let (reply, answered) = oneshot::channel();
    calls.send(CniCall { request, reply }).await.context("the agent is stopping")?;
    let reply = answered.await.context("the agent dropped the request")?;
    let mut text = serde_json::to_string(&reply)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

/// Writes the namespaces whose pods are captured next to the socket, for
/// the plugin to decide by while no agent answers. Written to a temporary
/// file and renamed, so the plugin never reads half of it.
pub fn write_capture_namespaces(socket: &Path, namespaces: Vec<String>) -> std::io::Result<()> {
    let path: PathBuf = socket.with_file_name(CAPTURE_NAMESPACES_FILE);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&CaptureNamespaces { namespaces })?)?;
    std::fs::rename(&tmp, &path)
}
