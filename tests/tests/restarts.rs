//! The agent's life cycle (issue 19). Capture is pinned, so it outlives the
//! agent: with no agent running, enrolled pods' connections fail and
//! nothing flows in plaintext. The next agent takes the pinned capture over
//! with no duplicates; an upgrade hands the listeners over and loses no
//! established connection; `ambit-agent uninstall` removes it all.

mod common;

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt,
    process::{Child, Command, Stdio},
    time::Duration,
};

use ambit_testbed::{Agent, Bed, wait_until};
use serde_json::Value;

use common::*;

/// Kernel object ids held by one agent process.
#[derive(Debug, Default)]
struct BpfObjects {
    programs: BTreeSet<u64>,
    maps: BTreeSet<u64>,
}

fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool").arg("-j").args(args).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Reads the BPF objects a process holds from /proc/<pid>/fdinfo: program
/// and link fds carry `prog_id`, map fds `map_id`.
fn objects_of(pid: u32) -> BpfObjects {
    let mut objects = BpfObjects::default();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in info.lines() {
            let id = |prefix: &str| line.strip_prefix(prefix).and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(id) = id("prog_id:") {
                objects.programs.insert(id);
            } else if let Some(id) = id("map_id:") {
                objects.maps.insert(id);
            }
        }
    }
    objects
}

fn exists(kind: &str, id: u64) -> bool {
    Command::new("bpftool").args([kind, "show", "id", &id.to_string()]).output().unwrap().status.success()
}

