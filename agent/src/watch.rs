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

/// After a first change arrived (`rx.recv()`, which is cancel-safe and so
/// fits a `select!`), waits for the rest of its burst to settle. Await it
/// outside any `select!`: a dropped wait would lose the burst's events.
/// Returns false when the watcher is gone.
pub async fn settle(rx: &mut mpsc::UnboundedReceiver<()>) -> bool {
    loop {
        match tokio::time::timeout(SETTLE, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}
