//! Configuration sources: where the objects of the model come from. Each
//! source produces [`Update`]s, a whole [`Snapshot`] at a time, through one
//! stream type, [`Updates`], so the agent and the waypoint apply every
//! source the same way.
//!
//! - [`ConfigDir`] / [`watch_dir`]: the standalone source, a directory of
//!   YAML files in the Kubernetes resources' schemas, watched for changes.
//!   This is the embedded default and the test bed's.
//!
//! Loading is per document and keeps the last good version: when a document
//! fails to parse or validate, every error is reported with the file, the
//! object and the field, the file's other documents load, and the broken
//! object's previous version stays in force. A bad edit never drops pods
//! from the mesh. A broken AuthorizationPolicy with no previous version
//! fails closed: its stand-in denies everything to the workloads it would
//! have selected (`ambit_model::policy_parse::fail_closed`).
#![forbid(unsafe_code)]

pub mod watch;

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
};

use ambit_model::{ConfigError, Object, Snapshot, parse_documents, parse_file};
use tokio::sync::mpsc;

/// What a source reports: every object in force, and what it could not
/// apply (those objects keep their last good version).
#[derive(Debug)]
pub struct Update {
    pub snapshot: Snapshot,
    pub errors: Vec<ConfigError>,
}

/// A running source: one [`Update`] when it starts, then one per change.
pub struct Updates {
    rx: mpsc::Receiver<Update>,
    task: tokio::task::JoinHandle<()>,
}

impl Updates {
    /// Runs a source: `source` is given the sender for its updates, and is
    /// stopped when the returned `Updates` is dropped.
    pub fn spawn<F, Fut>(source: F) -> Self
    where
        F: FnOnce(mpsc::Sender<Update>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Capacity 1: a source produces its next update only once the
        // reader has taken the one before.
        let (tx, rx) = mpsc::channel(1);
        Self { rx, task: tokio::spawn(source(tx)) }
    }

    /// The next update; `None` once the source has stopped. Cancel-safe,
    /// so it fits a `select!`.
    pub async fn next(&mut self) -> Option<Update> {
        self.rx.recv().await
    }
}