/// The BPF links of `node`: on its cgroup (`attach_type`) and in its pods'
/// netns (`sk_lookup`), each with the id of its program, sorted.
fn links_of(bed: &Bed, node: &str) -> Vec<(String, u64)> {
    let cgroup = std::fs::metadata(&bed.node(node).cgroup).unwrap().ino();
    let netns: BTreeSet<u64> = bed
        .pods()
        .iter()
        .filter(|p| p.node == node)
        .filter_map(|p| std::fs::metadata(p.netns_path()).ok().map(|m| m.ino()))
        .collect();
    let mut links: Vec<(String, u64)> = bpftool(&["link", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|l| {
            l["cgroup_id"].as_u64() == Some(cgroup) || l["netns_ino"].as_u64().is_some_and(|ino| netns.contains(&ino))
        })
        .map(|l| (l["attach_type"].as_str().unwrap_or_default().to_string(), l["prog_id"].as_u64().unwrap_or(0)))
        .collect();
    links.sort();
    links
}

fn attach_types(links: &[(String, u64)]) -> Vec<&str> {
    links.iter().map(|(t, _)| t.as_str()).collect()
}

fn programs(links: &[(String, u64)]) -> BTreeSet<u64> {
    links.iter().map(|(_, id)| *id).collect()
}

const ONE_POD: [&str; 4] = ["cgroup_inet4_connect", "cgroup_inet6_connect", "cgroup_sock_ops", "sk_lookup"];

fn message_seen(agent: &Agent, message: &str) -> bool {
    agent.lines().iter().any(|l| l["message"] == message)
}

/// SIGKILL mid-transfer. The transfer fails (its connection was the dead
/// agent's), the capture stays attached and no new connection gets through
/// until the next agent is ready; that one adopts the pinned maps, swaps
/// its programs in on the same links (no duplicates, the old programs
/// freed), and the pod works again. A graceful stop leaves the capture too;
/// `ambit-agent uninstall` removes it and the pod talks directly.
#[test]
fn an_agent_killed_mid_transfer_fails_closed_until_the_next_one_takes_over() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/app"), ("n2", "shop/web"), ("n2", "legacy/web")]).unwrap();
    let (root, _) = web_root(&bed, BIG_FILE_BYTES);
    bed.http_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    bed.http_server("legacy/web", HTTP_PORT, &root, &bed.scratch().join("legacy.log")).unwrap();
    let url = format!("http://{}:{HTTP_PORT}/index.html", bed.pod("shop/web").ip);
    let plain_url = format!("http://{}:{HTTP_PORT}/index.html", bed.pod("legacy/web").ip);

    let mut first = agent(&bed, "n1");
    let _n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    curl(&bed, "shop/app", &url).unwrap();
    let before = objects_of(first.pid());
    let links = links_of(&bed, "n1");
    assert_eq!(attach_types(&links), ONE_POD);
    // connect4, connect6, sock_ops and sk_lookup, and the same-node splice.
    assert_eq!(before.programs.len(), 5, "{before:?}");
    assert!(programs(&links).is_subset(&before.programs));

    // A download at 4 MB/s, killed under it.
    let out = bed.scratch().join("big.out");
    let mut download = bed
        .pod("shop/app")
        .command("curl")
        .args(["-sS", "--limit-rate", "4M", "-o"])
        .arg(&out)
        .arg(format!("http://{}:{HTTP_PORT}/big.bin", bed.pod("shop/web").ip))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the download under way", || {
        Ok(std::fs::metadata(&out).is_ok_and(|m| m.len() > 1 << 20))
    })
    .unwrap();
    first.kill().unwrap();
    let status = wait_exit(&mut download, Duration::from_secs(10));
    assert!(!status.success(), "the transfer carried by the killed agent ends with an error");

    // No agent: the capture stays, and it fails closed.
    assert_eq!(links_of(&bed, "n1"), links, "the killed agent's links stay attached");
    assert!(curl(&bed, "shop/app", &url).is_err(), "no connection while no agent runs");
    assert!(curl(&bed, "shop/app", &plain_url).is_err(), "not even to a plain pod");

    let mut second = agent(&bed, "n1");
    second.wait_pod_event("pod enrolled", "shop/app", 0).unwrap();
    curl(&bed, "shop/app", &url).unwrap();
    second.wait_connections(1, |c| c.src_workload == "shop/app" && c.error.is_none()).unwrap();
    let after = objects_of(second.pid());
    // The seven pinned maps are adopted, not made again; the six of the
    // same-node splice are each agent's own (they hold its sockets).
    assert_eq!(after.maps.intersection(&before.maps).count(), 7, "{before:?} {after:?}");
    assert_eq!((before.maps.len(), after.maps.len()), (13, 13), "{before:?} {after:?}");
    assert!(after.programs.is_disjoint(&before.programs));
    let relinked = links_of(&bed, "n1");
    assert_eq!(attach_types(&relinked), ONE_POD, "the same links, none added");
    assert!(programs(&relinked).is_subset(&after.programs), "every link runs the new agent's programs");
    wait_until(Duration::from_secs(10), "the old programs to be freed", || {
        Ok(!before.programs.iter().any(|id| exists("prog", *id)))
    })
    .unwrap();

    // A graceful stop keeps the capture; uninstall removes it.
    assert!(second.stop().unwrap().success());
    assert_eq!(links_of(&bed, "n1"), relinked);
    assert!(curl(&bed, "shop/app", &plain_url).is_err());
    let uninstall = bed.uninstall("n1").unwrap();
    assert!(uninstall.status.success(), "{}", String::from_utf8_lossy(&uninstall.stderr));
    assert!(links_of(&bed, "n1").is_empty());
    assert!(!bed.bpf_dir("n1").exists());
    wait_until(Duration::from_secs(10), "programs and maps freed", || {
        Ok(!after.programs.iter().chain(&after.maps).any(|id| exists("prog", *id) || exists("map", *id)))
    })
    .unwrap();
    curl(&bed, "shop/app", &plain_url).expect("after uninstall the pod talks directly");
}

