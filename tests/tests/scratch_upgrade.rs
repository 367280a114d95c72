mod common;
use common::*;
use std::{process::Stdio, time::Duration};

#[test]
fn scratch() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n2", "shop/server")]).unwrap();
    let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ambit-bench");
    let tool = tool.to_str().unwrap();
    let server = bed.pod("shop/server").ip.to_string();
    bed.run_ok("shop/client", "sysctl", &["-qw", "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"])
        .unwrap();
    bed.iperf3_server("shop/server", 5201).unwrap();
    for (mode, port) in [("echo", 7000), ("http", 8000)] {
        bed.spawn("shop/server", tool, &[mode, "--listen", &format!("{server}:{port}")]).unwrap();
        bed.wait_listening("shop/server", port).unwrap();
    }
    let mut agents = [
        bed.start_agent_with("n1", &["--drain-timeout", "30s"]).unwrap(),
        bed.start_agent_with("n2", &["--drain-timeout", "30s"]).unwrap(),
    ];
    for a in &mut agents {
        a.wait_ready().unwrap();
    }
    wait_nodes_ready(&bed, &["n1", "n2"]);
    if std::env::var_os("HOLD").is_some() {
        let out = bed
            .run_ok(
                "shop/client",
                tool,
                &["hold", "--to", &format!("{server}:7000"), "--count", "10000", "--seconds", "5"],
            )
            .unwrap();
        println!("{out}");
    }
    let spawn = |program: &str, args: &[&str]| {
        bed.pod("shop/client").command(program).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap()
    };
    let iperf = spawn("iperf3", &["-c", &server, "-p", "5201", "-t", "20", "-J"]);
    let ka = spawn(tool, &["keepalive", "--to", &format!("{server}:8000"), "--connections", "1000", "--seconds", "20"]);
    let cr = spawn(tool, &["connrate", "--to", &format!("{server}:7000"), "--seconds", "20"]);
    std::thread::sleep(Duration::from_secs(4));
    let mut old = Vec::new();
    for (i, node) in ["n1", "n2"].into_iter().enumerate() {
        let mut next = bed.start_agent_with(node, &["--drain-timeout", "30s"]).unwrap();
        next.wait_ready().unwrap();
        old.push(std::mem::replace(&mut agents[i], next));
        std::thread::sleep(Duration::from_secs(4));
    }
    for c in [iperf, ka, cr] {
        let o = c.wait_with_output().unwrap();
        println!("{}", String::from_utf8_lossy(&o.stdout).chars().take(300).collect::<String>());
    }
    std::thread::sleep(Duration::from_secs(40));
    for o in &old {
        let _ = std::fs::copy(o.log_path(), format!("/tmp/scratch-{}.log", o.node));
    }
    for o in &agents {
        let _ = std::fs::copy(o.log_path(), format!("/tmp/scratch-new-{}.log", o.node));
    }
}
