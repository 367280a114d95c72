//! End-to-end tests of where identities come from: a plug-in CA (the
//! user's own PKI, made with openssl as an operator would), its rotation
//! under load, and what `ambit status` shows of the chain. Real agents,
//! the real CA, real clients (iperf3, curl, openssl).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use ambit_testbed::{Agent, Bed, wait_until};
use common::*;
use serde_json::Value;

/// A user's PKI made with the openssl command line: an RSA root, and
/// intermediates under it in Istio's `cacerts` layout.
struct OpensslPki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl OpensslPki {
    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "root-key.pem",
                "-out",
                "root-cert.pem",
                "-days",
                "3650",
                "-subj",
                "/O=Example Corp/CN=Example Corp Root CA",
                "-addext",
                "basicConstraints=critical,CA:true",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Self { dir }
    }

    /// A directory with an intermediate named `name` (key from `genpkey
    /// args`), its key, its chain and the root.
    fn intermediate(&self, name: &str, genpkey: &[&str]) -> PathBuf {
        let out = self.dir.join(name);
        std::fs::create_dir_all(&out).unwrap();
        let mut args = vec!["genpkey", "-out", "ca-key.pem"];
        args.extend_from_slice(genpkey);
        openssl(&out, &args);
        let subject = format!("/O=Example Corp/CN={name}");
        openssl(&out, &["req", "-new", "-key", "ca-key.pem", "-subj", &subject, "-out", "ca.csr"]);
        std::fs::write(
            out.join("ext.cnf"),
            "basicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\nsubjectAltName=URI:spiffe://cluster.local\n",
        )
        .unwrap();
        let root = |file: &str| self.dir.join(file).to_string_lossy().into_owned();
        openssl(
            &out,
            &[
                "x509",
                "-req",
                "-in",
                "ca.csr",
                "-CA",
                &root("root-cert.pem"),
                "-CAkey",
                &root("root-key.pem"),
                "-CAcreateserial",
                "-days",
                "365",
                "-extfile",
                "ext.cnf",
                "-out",
                "ca-cert.pem",
            ],
        );
        let root_pem = std::fs::read_to_string(self.dir.join("root-cert.pem")).unwrap();
        let chain = std::fs::read_to_string(out.join("ca-cert.pem")).unwrap() + &root_pem;
        std::fs::write(out.join("cert-chain.pem"), chain).unwrap();
        std::fs::write(out.join("root-cert.pem"), root_pem).unwrap();
        for scratch in ["ca.csr", "ext.cnf"] {
            std::fs::remove_file(out.join(scratch)).unwrap();
        }
        out
    }
}

/// Puts the four files of `from` in `cacerts`, each replaced by a rename,
/// as a Secret update lands: the CA may see them half-changed for a moment.
fn install(from: &Path, cacerts: &Path) {
    std::fs::create_dir_all(cacerts).unwrap();
    for file in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"] {
        let staged = cacerts.join(format!(".{file}.new"));
        std::fs::copy(from.join(file), &staged).unwrap();
        std::fs::rename(&staged, cacerts.join(file)).unwrap();
    }
}

/// The /certs entry of `identity` on `node`.
fn held(bed: &Bed, node: &str, identity: &str) -> Option<Value> {
    let (_, body) = bed.admin_get(node, "/certs").ok()?;
    let certs: Value = serde_json::from_str(&body).ok()?;
    certs["identities"].as_array()?.iter().find(|c| c["identity"] == identity).cloned()
}