/// With no agent on either node: a plain pod cannot reach an enrolled
/// pod's app, an enrolled pod's outbound connections fail (to a meshed pod
/// and to a plain one), and tcpdump on the fabric sees no payload. Plain
/// pods are untouched, and the next agents bring the mesh back.
#[test]
fn agent_down_fails_closed() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n1", "legacy/plain"), ("n2", "shop/web"), ("n2", "legacy/web")]).unwrap();
    let (root, _) = web_root(&bed, 1024);
    for web in ["shop/web", "legacy/web"] {
        bed.http_server(web, HTTP_PORT, &root, &bed.scratch().join(format!("{}.log", web.replace('/', "-")))).unwrap();
    }
    let url = |pod: &str| format!("http://{}:{HTTP_PORT}/index.html", bed.pod(pod).ip);
    let mut n1 = agent(&bed, "n1");
    let mut n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    curl(&bed, "shop/client", &url("shop/web")).unwrap();

    assert!(n1.stop().unwrap().success());
    assert!(n2.stop().unwrap().success());
    let wire = WireCapture::start(&bed, "agents-down");
    assert!(curl(&bed, "legacy/plain", &url("shop/web")).is_err(), "a plain pod reaches no enrolled app");
    assert!(curl(&bed, "shop/client", &url("shop/web")).is_err(), "an enrolled pod's connection to a meshed pod fails");
    assert!(curl(&bed, "shop/client", &url("legacy/web")).is_err(), "and to a plain one");
    let (raw, packets) = wire.stop();
    assert!(!contains(&raw, b"GET /index.html"), "no request crossed the fabric");
    let with_payload: Vec<&String> =
        packets.iter().filter(|p| p.contains(&format!(".{HTTP_PORT}")) && !p.ends_with("length 0")).collect();
    assert!(with_payload.is_empty(), "no payload to or from port {HTTP_PORT}: {with_payload:#?}");
    curl(&bed, "legacy/plain", &url("legacy/web")).expect("plain pods are not touched");

    let mut n1 = agent(&bed, "n1");
    let _n2 = agent(&bed, "n2");
    n1.wait_pod_event("pod enrolled", "shop/client", 0).unwrap();
    wait_nodes_ready(&bed, &["n1", "n2"]);
    curl(&bed, "shop/client", &url("shop/web")).unwrap();
}

/// Upgrades both nodes' agents under load: an iperf3 stream and 100 HTTP
/// keep-alive connections, opened before, each still on its first
/// connection after, with every byte delivered and every file intact. The
/// old agents drain and exit on their own, and each node ends with one set
/// of programs on the same links.
#[test]
fn upgrade_keeps_established_connections() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n2", "shop/web")]).unwrap();
    let (root, long_sum) = web_root(&bed, BIG_FILE_BYTES);
    // What each keep-alive request fetches: big.bin's first 32 KiB.
    let part = root.join("part.bin");
    std::fs::write(&part, &std::fs::read(root.join("big.bin")).unwrap()[..32 * 1024]).unwrap();
    let sum = sha256(&part);
    bed.http_keepalive_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    bed.iperf3_server("shop/web", IPERF_PORT).unwrap();
    let web = bed.pod("shop/web").ip.to_string();
    let mut old = [agent(&bed, "n1"), agent(&bed, "n2")];
    wait_nodes_ready(&bed, &["n1", "n2"]);
    curl(&bed, "shop/client", &format!("http://{web}:{HTTP_PORT}/index.html")).unwrap();
    let links_before = [links_of(&bed, "n1"), links_of(&bed, "n2")];
    let programs_before: Vec<BTreeSet<u64>> = old.iter().map(|a| objects_of(a.pid()).programs).collect();

    let iperf_report = bed.scratch().join("iperf3.json");
    let mut iperf = bed
        .pod("shop/client")
        .command("iperf3")
        .args(["-c", &web, "-p", &IPERF_PORT.to_string(), "-t", "14", "-J"])
        .stdout(std::fs::File::create(&iperf_report).unwrap())
        .spawn()
        .unwrap();
    // One long download (about 16 s), checksummed at the end.
    let long_out = bed.scratch().join("long.out");
    let mut long = bed
        .pod("shop/client")
        .command("curl")
        .args(["-sS", "--fail", "--limit-rate", "2M", "-o"])
        .arg(&long_out)
        .arg(format!("http://{web}:{HTTP_PORT}/big.bin"))
        .spawn()
        .unwrap();
    // 100 connections, each fetching part.bin 16 times at 2 per second.
    let downloads = bed.scratch().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let mut clients: Vec<(Child, std::path::PathBuf)> = (0..100)
        .map(|i| {
            let connects = downloads.join(format!("c{i}.connects"));
            let child = bed
                .pod("shop/client")
                .command("curl")
                .args(["-sS", "--fail", "--rate", "2/s", "-w", "%{num_connects}\n", "-o"])
                .arg(downloads.join(format!("c{i}_#1")))
                .arg(format!("http://{web}:{HTTP_PORT}/part.bin?n=[1-16]"))
                .stdout(std::fs::File::create(&connects).unwrap())
                .stderr(std::fs::File::create(downloads.join(format!("c{i}.err"))).unwrap())
                .spawn()
                .unwrap();
            (child, connects)
        })
        .collect();

    std::thread::sleep(Duration::from_secs(2));
    let mut new = Vec::new();
    for (node, previous) in ["n1", "n2"].into_iter().zip(old.iter_mut()) {
        let mut next = bed.start_agent(node).unwrap();
        next.wait_ready().unwrap();
        assert!(message_seen(&next, "took over: the previous agent drains its connections"), "{}", next.log_text());
        previous
            .wait_for("the old agent to drain", Duration::from_secs(5), |l| {
                l["message"] == "another agent took over; draining the open connections"
            })
            .unwrap();
        new.push(next);
        std::thread::sleep(Duration::from_secs(1));
    }

    let status = wait_exit(&mut iperf, Duration::from_secs(30));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&iperf_report).unwrap()).unwrap();
    assert!(status.success() && report.get("error").is_none(), "iperf3: {report}");
    // A broken stream is an iperf3 error. Its receiver stops counting at
    // the test's end, before what the proxies still buffer arrives, so the
    // counts differ by that; the checksums below prove every byte.
    assert!(report["end"]["sum_received"]["bytes"].as_u64().unwrap() > 0, "iperf3: {report}");
    assert!(wait_exit(&mut long, Duration::from_secs(30)).success(), "the long download");
    assert_eq!(sha256(&long_out), long_sum, "the long download is intact");
    for (i, (child, connects)) in clients.iter_mut().enumerate() {
        let status = wait_exit(child, Duration::from_secs(30));
        let err = std::fs::read_to_string(downloads.join(format!("c{i}.err"))).unwrap_or_default();
        assert!(status.success(), "client {i}: {status}: {err}");
        let opened: u64 = std::fs::read_to_string(connects).unwrap().lines().map(|l| l.parse::<u64>().unwrap()).sum();
        assert_eq!(opened, 1, "client {i} kept its one keep-alive connection across the upgrades");
        for n in 1..=16 {
            assert_eq!(sha256(&downloads.join(format!("c{i}_{n}"))), sum, "client {i}, download {n}");
        }
    }

    for previous in &mut old {
        previous.wait_exit(Duration::from_secs(30)).unwrap();
        assert!(message_seen(previous, "drained: every connection has ended"), "{}", previous.log_text());
    }
    for (i, node) in ["n1", "n2"].into_iter().enumerate() {
        let links = links_of(&bed, node);
        assert_eq!(attach_types(&links), attach_types(&links_before[i]), "{node}: the same links, none added");
        let programs_now = objects_of(new[i].pid()).programs;
        assert!(programs(&links).is_subset(&programs_now), "{node}: the links run the new agent's programs");
        assert!(!programs_before[i].iter().any(|id| exists("prog", *id)), "{node}: the old programs are gone");
    }
    curl(&bed, "shop/client", &format!("http://{web}:{HTTP_PORT}/index.html")).unwrap();
}

