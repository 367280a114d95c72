//! Attacks on the mesh, end to end: each one must fail, and the test says
//! how it was stopped. (Issue 18's suite; more attacks join it.)

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// A pod's configuration names the node's own network namespace (the
/// agent's) or the host's (`/proc/1/ns/net`) as its netns: enrolling it
/// would put the mesh's listeners and redirection on the node itself. The
/// agent refuses, says why, and keeps refusing.
#[test]
fn a_pod_cannot_name_the_nodes_own_network_namespace() {
    let Some(bed) = bed() else { return };
    let mut n1 = agent(&bed, "n1");
    let node_netns = format!("/run/netns/{}", bed.node("n1").netns);
    for (name, path) in [("agents-netns", node_netns.as_str()), ("host-netns", "/proc/1/ns/net")] {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  annotations:\n    ambit.dev/netns: {path}\nspec:\n  nodeName: n1\n  serviceAccountName: {name}\nstatus:\n  podIPs:\n  - ip: 10.100.0.1\n"
        );
        bed.write_config(&format!("pod-shop-{name}.yaml"), &yaml).unwrap();
        let refused = n1
            .wait_for(&format!("{name} refused"), Duration::from_secs(10), |l| {
                l["message"] == "cannot enrol pod; will retry" && l["pod"] == format!("shop/{name}")
            })
            .unwrap();
        let error = refused["error"].as_str().unwrap();
        // Init's netns: where the kernel lets the agent open it at all (it
        // may not: this machine answers EACCES), the agent recognises it.
        let kernel_refused = name == "host-netns" && error.contains("Permission denied");
        assert!(error.contains("the node's own network namespace") || kernel_refused, "{name}: {error}");
    }
    std::thread::sleep(Duration::from_secs(3));
    let dump: Value = serde_json::from_str(&bed.admin_get("n1", "/config_dump").unwrap().1).unwrap();
    assert_eq!(dump["enrolled"], serde_json::json!([]), "nothing enrolled: {}", dump["enrolled"]);
}