/// Waits until `node` holds `identity` signed by the intermediate `name`.
fn wait_signed_by(bed: &Bed, agent: &Agent, node: &str, identity: &str, name: &str) -> Value {
    let mut found = Value::Null;
    wait_until(Duration::from_secs(40), &format!("{identity} on {node} signed by {name}"), || {
        found = held(bed, node, identity).unwrap_or_default();
        Ok(found["signers"][0]["subject"].as_str().is_some_and(|s| s.contains(name)))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {found}\n{}", agent.log_text()));
    found
}

/// A plug-in CA: leaves carry the intermediate, agents trust only the
/// root, and a new intermediate (another key type, too) is taken up under
/// a running iperf3 transfer that loses nothing. `openssl verify
/// -x509_strict` accepts what the CA issues, `ambit status` shows the
/// chain, and a mismatched set of files stops the CA at start-up.
#[test]
fn plug_in_ca_rotates_its_intermediate_under_an_iperf3_transfer() {
    let Some(mut bed) = bed() else { return };
    let pki = OpensslPki::new(bed.scratch().join("pki"));
    let first = pki.intermediate("ambit intermediate 1", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let second = pki.intermediate("ambit intermediate 2", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);

    // A mismatched set (the second certificate, the first key) is refused at start-up.
    let mismatched = bed.scratch().join("mismatched");
    install(&first, &mismatched);
    std::fs::copy(second.join("ca-cert.pem"), mismatched.join("ca-cert.pem")).unwrap();
    let refused = Command::new(ambit_testbed::agent_binary())
        .args(["ca", "serve", "--listen", "127.0.0.1:0", "--dir"])
        .arg(bed.scratch().join("refused-ca"))
        .arg("--config-dir")
        .arg(bed.config_dir())
        .arg("--cacerts-dir")
        .arg(&mismatched)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a CA started with a mismatched key: {stderr}");
    assert!(stderr.contains("ca-key.pem: is not the key of ca-cert.pem"), "{stderr}");

    let cacerts = bed.scratch().join("cacerts");
    install(&first, &cacerts);
    bed.plug_in_ca(&cacerts);
    bed.start_ca("10s").unwrap();
    bed.add_pods(&[("n1", "shop/client"), ("n2", "shop/web")]).unwrap();
    bed.iperf3_server("shop/web", IPERF_PORT).unwrap();
    let web = bed.pod("shop/web").ip.to_string();
    let agents = [agent(&bed, "n1"), agent(&bed, "n2")];
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let web_id = "spiffe://cluster.local/ns/shop/sa/web";
    let first_held = wait_signed_by(&bed, &agents[1], "n2", web_id, "ambit intermediate 1");

    // What the CA issued passes openssl's strict checks against the root alone.
    let leaf = bed.scratch().join("leaf.pem");
    let intermediates = bed.scratch().join("intermediates.pem");
    let chain: Vec<&str> = first_held["chain"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(chain.len(), 2, "leaf and intermediate: {first_held}");
    std::fs::write(&leaf, chain[0]).unwrap();
    std::fs::write(&intermediates, chain[1]).unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(cacerts.join("root-cert.pem"))
        .arg("-untrusted")
        .arg(&intermediates)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(verify.status.success(), "openssl verify: {}", String::from_utf8_lossy(&verify.stderr));

    let report = bed.scratch().join("iperf3.json");
    let mut iperf = bed
        .pod("shop/client")
        .command("iperf3")
        .args(["-c", &web, "-p", &IPERF_PORT.to_string(), "-t", "25", "-J"])
        .stdout(std::fs::File::create(&report).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    install(&second, &cacerts);
    wait_until(Duration::from_secs(20), "the CA to take up the new intermediate", || {
        Ok(std::fs::read_to_string(bed.ca_log())?.contains("plug-in CA files changed"))
    })
    .unwrap();
    // Renewed at half-life: both ends move to the new intermediate while iperf3 runs.
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    wait_signed_by(&bed, &agents[0], "n1", client_id, "ambit intermediate 2");
    wait_signed_by(&bed, &agents[1], "n2", web_id, "ambit intermediate 2");
    // A pod that first appears now has only new-intermediate leaves; its
    // connection is a new mTLS handshake with them on both sides.
    bed.add_pods(&[("n1", "shop/late")]).unwrap();
    let late_id = "spiffe://cluster.local/ns/shop/sa/late";
    wait_signed_by(&bed, &agents[0], "n1", late_id, "ambit intermediate 2");
    let (www, _) = web_root(&bed, 1024);
    bed.http_server("shop/web", HTTP_PORT, &www, &bed.scratch().join("web.log")).unwrap();
    let page = curl(&bed, "shop/late", &format!("http://{web}:{HTTP_PORT}/index.html")).unwrap();
    assert_eq!(page, "hello from the web pod\n");

    let status = iperf.wait().unwrap();
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(status.success() && result.get("error").is_none(), "iperf3 across the rotation: {result}");
    assert!(result["end"]["sum_received"]["bytes"].as_u64().unwrap() > 1_000_000, "{result}");

    let (code, text) = bed.ambit_status("n1").unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("signed by O=Example Corp, CN=ambit intermediate 2, expires in"), "{text}");
    assert!(text.contains("root O=Example Corp, CN=Example Corp Root CA, expires in"), "{text}");
}
