//! Changes in the configuration directory, and when a burst of them settles.

use std::{path::Path, time::Duration};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Editors and `kubectl`-style tools write a file in several steps; wait for
/// the burst to settle before reloading.
pub const SETTLE: Duration = Duration::from_millis(150);
/// A burst that never settles (something writes to the directory all the
/// time) is cut here, so reloads, and the agent's signals, still get a turn.
pub const SETTLE_AT_MOST: Duration = Duration::from_secs(2);

/// Keep the returned watcher alive for as long as changes should arrive.
pub fn changes(dir: &Path) -> notify::Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
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
    let cut = tokio::time::Instant::now() + SETTLE_AT_MOST;
    loop {
        let quiet = (tokio::time::Instant::now() + SETTLE).min(cut);
        match tokio::time::timeout_at(quiet, rx.recv()).await {
            Ok(Some(())) if quiet < cut => continue,
            Ok(Some(())) => return true,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_settles_and_an_endless_one_is_cut() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let started = tokio::time::Instant::now();
        tx.send(()).unwrap();
        assert!(settle(&mut rx).await);
        assert_eq!(started.elapsed(), SETTLE, "one quiet period after the last event");

        // An event every 100 ms, for ever.
        let writer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
        let started = tokio::time::Instant::now();
        assert!(settle(&mut rx).await);
        assert!(started.elapsed() <= SETTLE_AT_MOST + SETTLE, "cut after {:?}", started.elapsed());
        writer.abort();
    }
}
