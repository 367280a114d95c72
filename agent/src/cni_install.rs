//! Installing the `ambit-cni` plugin on a node (`ambit-agent cni install`,
//! the DaemonSet's installer container): the binary goes into the host's
//! CNI bin directory, and the plugin is chained last in the primary
//! conflist (the first one in the conf directory, as runtimes choose it).
//!
//! The installer keeps the entry there while it runs: a primary plugin that
//! rewrites its conflist (on its own restart, say) would otherwise drop it,
//! and pods would start uncaptured. On SIGTERM it removes both only when
//! the DaemonSet itself is being deleted; during a rolling update the next
//! installer takes over an entry that never went away.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// The plugin's `type`, and its binary's name.
pub const PLUGIN: &str = "ambit-cni";

/// Copies `binary` into `bin_dir` and chains the plugin into the primary
/// conflist of `conf_dir`, pointing at `socket`. Idempotent; returns the
/// conflist it edited.
pub fn install(binary: &Path, bin_dir: &Path, conf_dir: &Path, socket: &Path) -> anyhow::Result<PathBuf> {
    let target = bin_dir.join(PLUGIN);
    let current = std::fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    if std::fs::read(&target).ok().as_deref() != Some(current.as_slice()) {
        // A runtime may be executing the old binary: replace, never overwrite in place.
        write_replacing(&target, &current, 0o755)?;
    }
    let conflist = primary_conflist(conf_dir)?;
    let text = std::fs::read_to_string(&conflist).with_context(|| format!("read {}", conflist.display()))?;
    let mut conf: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", conflist.display()))?;
    if chain(&mut conf, socket).with_context(|| conflist.display().to_string())? {
        write_replacing(&conflist, serde_json::to_string_pretty(&conf)?.as_bytes(), 0o644)?;
        tracing::info!(conflist = %conflist.display(), "chained ambit-cni into the primary CNI configuration");
    }
    Ok(conflist)
}

/// Removes the plugin from every conflist of `conf_dir` and its binary
/// from `bin_dir`.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> anyhow::Result<()> {
    for path in conflists(conf_dir)? {
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let Ok(mut conf) = serde_json::from_str::<Value>(&text) else { continue };
        if unchain(&mut conf) {
            write_replacing(&path, serde_json::to_string_pretty(&conf)?.as_bytes(), 0o644)?;
            tracing::info!(conflist = %path.display(), "removed ambit-cni from the CNI configuration");
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context("remove the plugin binary"),
        _ => Ok(()),
    }
}

/// Appends the plugin to `conf`'s chain, or points it at `socket`; says
/// whether `conf` changed.
fn chain(conf: &mut Value, socket: &Path) -> anyhow::Result<bool> {
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
        bail!("not a conflist (no `plugins` array); ambit-cni chains only into .conflist files");
    };
    let entry = json!({"type": PLUGIN, "agentSocket": socket});
    let ours: Vec<usize> = plugins.iter().enumerate().filter(|(_, p)| p["type"] == PLUGIN).map(|(i, _)| i).collect();
    if ours == [plugins.len() - 1] && plugins[ours[0]] == entry {
        return Ok(false);
    }
    // Last in the chain, once: it needs the primary plugin's addresses.
    plugins.retain(|p| p["type"] != PLUGIN);
    plugins.push(entry);
    Ok(true)
}

/// Removes the plugin from `conf`'s chain; says whether it was there.
fn unchain(conf: &mut Value) -> bool {
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else { return false };
    let before = plugins.len();
    plugins.retain(|p| p["type"] != PLUGIN);
    plugins.len() != before
}

