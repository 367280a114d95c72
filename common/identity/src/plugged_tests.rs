//! The plug-in CA end to end within the crate: files the user's PKI would
//! give, loaded, issued from, reloaded and refused.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType,
};
use rustls::pki_types::CertificateDer;

use crate::{
    Identity,
    ca::{CertificateAuthority, Reloaded, tests::assert_conforms},
    signing::{CA_CERT, CA_KEY, CERT_CHAIN, PLUGGED_FILES, ROOT_CERT, plugged_files_present},
};

/// A user's PKI, built with rcgen: a root and intermediates under it.
struct Pki {
    root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(name: &str, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(600)).into();
    params.not_after = (now + lifetime).into();
    params
}

impl Pki {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = ca_params(name, Duration::from_secs(10 * 365 * 86400));
        let root = params.self_signed(&key).unwrap().der().clone();
        Self { root, issuer: Issuer::new(params, key) }
    }

    /// An intermediate signed by the root, changed by `edit` first.
    fn intermediate(&self, edit: impl FnOnce(&mut CertificateParams)) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params("ambit intermediate", Duration::from_secs(365 * 86400));
        edit(&mut params);
        (params.signed_by(&key, &self.issuer).unwrap().der().clone(), key)
    }
}

fn pem_of(certs: &[&CertificateDer<'_>]) -> String {
    certs.iter().map(|c| crate::ca::pem("CERTIFICATE", c)).collect()
}

/// Writes a cacerts directory: the intermediate, its key, chain and roots.
fn write(
    dir: &Path,
    cert: &CertificateDer<'_>,
    key: &KeyPair,
    chain: &[&CertificateDer<'_>],
    roots: &[&CertificateDer<'_>],
) {
    std::fs::write(dir.join(CA_CERT), pem_of(&[cert])).unwrap();
    std::fs::write(dir.join(CA_KEY), key.serialize_pem()).unwrap();
    std::fs::write(dir.join(CERT_CHAIN), pem_of(chain)).unwrap();
    std::fs::write(dir.join(ROOT_CERT), pem_of(roots)).unwrap();
}

fn shop_cart() -> Identity {
    Identity::new("cluster.local", "shop", "cart")
}

#[test]
fn a_plugged_intermediate_signs_leaves_that_carry_it_and_verify_against_the_root() {
    let (pki, dir, state) = (Pki::new("corp root"), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cert, key) = pki.intermediate(|_| {});
    write(dir.path(), &cert, &key, &[&cert, &pki.root], &[&pki.root]);
    let ca = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").unwrap();
    assert_eq!(ca.roots(), vec![pki.root.clone()], "agents trust root-cert.pem");
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let chain = ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(3600)).unwrap();
    assert_eq!(chain[1..], [cert], "the leaf carries the intermediate, not the root");
    assert_conforms(&chain, &leaf_key, std::slice::from_ref(&pki.root));
    assert_eq!(ca.bundle_json(Duration::from_secs(300))["keys"][0]["x5c"][0], STANDARD.encode(pki.root.as_ref()));
}

#[test]
fn leaves_never_outlive_the_intermediate() {
    let (pki, dir, state) = (Pki::new("corp root"), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cert, key) = pki.intermediate(|p| p.not_after = (SystemTime::now() + Duration::from_secs(1800)).into());
    write(dir.path(), &cert, &key, &[&cert], &[&pki.root]);
    let ca = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").unwrap();
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let chain = ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(3600)).unwrap();
    assert_conforms(&chain, &leaf_key, std::slice::from_ref(&pki.root));
}

/// One case per way a plug-in directory can be wrong; each is refused
/// at start-up with the file and the reason.
#[test]
fn bad_or_mismatched_files_are_refused_by_name() {
    let pki = Pki::new("corp root");
    let other = Pki::new("another root");
    let (good, good_key) = pki.intermediate(|_| {});
    let (stranger, _) = other.intermediate(|_| {});
    let (_, unrelated_key) = pki.intermediate(|_| {});
    let (leaf_like, leaf_key) = pki.intermediate(|p| {
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    });
    let (expired, expired_key) = pki.intermediate(|p| {
        p.not_before = (SystemTime::now() - Duration::from_secs(7200)).into();
        p.not_after = (SystemTime::now() - Duration::from_secs(3600)).into();
    });
    let (foreign_td, foreign_key) = pki.intermediate(|p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://other.example".try_into().unwrap())];
    });
    type Setup<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Setup, &str)> = vec![
        (
            "key of another certificate",
            Box::new(|d| write(d, &good, &unrelated_key, &[&good], &[&pki.root])),
            "ca-key.pem: is not the key of ca-cert.pem",
        ),
        (
            "chain not starting with ca-cert",
            Box::new(|d| write(d, &good, &good_key, &[&pki.root], &[&pki.root])),
            "cert-chain.pem: must begin with",
        ),
        (
            "root of another PKI",
            Box::new(|d| write(d, &good, &good_key, &[&good], &[&other.root])),
            "root-cert.pem: holds no root that issued",
        ),
        (
            "intermediate of another PKI",
            Box::new(|d| write(d, &stranger, &unrelated_key, &[&stranger], &[&pki.root])),
            "ca-key.pem: is not the key",
        ),
        (
            "a leaf as ca-cert",
            Box::new(|d| write(d, &leaf_like, &leaf_key, &[&leaf_like], &[&pki.root])),
            "ca-cert.pem: is not a CA certificate",
        ),
        (
            "expired intermediate",
            Box::new(|d| write(d, &expired, &expired_key, &[&expired], &[&pki.root])),
            "expired at",
        ),
        (
            "another trust domain",
            Box::new(|d| write(d, &foreign_td, &foreign_key, &[&foreign_td], &[&pki.root])),
            "not trust domain cluster.local",
        ),
        (
            "two certificates in ca-cert",
            Box::new(|d| {
                write(d, &good, &good_key, &[&good], &[&pki.root]);
                std::fs::write(d.join(CA_CERT), pem_of(&[&good, &pki.root])).unwrap();
            }),
            "exactly one",
        ),
        (
            "missing key",
            Box::new(|d| {
                write(d, &good, &good_key, &[&good], &[&pki.root]);
                std::fs::remove_file(d.join(CA_KEY)).unwrap();
            }),
            "ca-key.pem: cannot read it",
        ),
        (
            "SEC1 key",
            Box::new(|d| {
                write(d, &good, &good_key, &[&good], &[&pki.root]);
                let sec1 =
                    std::process::Command::new("openssl").args(["ec", "-in"]).arg(d.join(CA_KEY)).output().unwrap();
                assert!(sec1.status.success());
                std::fs::write(d.join(CA_KEY), sec1.stdout).unwrap();
            }),
            "SEC1 form; convert it with `openssl pkcs8 -topk8",
        ),
    ];
    for (name, setup, expected) in cases {
        let (dir, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        setup(dir.path());
        let error = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").err();
        let error = error.unwrap_or_else(|| panic!("{name}: accepted")).to_string();
        assert!(error.contains(expected), "{name}: {error}");
        assert!(error.starts_with("plug-in CA "), "{name}: {error}");
    }
}

