//! Watches the configuration directory and signals when anything in it changes.

use std::{path::Path, time::Duration};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Editors and `kubectl`-style tools write a file in several steps; wait for
/// the burst to settle before reloading.
pub const SETTLE: Duration = Duration::from_millis(150);

/// Keep the returned watcher alive for as long as changes should arrive.
pub fn watch_dir(dir: &Path) -> notify::Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((watcher, rx))
}

/// Waits for the next change, then for the burst it belongs to to settle.
/// Returns false when the watcher is gone.
pub async fn next_change(rx: &mut mpsc::UnboundedReceiver<()>) -> bool {
    if rx.recv().await.is_none() {
        return false;
    }
    loop {
        match tokio::time::timeout(SETTLE, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}