/// The configuration files of `conf_dir`, in the order runtimes read them.
fn conflists(conf_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .with_context(|| format!("--cni-conf-dir {}: cannot list it", conf_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| matches!(path.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
        .collect();
    files.sort();
    Ok(files)
}

fn primary_conflist(conf_dir: &Path) -> anyhow::Result<PathBuf> {
    let primary = conflists(conf_dir)?.into_iter().next().with_context(|| {
        format!("--cni-conf-dir {}: no CNI configuration yet; is the primary CNI plugin installed?", conf_dir.display())
    })?;
    if primary.extension().and_then(|e| e.to_str()) != Some("conflist") {
        bail!(
            "{}: the primary CNI configuration is a single plugin; ambit-cni chains only into a .conflist",
            primary.display()
        );
    }
    Ok(primary)
}

/// Writes `path` through a temporary file and a rename, so that a runtime
/// reading it never sees half of it.
fn write_replacing(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_file_name(format!(".{}.ambit-tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    std::fs::write(&tmp, contents).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET: &str = "/var/run/ambit/cni.sock";

    fn conflist(plugins: Value) -> Value {
        json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": plugins})
    }

    #[test]
    fn the_plugin_is_chained_last_once() {
        let ours = json!({"type": PLUGIN, "agentSocket": SOCKET});
        let primary = json!({"type": "calico"});
        let portmap = json!({"type": "portmap"});
        let cases = [
            ("appended", vec![primary.clone(), portmap.clone()], true),
            ("already last", vec![primary.clone(), ours.clone()], false),
            ("moved to the end", vec![ours.clone(), primary.clone()], true),
            ("socket updated", vec![primary.clone(), json!({"type": PLUGIN, "agentSocket": "/old"})], true),
            ("twice", vec![primary.clone(), ours.clone(), ours.clone()], true),
        ];
        for (case, plugins, changes) in cases {
            let mut conf = conflist(json!(plugins));
            assert_eq!(chain(&mut conf, Path::new(SOCKET)).unwrap(), changes, "{case}");
            let chained = conf["plugins"].as_array().unwrap();
            assert_eq!(chained.last(), Some(&ours), "{case}");
            assert_eq!(chained.iter().filter(|p| p["type"] == PLUGIN).count(), 1, "{case}");
            assert!(unchain(&mut conf), "{case}");
            assert!(conf["plugins"].as_array().unwrap().iter().all(|p| p["type"] != PLUGIN), "{case}");
        }
        let mut single = json!({"cniVersion": "1.0.0", "type": "bridge"});
        assert!(chain(&mut single, Path::new(SOCKET)).unwrap_err().to_string().contains("not a conflist"));
    }

    #[test]
    fn install_and_uninstall_leave_the_host_as_it_was() {
        let host = tempfile::tempdir().unwrap();
        let (bin, conf) = (host.path().join("bin"), host.path().join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let original = serde_json::to_string_pretty(&conflist(json!([{"type": "bridge"}]))).unwrap();
        std::fs::write(conf.join("10-bridge.conflist"), &original).unwrap();
        std::fs::write(conf.join("99-other.conflist"), "{}").unwrap();
        let plugin = host.path().join("plugin");
        std::fs::write(&plugin, b"#!/bin/sh\n").unwrap();

        let edited = install(&plugin, &bin, &conf, Path::new(SOCKET)).unwrap();
        assert_eq!(edited, conf.join("10-bridge.conflist"), "the first conflist is the primary one");
        assert!(bin.join(PLUGIN).is_file());
        let first = std::fs::read_to_string(&edited).unwrap();
        install(&plugin, &bin, &conf, Path::new(SOCKET)).unwrap();
        assert_eq!(std::fs::read_to_string(&edited).unwrap(), first, "installing again changes nothing");

        uninstall(&bin, &conf).unwrap();
        let restored: Value = serde_json::from_str(&std::fs::read_to_string(&edited).unwrap()).unwrap();
        assert_eq!(restored, serde_json::from_str::<Value>(&original).unwrap());
        assert!(!bin.join(PLUGIN).exists());
        uninstall(&bin, &conf).unwrap();

        let empty = tempfile::tempdir().unwrap();
        let error = install(&plugin, &bin, empty.path(), Path::new(SOCKET)).unwrap_err();
        assert!(format!("{error:#}").contains("is the primary CNI plugin installed?"), "{error:#}");
    }
}