#[test]
fn a_new_intermediate_is_taken_up_and_a_broken_one_refused() {
    let (pki, dir, state) = (Pki::new("corp root"), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, first_key) = pki.intermediate(|_| {});
    write(dir.path(), &first, &first_key, &[&first, &pki.root], &[&pki.root]);
    let ca = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").unwrap();
    let propagation = Duration::from_secs(3600);
    assert!(ca.reload(propagation).unwrap().is_none(), "unchanged files change nothing");

    let (second, second_key) = pki.intermediate(|_| {});
    write(dir.path(), &second, &second_key, &[&second, &pki.root], &[&pki.root]);
    assert!(matches!(ca.reload(propagation).unwrap(), Some(Reloaded::Active(_))), "same root: at once");
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    assert_eq!(ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(60)).unwrap()[1], second);
    assert_eq!(ca.bundle_json(Duration::from_secs(300))["spiffe_sequence"], 1, "same root, same bundle");

    // Half-written: the new certificate with the old key.
    std::fs::write(dir.path().join(CA_CERT), pem_of(&[&first])).unwrap();
    assert!(ca.reload(propagation).is_err());
    assert_eq!(ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(60)).unwrap()[1], second, "still signing");
}

/// A root rotation in one step (new root and an intermediate under it):
/// the new root is published at once, and signs only after the
/// propagation time.
#[test]
fn a_new_root_is_published_before_it_signs() {
    let (pki, dir, state) = (Pki::new("corp root"), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, first_key) = pki.intermediate(|_| {});
    write(dir.path(), &first, &first_key, &[&first], &[&pki.root]);
    let ca = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").unwrap();
    let next = Pki::new("next corp root");
    let (second, second_key) = next.intermediate(|_| {});
    write(dir.path(), &second, &second_key, &[&second], &[&pki.root, &next.root]);
    let long = Duration::from_secs(60);
    let Some(Reloaded::Staged { .. }) = ca.reload(long).unwrap() else { panic!("a new root is staged") };
    assert_eq!(ca.roots(), vec![pki.root.clone(), next.root.clone()], "both roots are published");
    let bundle = ca.bundle_json(Duration::from_secs(300));
    assert_eq!((bundle["spiffe_sequence"].as_u64(), bundle["keys"].as_array().unwrap().len()), (Some(2), 2));
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    assert_eq!(ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(60)).unwrap()[1], first, "still the old");
    assert!(ca.reload(long).unwrap().is_none(), "staged once");
    // Put back before it signs: the staged root is withdrawn from the bundle.
    write(dir.path(), &first, &first_key, &[&first], &[&pki.root]);
    assert!(matches!(ca.reload(long).unwrap(), Some(Reloaded::Active(_))));
    assert_eq!(
        (ca.roots(), ca.bundle_json(Duration::from_secs(300))["spiffe_sequence"].as_u64()),
        (vec![pki.root.clone()], Some(3))
    );
    // Staged again, with a short propagation this time.
    write(dir.path(), &second, &second_key, &[&second], &[&pki.root, &next.root]);
    assert!(matches!(ca.reload(Duration::from_millis(300)).unwrap(), Some(Reloaded::Staged { .. })));
    std::thread::sleep(Duration::from_millis(400));
    let chain = ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(60)).unwrap();
    assert_eq!(chain[1], second, "the new chain signs once propagated");
    assert_conforms(&chain, &leaf_key, &ca.roots());
}

