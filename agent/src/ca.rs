//! `ambit-agent ca serve` in standalone mode: the CA learns which pods run
//! on which node from the configuration directory the agents read.

use std::{path::PathBuf, sync::Mutex};

use ambit_config::{ConfigDir, log_errors};
use ambit_identity::{Identity, ca_server::PodPlacement};

/// The pods of the configuration directory, read again for every request.
/// A file that fails to parse keeps its last good objects, as on the
/// agents, so a typo does not make the CA refuse the renewals of its pods.
pub struct DirectoryPlacement(Mutex<ConfigDir>);

impl DirectoryPlacement {
    pub fn new(dir: PathBuf) -> Self {
        let mut config = ConfigDir::new(dir);
        log_errors(&config.reload().1);
        Self(Mutex::new(config))
    }
}

impl PodPlacement for DirectoryPlacement {
    fn runs_on(&self, node: &str, identity: &Identity) -> bool {
        let (snapshot, errors) = self.0.lock().expect("config lock").reload();
        log_errors(&errors);
        // Pods of another mesh (annotated with their trust domain) hold no
        // identity of this CA's, whatever their node is called.
        snapshot.pods.values().any(|p| {
            p.trust_domain.is_none()
                && p.node == node
                && p.namespace == identity.namespace
                && p.service_account == identity.service_account
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "kind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {nodeName: n1, serviceAccountName: web}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n";

    #[test]
    fn a_broken_edit_keeps_the_pods_of_the_last_good_file() {
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods.yaml");
        std::fs::write(&pods, POD).unwrap();
        let web = Identity::new("cluster.local", "shop", "web");
        let placement = DirectoryPlacement::new(dir.path().into());
        assert!(placement.runs_on("n1", &web));
        assert!(!placement.runs_on("n2", &web), "n2 runs no pod as shop/web");

        std::fs::write(&pods, POD.replace("10.0.0.1", "{{{")).unwrap();
        assert!(placement.runs_on("n1", &web), "the last good pods stand");
        std::fs::remove_file(&pods).unwrap();
        assert!(!placement.runs_on("n1", &web), "a deleted file takes its pods with it");

        let partner = POD.replace(
            "metadata: {name: web, namespace: shop}",
            "metadata: {name: web, namespace: shop, annotations: {ambit.dev/trust-domain: partner.example}}",
        );
        std::fs::write(&pods, partner).unwrap();
        assert!(!placement.runs_on("n1", &web), "another mesh's pod authorizes no local identity");
    }
}