impl Drop for Updates {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the standalone source: `config` read now, and again after each
/// burst of changes in its directory settles.
pub fn watch_dir(mut config: ConfigDir) -> notify::Result<Updates> {
    let (watcher, mut changes) = watch::changes(config.path())?;
    Ok(Updates::spawn(move |tx| async move {
        let _watcher = watcher;
        loop {
            let (snapshot, errors) = config.reload();
            if tx.send(Update { snapshot, errors }).await.is_err() {
                return;
            }
            if changes.recv().await.is_none() || !watch::settle(&mut changes).await {
                tracing::error!(dir = %config.path().display(), "the configuration watcher stopped");
                return;
            }
        }
    }))
}

/// Logs what a reload could not apply; those files keep their last good objects.
pub fn log_errors(errors: &[ConfigError]) {
    for error in errors {
        tracing::error!(error = %error, "configuration error; the last good version of this file stays in force");
    }
}

/// The configuration directory and the last good objects of each file in it.
pub struct ConfigDir {
    dir: PathBuf,
    /// Where the text of each file's last good version is kept, if anywhere
    /// ([`ConfigDir::keeping_last_good_in`]).
    kept: Option<PathBuf>,
    /// Each file's last version that parsed whole.
    last_good: BTreeMap<PathBuf, Vec<Object>>,
    /// Each file's objects in force: its last good version, or, while it is
    /// broken, its good documents over its last good objects.
    in_force: BTreeMap<PathBuf, Vec<Object>>,
}

impl ConfigDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), kept: None, last_good: BTreeMap::new(), in_force: BTreeMap::new() }
    }

    /// Keeps the text of each file's last good version in `kept`, and falls
    /// back to it for a file that fails to parse when this process has no
    /// good version of its own (after a restart): a broken file's last good
    /// version stands across restarts too, not only across edits.
    pub fn keeping_last_good_in(mut self, kept: PathBuf) -> Self {
        self.kept = Some(kept);
        self
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory again. Files that fail keep their last good
    /// objects; the errors come back alongside the snapshot.
    pub fn reload(&mut self) -> (Snapshot, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let files = match yaml_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                // Unreadable directory: keep everything as it was.
                errors.push(ConfigError::Read { file: self.dir.clone(), reason: e.to_string() });
                return (self.snapshot(&mut errors), errors);
            }
        };
        self.last_good.retain(|path, _| files.contains(path));
        self.in_force.retain(|path, _| files.contains(path));
        self.forget_kept(&files);
        for file in files {
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    // Unreadable now: what was in force stays.
                    errors.push(ConfigError::Read { file: file.clone(), reason: e.to_string() });
                    continue;
                }
            };
            let (objects, file_errors) = parse_documents(&file, &text);
            if file_errors.is_empty() {
                self.keep(&file, &text);
                self.last_good.insert(file.clone(), objects.clone());
                self.in_force.insert(file, objects);
                continue;
            }
            errors.extend(file_errors);
            if !self.last_good.contains_key(&file)
                && let Some(objects) = self.kept_version(&file)
            {
                self.last_good.insert(file.clone(), objects);
            }
            let previous = self.last_good.get(&file).map(Vec::as_slice).unwrap_or_default();
            self.in_force.insert(file, over_last_good(objects, previous));
        }
        (self.snapshot(&mut errors), errors)
    }

    fn kept_path(&self, file: &Path) -> Option<PathBuf> {
        Some(self.kept.as_ref()?.join(file.file_name()?))
    }

    /// Saves `text` as the last good version of `file` (write, then rename,
    /// so a crash leaves the previous version whole).
    fn keep(&self, file: &Path, text: &str) {
        let Some(path) = self.kept_path(file) else { return };
        if std::fs::read_to_string(&path).is_ok_and(|kept| kept == text) {
            return;
        }
        let temporary = path.with_extension("partial");
        let saved = std::fs::create_dir_all(path.parent().expect("a file in a directory"))
            .and_then(|()| std::fs::write(&temporary, text))
            .and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(error) = saved {
            tracing::warn!(file = %file.display(), kept = %path.display(), %error, "cannot keep this file's last good version; it will not outlive a restart");
        }
    }

    /// The objects of `file`'s kept last good version, if there is one.
    fn kept_version(&self, file: &Path) -> Option<Vec<Object>> {
        let path = self.kept_path(file)?;
        let objects = parse_file(file, &std::fs::read_to_string(&path).ok()?).ok()?;
        tracing::warn!(file = %file.display(), kept = %path.display(), "using the last good version of this file, kept from before a restart");
        Some(objects)
    }

    /// Deletes the kept versions of files that are gone from the directory.
    fn forget_kept(&self, files: &[PathBuf]) {
        let Some(entries) = self.kept.as_ref().and_then(|kept| std::fs::read_dir(kept).ok()) else { return };
        let names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
        for entry in entries.flatten() {
            if !names.contains(&entry.file_name().as_os_str()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn snapshot(&self, errors: &mut Vec<ConfigError>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut first_seen: BTreeMap<(&'static str, String), &Path> = BTreeMap::new();
        for (file, objects) in &self.in_force {
            for object in objects {
                let key = object.key();
                if let Some(first) = first_seen.get(&key) {
                    errors.push(ConfigError::Duplicate {
                        file: file.clone(),
                        object: format!("{} {}", key.0, key.1),
                        first: first.to_path_buf(),
                    });
                    continue;
                }
                first_seen.insert(key, file);
                snapshot.insert(object.clone());
            }
        }
        snapshot
    }
}

/// A broken file's objects: its good documents, and for every other object
/// its last good version. A policy's fail-closed stand-in gives way to the
/// policy's last good version when there is one.
fn over_last_good(parsed: Vec<Object>, last_good: &[Object]) -> Vec<Object> {
    let mut objects: Vec<Object> = parsed
        .into_iter()
        .map(|object| match &object {
            Object::AuthorizationPolicy(policy) if policy.broken.is_some() => {
                last_good.iter().find(|good| good.key() == object.key()).cloned().unwrap_or(object)
            }
            _ => object,
        })
        .collect();
    let missing: Vec<Object> =
        last_good.iter().filter(|good| objects.iter().all(|o| o.key() != good.key())).cloned().collect();
    objects.extend(missing);
    objects
}

fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        // Editors and atomic writers leave hidden temporary files; skip them.
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if is_yaml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop}
spec: {nodeName: node1}
status:
  podIPs: [{ip: 10.244.1.2}]
"#;

    #[test]
    fn bad_edit_keeps_last_good_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pods.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut config = ConfigDir::new(dir.path());
        let (good, errors) = config.reload();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(good.pods.len(), 1);

        std::fs::write(&file, GOOD.replace("10.244.1.2", "not-an-ip")).unwrap();
        let (after, errors) = config.reload();
        assert_eq!(errors.len(), 1);
        assert_eq!(after, good, "the last good objects stay in force");

        std::fs::remove_file(&file).unwrap();
        let (empty, errors) = config.reload();
        assert!(errors.is_empty());
        assert!(empty.pods.is_empty(), "a deleted file takes its objects with it");
    }

    #[test]
    fn the_last_good_version_outlives_a_restart_when_kept() {
        let (dir, kept) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let file = dir.path().join("pods.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let (good, _) = ConfigDir::new(dir.path()).keeping_last_good_in(kept.path().into()).reload();
        std::fs::write(&file, GOOD.replace("10.244.1.2", "not-an-ip")).unwrap();

        // A restart: a new ConfigDir, the broken file on disk.
        let (restarted, errors) = ConfigDir::new(dir.path()).keeping_last_good_in(kept.path().into()).reload();
        assert_eq!(errors.len(), 1, "the broken file is still reported");
        assert_eq!(restarted, good, "its kept last good version stands");
        let (without, _) = ConfigDir::new(dir.path()).reload();
        assert!(without.pods.is_empty(), "nothing kept, nothing to stand in");

        std::fs::remove_file(&file).unwrap();
        let (gone, _) = ConfigDir::new(dir.path()).keeping_last_good_in(kept.path().into()).reload();
        assert!(gone.pods.is_empty());
        assert_eq!(std::fs::read_dir(kept.path()).unwrap().count(), 0, "a deleted file's kept version goes too");
    }

    /// A policy file with a broken document: the other documents load, and
    /// the broken AuthorizationPolicy denies everything to what it selects,
    /// until an earlier good version of it exists to stand in.
    #[test]
    fn a_broken_policy_fails_closed_and_its_neighbours_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policies.yaml");
        let policy = |name: &str, principal: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: db}}}}\n  rules: [{{from: [{{source: {{principals: [{principal}]}}}}]}}]\n"
            )
        };
        let typo = policy("only-api", "cluster.local/ns/shop/sa/api").replace("principals", "principal");
        std::fs::write(&file, format!("{typo}---\n{}", policy("also-web", "cluster.local/ns/shop/sa/web"))).unwrap();
        let mut config = ConfigDir::new(dir.path());
        let (snapshot, errors) = config.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let by_name = |name: &str| snapshot.authorization_policies.iter().find(|p| p.name == name).cloned().unwrap();
        let stand_in = by_name("only-api");
        assert_eq!(stand_in.action, ambit_model::Action::Deny);
        assert_eq!(stand_in.scope, ambit_model::Scope::Selector([("app".into(), "db".into())].into()));
        assert!(stand_in.broken.as_deref().unwrap().contains("principal"), "{stand_in:?}");
        assert!(by_name("also-web").broken.is_none(), "the other document loads");

        // Fixed, then broken again: the fixed version stands in, not a denial.
        std::fs::write(&file, policy("only-api", "cluster.local/ns/shop/sa/api")).unwrap();
        let (fixed, errors) = config.reload();
        assert!(errors.is_empty());
        std::fs::write(&file, &typo).unwrap();
        let (again, errors) = config.reload();
        assert_eq!(errors.len(), 1);
        assert_eq!(again.authorization_policies, fixed.authorization_policies, "the last good version stands");
    }

    #[test]
    fn duplicates_keep_the_first_and_report_the_second() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yml"), GOOD.replace("node1", "node2")).unwrap();
        std::fs::write(dir.path().join(".a.yaml.swp"), "garbage: [").unwrap();
        let (snapshot, errors) = ConfigDir::new(dir.path()).reload();
        assert_eq!(snapshot.pods["shop/cart"].node, "node1");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(matches!(&errors[0], ConfigError::Duplicate { object, .. } if object == "Namespace shop"));
    }
}