#[track_caller]
fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    wait_until(timeout, "the client to finish", || Ok(child.try_wait()?.is_some())).unwrap();
    child.wait().unwrap()
}

/// Maps pinned by an agent of another map layout (another version) are
/// never adopted: the agent makes its own beside them, puts its programs on
/// the hooks, and removes the others once its pods are enrolled.
#[test]
fn maps_of_another_layout_are_not_adopted_and_are_removed() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/app"), ("n2", "shop/web")]).unwrap();
    let (root, _) = web_root(&bed, 1024);
    bed.http_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    // What an agent of layout v0 would have left: its ENROLLED map, laid out otherwise.
    let other = bed.bpf_dir("n1").join("maps-v0-000000000000");
    std::fs::create_dir_all(&other).unwrap();
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(other.join("ENROLLED"))
        .args(["type", "hash", "key", "8", "value", "4", "entries", "16", "name", "ENROLLED"])
        .status()
        .unwrap();
    assert!(created.success());
    let stale_id =
        bpftool(&["map", "show", "pinned", other.join("ENROLLED").to_str().unwrap()])["id"].as_u64().unwrap();

    let n1 = agent(&bed, "n1");
    let _n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    curl(&bed, "shop/app", &format!("http://{}:{HTTP_PORT}/index.html", bed.pod("shop/web").ip)).unwrap();
    assert!(!objects_of(n1.pid()).maps.contains(&stale_id), "the other layout's map is not used");
    assert!(!other.exists(), "the other layout's maps are removed");
    wait_until(Duration::from_secs(10), "the stale map freed", || Ok(!exists("map", stale_id))).unwrap();
}
