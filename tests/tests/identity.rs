//! End-to-end tests of where identities come from and whom a mesh trusts:
//! a plug-in CA (the user's own PKI, made with openssl as an operator
//! would) and its rotation under load, and SPIFFE federation between two
//! meshes of different trust domains. Real agents, real CAs, real clients
//! (iperf3, curl, openssl).

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
        Self::named(dir, "Example Corp Root CA")
    }

    /// A new RSA root named `root`.
    fn named(dir: PathBuf, root: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let subject = format!("/O=Example Corp/CN={root}");
        let args = "req -x509 -newkey rsa:2048 -nodes -keyout root-key.pem -out root-cert.pem -days 3650 -subj";
        let mut args: Vec<&str> = args.split(' ').collect();
        args.extend([&subject, "-addext", "basicConstraints=critical,CA:true"]);
        args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(&dir, &args);
        Self { dir }
    }

    fn root_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("root-cert.pem")).unwrap()
    }

    /// A directory with an intermediate named `name` (key from `genpkey
    /// args`) for trust domain `trust_domain`, its key, its chain and the root.
    fn intermediate(&self, name: &str, genpkey: &[&str]) -> PathBuf {
        self.intermediate_in("cluster.local", name, genpkey)
    }

    fn intermediate_in(&self, trust_domain: &str, name: &str, genpkey: &[&str]) -> PathBuf {
        let out = self.dir.join(name);
        std::fs::create_dir_all(&out).unwrap();
        let mut args = vec!["genpkey", "-out", "ca-key.pem"];
        args.extend_from_slice(genpkey);
        openssl(&out, &args);
        let subject = format!("/O=Example Corp/CN={name}");
        openssl(&out, &["req", "-new", "-key", "ca-key.pem", "-subj", &subject, "-out", "ca.csr"]);
        std::fs::write(
            out.join("ext.cnf"),
            format!(
                "basicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\nsubjectAltName=URI:spiffe://{trust_domain}\n",
            ),
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
        let root_pem = self.root_pem();
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

/// A Web PKI for the https_web bundle endpoint: a CA, and a server
/// certificate for `ip` it signed. Returns (CA, certificate, key) files.
fn web_pki(dir: &Path, ip: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=Example Web CA",
        ],
    );
    openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "key.pem"]);
    openssl(dir, &["req", "-new", "-key", "key.pem", "-subj", &format!("/CN={ip}"), "-out", "server.csr"]);
    std::fs::write(
        dir.join("ext.cnf"),
        format!("basicConstraints=critical,CA:false\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:{ip}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ],
    );
    (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"))
}

/// Runs `program` in the fabric (where the CAs listen) and returns its output, which must succeed.
fn in_fabric(bed: &Bed, program: &str, args: &[&str]) -> String {
    let out = bed.fabric_command(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A SPIFFE bundle as the spec has it: a JWKS whose keys are x509-svid
/// authorities with one certificate each, a sequence and a refresh hint.
fn assert_spiffe_bundle(text: &str, roots_pem: &str) -> Value {
    let bundle: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(bundle["spiffe_sequence"].as_u64().is_some_and(|s| s >= 1), "{bundle}");
    assert_eq!(bundle["spiffe_refresh_hint"], 2, "{bundle}");
    let keys = bundle["keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    let roots: Vec<String> = roots_pem
        .split("-----END CERTIFICATE-----")
        .filter(|p| p.contains("BEGIN"))
        .map(|p| p.split("-----BEGIN CERTIFICATE-----").nth(1).unwrap().split_whitespace().collect())
        .collect();
    for key in keys {
        assert_eq!(key["use"], "x509-svid", "{key}");
        assert!(["EC", "RSA"].contains(&key["kty"].as_str().unwrap()), "{key}");
        let x5c = key["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1, "one certificate per key: {key}");
        assert!(roots.contains(&x5c[0].as_str().unwrap().to_string()), "a root of the mesh: {key}");
    }
    assert_eq!(keys.len(), roots.len());
    bundle
}

/// A new pod on n1 running as shop/client: its connections are new handshakes.
fn fresh_client(bed: &mut Bed, name: &str) {
    bed.add_pod("n1", "shop", name).unwrap();
    bed.set_pod_service_account(&format!("shop/{name}"), "client").unwrap();
}

/// The federated bundle of `trust_domain` that `node`'s agent holds, if any.
fn federated(bed: &Bed, node: &str, trust_domain: &str) -> Option<Value> {
    let (_, body) = bed.admin_get(node, "/certs").ok()?;
    let certs: Value = serde_json::from_str(&body).ok()?;
    certs["federated_bundles"].as_array()?.iter().find(|b| b["trust_domain"] == trust_domain).cloned()
}

fn wait_logged(agent: &Agent, what: &str, message: &str) {
    wait_until(Duration::from_secs(30), what, || Ok(agent.lines().iter().any(|l| l["message"] == message)))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
}

/// Two meshes in one bed: cluster.local (n1, the bed's CA, serving its
/// bundle with https_web) and partner.example (n2, a plug-in CA of the
/// partner's PKI, serving https_spiffe). Each federates the other. Shown:
/// both endpoints serve SPIFFE bundles (curl); cross-domain mTLS; the
/// partner's policy admits one foreign principal and denies another; the
/// partner rotates its root and new connections verify with the new one;
/// the partner's endpoint goes away and the last good bundle stays; and
/// once the partner stops federating, foreign callers are refused.
#[test]
fn two_trust_domains_federate_with_policy_root_rotation_and_an_endpoint_outage() {
    let Some(mut bed) = bed() else { return };
    let partner_root = OpensslPki::named(bed.scratch().join("partner-root-1"), "Partner Root 1");
    let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let first = partner_root.intermediate_in("partner.example", "partner intermediate 1", &ec);
    let cacerts = bed.scratch().join("partner-cacerts");
    install(&first, &cacerts);
    bed.add_peer_mesh("partner.example", &["n2"], Some(&cacerts)).unwrap();
    let hint = ["--bundle-refresh-hint", "2s"];
    let peer_args = ["--bundle-endpoint", "10.100.0.253:8443", "--root-propagation", "6s"];
    bed.start_peer_ca("10s", &[&peer_args[..], &hint].concat()).unwrap();
    let (web_ca, web_cert, web_key) = web_pki(&bed.scratch().join("web"), "10.100.0.254");
    let web_args = [
        "--bundle-endpoint-web",
        "10.100.0.254:8444",
        "--bundle-endpoint-web-cert",
        web_cert.to_str().unwrap(),
        "--bundle-endpoint-web-key",
        web_key.to_str().unwrap(),
    ];
    bed.start_ca_with("1h", &[&web_args[..], &hint].concat()).unwrap();

    // Both profiles, fetched with curl, are SPIFFE bundles of their mesh's roots.
    let ours = in_fabric(&bed, "curl", &["-sS", "--cacert", web_ca.to_str().unwrap(), "https://10.100.0.254:8444/"]);
    let own_root = std::fs::read_to_string(bed.trust_anchors()).unwrap();
    assert_spiffe_bundle(&ours, &own_root);
    // https_spiffe is not Web PKI: curl takes the first bundle on trust
    // (-k), as an operator bootstrapping a federation does, and openssl
    // shows the endpoint's SVID and that it chains to the partner's root.
    let theirs = in_fabric(&bed, "curl", &["-sSk", "https://10.100.0.253:8443/"]);
    assert_spiffe_bundle(&theirs, &partner_root.root_pem());
    let handshake = in_fabric(
        &bed,
        "sh",
        &[
            "-c",
            &format!(
                "openssl s_client -connect 10.100.0.253:8443 -CAfile {} -verify_return_error </dev/null 2>&1 | tee /dev/stderr | openssl x509 -noout -ext subjectAltName",
                cacerts.join("root-cert.pem").display()
            ),
        ],
    );
    assert!(handshake.contains("URI:spiffe://partner.example/ns/ambit-system/sa/ambit-ca"), "{handshake}");

    let indent = |text: &str| text.lines().map(|l| format!("    {l}\n")).collect::<String>();
    bed.write_config(
        "federation-partner.yaml",
        &format!(
            "apiVersion: ambit.dev/v1alpha1\nkind: TrustDomainFederation\nmetadata: {{name: partner}}\nspec:\n  trustDomain: partner.example\n  bundleEndpointURL: https://10.100.0.253:8443/\n  bundleEndpointProfile:\n    type: https_spiffe\n    endpointSPIFFEID: spiffe://partner.example/ns/ambit-system/sa/ambit-ca\n  trustDomainBundle: |\n{}",
            indent(&theirs)
        ),
    )
    .unwrap();
    bed.write_peer_config(
        "federation-cluster.yaml",
        &format!(
            "apiVersion: ambit.dev/v1alpha1\nkind: TrustDomainFederation\nmetadata: {{name: cluster}}\nspec:\n  trustDomain: cluster.local\n  bundleEndpointURL: https://10.100.0.254:8444/\n  bundleEndpointProfile:\n    type: https_web\n    caCertificates: |\n{}",
            indent(&std::fs::read_to_string(&web_ca).unwrap()).replace("\n    ", "\n      ").replacen("    ", "      ", 1)
        ),
    )
    .unwrap();
    bed.write_peer_config(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/shop/sa/client]}\n",
    )
    .unwrap();
    bed.add_pods(&[("n1", "shop/client"), ("n1", "shop/other"), ("n2", "shop/web")]).unwrap();
    let (www, _) = web_root(&bed, 1024);
    bed.http_server("shop/web", HTTP_PORT, &www, &bed.scratch().join("web.log")).unwrap();
    let agents = [agent(&bed, "n1"), agent(&bed, "n2")];
    wait_nodes_ready(&bed, &["n1", "n2"]);
    wait_until(Duration::from_secs(20), "each mesh to hold the other's bundle", || {
        Ok(federated(&bed, "n1", "partner.example").is_some() && federated(&bed, "n2", "cluster.local").is_some())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", agents[0].log_text(), agents[1].log_text()));

    // Cross-domain mTLS, and the partner's policy on the foreign principal.
    let url = format!("http://{}:{HTTP_PORT}/index.html", bed.pod("shop/web").ip);
    assert_eq!(curl(&bed, "shop/client", &url).unwrap(), "hello from the web pod\n");
    let accepted: Vec<Value> =
        agents[1].lines().into_iter().filter(|l| l["message"] == "mTLS connection accepted").collect();
    assert!(
        accepted.iter().any(|l| l["src_identity"] == "spiffe://cluster.local/ns/shop/sa/client"),
        "{}",
        agents[1].log_text()
    );
    assert!(curl(&bed, "shop/other", &url).is_err(), "cluster.local/ns/shop/sa/other is not admitted");

    // The partner rotates its root in one step: both roots in its bundle,
    // and an intermediate under the new one, which signs only once the new
    // root has had time to reach the federated mesh.
    let next_root = OpensslPki::named(bed.scratch().join("partner-root-2"), "Partner Root 2");
    let second = next_root.intermediate_in("partner.example", "partner intermediate 2", &ec);
    std::fs::write(second.join("root-cert.pem"), partner_root.root_pem() + &next_root.root_pem()).unwrap();
    install(&second, &cacerts);
    wait_until(Duration::from_secs(30), "cluster.local to hold both partner roots", || {
        Ok(federated(&bed, "n1", "partner.example").is_some_and(|b| b["roots"].as_array().unwrap().len() == 2))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agents[0].log_text()));
    wait_signed_by(&bed, &agents[1], "n2", "spiffe://partner.example/ns/shop/sa/web", "partner intermediate 2");
    // A new pod, the same identity: a new handshake, verified with the new root.
    fresh_client(&mut bed, "client2");
    wait_until(Duration::from_secs(20), "client2 to reach web", || Ok(curl(&bed, "shop/client2", &url).is_ok()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", agents[0].log_text(), agents[1].log_text()));

    // The partner's bundle endpoint goes away: the last good bundle stays.
    bed.stop_peer_ca().unwrap();
    wait_logged(
        &agents[0],
        "the partner endpoint's outage",
        "cannot fetch the federated bundle; the last good bundle stays in use",
    );
    fresh_client(&mut bed, "client3");
    wait_until(Duration::from_secs(20), "client3 to reach web", || Ok(curl(&bed, "shop/client3", &url).is_ok()))
        .unwrap();
    assert!(federated(&bed, "n1", "partner.example").is_some());

    // The partner stops federating with cluster.local: its IDs are refused.
    bed.remove_peer_config("federation-cluster.yaml").unwrap();
    wait_logged(
        &agents[1],
        "the partner to drop cluster.local",
        "no longer federated: its IDs are refused from now on",
    );
    fresh_client(&mut bed, "client4");
    std::thread::sleep(Duration::from_secs(2));
    assert!(curl(&bed, "shop/client4", &url).is_err(), "a caller of an unfederated trust domain got through");
    assert!(agents[1].log_text().contains("trust domain cluster.local is not federated"), "{}", agents[1].log_text());
}

/// The serial of the certificate `node` holds for `identity`, if any.
fn held_serial(bed: &Bed, node: &str, identity: &str) -> Option<String> {
    held(bed, node, identity)?["serial"].as_str().map(str::to_string)
}

/// SPIRE as the identity provider, through the SPIRE agent double's
/// Delegated Identity API: SVIDs pushed, rotated (by SPIRE, and at half
/// life) and revoked, SPIRE down (the current SVIDs serve until they
/// expire, then connections fail, as with the CA), and back. A caller that
/// is not an authorized delegate gets nothing.
#[test]
fn spire_provides_pushes_rotates_and_revokes_identities() {
    use ambit_testbed::spire::{SpireAgent, socket_path};
    let Some(mut bed) = bed() else { return };
    let sockets = [socket_path(bed.scratch(), "n1"), socket_path(bed.scratch(), "n2")];
    let spire = SpireAgent::start("cluster.local", Duration::from_secs(20), &sockets).unwrap();
    let (client_id, web_id) = ("spiffe://cluster.local/ns/shop/sa/client", "spiffe://cluster.local/ns/shop/sa/web");
    spire.register(client_id, &["k8s:ns:shop", "k8s:sa:client"]);
    spire.register(web_id, &["k8s:ns:shop", "k8s:sa:web"]);
    bed.use_spire("n1", &sockets[0]);
    bed.use_spire("n2", &sockets[1]);

    // A SPIRE agent whose authorized delegate is another user refuses this agent.
    let elsewhere = bed.scratch().join("spire-elsewhere.sock");
    let other = SpireAgent::start_authorizing(
        "cluster.local",
        Duration::from_secs(20),
        std::slice::from_ref(&elsewhere),
        65534,
    );
    bed.use_spire("n1", &elsewhere);
    let mut refused = bed.start_agent("n1").unwrap();
    assert!(!refused.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(refused.log_text().contains("not an authorized delegate"), "{}", refused.log_text());
    assert!(refused.log_text().contains("authorized_delegates"), "{}", refused.log_text());
    drop((refused, other));
    bed.use_spire("n1", &sockets[0]);

    bed.add_pods(&[("n1", "shop/client"), ("n2", "shop/web")]).unwrap();
    let (www, _) = web_root(&bed, 1024);
    bed.http_server("shop/web", HTTP_PORT, &www, &bed.scratch().join("web.log")).unwrap();
    let agents = [agent(&bed, "n1"), agent(&bed, "n2")];
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let url = format!("http://{}:{HTTP_PORT}/index.html", bed.pod("shop/web").ip);
    assert_eq!(curl(&bed, "shop/client", &url).unwrap(), "hello from the web pod\n");
    // What SPIRE pushed is what the agent holds, and it passes openssl's strict checks.
    let pushed = spire.serial(client_id).unwrap();
    assert_eq!(held_serial(&bed, "n1", client_id), Some(pushed.clone()));
    let held_client = held(&bed, "n1", client_id).unwrap();
    let leaf = bed.scratch().join("spire-leaf.pem");
    std::fs::write(&leaf, held_client["chain"][0].as_str().unwrap()).unwrap();
    let root = bed.scratch().join("spire-root.pem");
    std::fs::write(&root, ambit_identity::ca::pem("CERTIFICATE", &spire.root())).unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(&root)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(verify.status.success(), "openssl verify: {}", String::from_utf8_lossy(&verify.stderr));

    // Bundles come from SPIRE, federated ones included, as SPIRE changes them.
    let partner = ambit_identity::ca::CertificateAuthority::create("partner.example").unwrap();
    spire.federate("partner.example", vec![partner.roots()[0].to_vec()]);
    wait_until(Duration::from_secs(10), "SPIRE's federated bundle on n1", || {
        Ok(federated(&bed, "n1", "partner.example").is_some_and(|b| b["roots"].as_array().unwrap().len() == 1))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agents[0].log_text()));

    // SPIRE rotates: the new SVID is pushed and used.
    spire.rotate(client_id);
    let rotated = spire.serial(client_id);
    wait_until(Duration::from_secs(10), "the rotated SVID to be held", || {
        let now = spire.serial(client_id);
        Ok(now.is_some() && now != Some(pushed.clone()) && held_serial(&bed, "n1", client_id) == now)
    })
    .unwrap_or_else(|e| panic!("{e:#} ({rotated:?})\n{}", agents[0].log_text()));
    assert_eq!(curl(&bed, "shop/client", &url).unwrap(), "hello from the web pod\n");
    // ...and at half life without being asked (20 s SVIDs).
    let before = held_serial(&bed, "n2", web_id);
    wait_until(Duration::from_secs(15), "web's SVID to rotate at half life", || {
        Ok(held_serial(&bed, "n2", web_id).is_some_and(|s| Some(s) != before))
    })
    .unwrap();

    // Entry deleted: the identity is revoked at once, and its connections fail.
    spire.delete(client_id);
    wait_until(Duration::from_secs(10), "the client identity to be revoked", || {
        Ok(held(&bed, "n1", client_id).is_some_and(|c| c["serial"].is_null()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agents[0].log_text()));
    assert!(agents[0].log_text().contains("identity revoked by its provider"));
    assert!(curl(&bed, "shop/client", &url).is_err(), "a revoked identity still connects");
    spire.register(client_id, &["k8s:ns:shop", "k8s:sa:client"]);
    wait_until(Duration::from_secs(35), "the client identity back", || Ok(curl(&bed, "shop/client", &url).is_ok()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agents[0].log_text()));

    // SPIRE down: the SVIDs in hand serve until they expire, then fail closed.
    spire.stop();
    assert_eq!(curl(&bed, "shop/client", &url).unwrap(), "hello from the web pod\n");
    wait_until(Duration::from_secs(30), "connections to fail once the SVIDs expire", || {
        Ok(curl(&bed, "shop/client", &url).is_err())
    })
    .unwrap();
    assert!(agents[0].log_text().contains("the current certificate stays in use until it expires"));
    spire.resume().unwrap();
    wait_until(Duration::from_secs(40), "SPIRE back", || Ok(curl(&bed, "shop/client", &url).is_ok()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agents[0].log_text()));
}

/// The SPIFFE Workload API (`--workload-api-socket`), called by the
/// `spiffe` crate's client: run inside an enrolled pod, it gets that pod's
/// SVID (the very certificate the agent holds) and the bundles; run in a
/// pod outside the mesh, or on the host, it gets nothing.
#[test]
fn pods_get_their_own_svid_from_the_workload_api() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n1", "legacy/outsider")]).unwrap();
    let socket = bed.scratch().join("workload-api").join("agent.sock");
    let mut agent = bed.start_agent_with("n1", &["--workload-api-socket", socket.to_str().unwrap()]).unwrap();
    agent.wait_ready().unwrap();
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    wait_until(
        Duration::from_secs(10),
        "the client's certificate",
        || Ok(held_serial(&bed, "n1", client_id).is_some()),
    )
    .unwrap();
    let bench = env!("CARGO_BIN_EXE_ambit-bench");
    let fetch = |command: &mut Command| command.args(["workload-svid", "--socket"]).arg(&socket).output().unwrap();

    let out = fetch(&mut bed.pod("shop/client").command(bench));
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent.log_text());
    let fetched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fetched["spiffe_id"], client_id);
    assert_eq!(
        fetched["serial"].as_str(),
        held_serial(&bed, "n1", client_id).as_deref(),
        "the agent's own certificate"
    );
    assert_eq!(fetched["trust_domains"], serde_json::json!(["cluster.local"]));

    for (who, mut command) in
        [("a pod outside the mesh", bed.pod("legacy/outsider").command(bench)), ("the host", Command::new(bench))]
    {
        let out = fetch(&mut command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{who} got an SVID: {}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr.contains("runs in no pod this agent enrols"), "{who}: {stderr}");
    }
}