#[test]
fn plugged_files_are_all_or_none() {
    let dir = tempfile::tempdir().unwrap();
    assert!(!plugged_files_present(dir.path()).unwrap());
    assert!(!plugged_files_present(&dir.path().join("absent")).unwrap());
    std::fs::write(dir.path().join(CA_CERT), "").unwrap();
    let error = plugged_files_present(dir.path()).unwrap_err().to_string();
    assert!(error.contains("ca-key.pem, cert-chain.pem, root-cert.pem missing"), "{error}");
    for file in PLUGGED_FILES {
        std::fs::write(dir.path().join(file), "").unwrap();
    }
    assert!(plugged_files_present(dir.path()).unwrap());
}

/// Roots of a rotation with the same name: the key identifiers pick the one
/// that issued the chain, so the new root is staged, and the old one's
/// expiry does not bound the new chain.
#[test]
fn same_named_roots_are_told_apart_by_key_identifier() {
    let (pki, dir, state) = (Pki::new("corp root"), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, first_key) = pki.intermediate(|_| {});
    write(dir.path(), &first, &first_key, &[&first], &[&pki.root]);
    let ca = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").unwrap();
    let next = Pki::new("corp root");
    let (second, second_key) = next.intermediate(|_| {});
    write(dir.path(), &second, &second_key, &[&second], &[&pki.root, &next.root]);
    let staged = ca.reload(Duration::from_secs(60)).unwrap();
    assert!(matches!(staged, Some(Reloaded::Staged { .. })), "the new root, same name, is staged");
}
