//! The SPIFFE X.509-SVID rules, checked on certificates the agent is issued
//! and on every certificate a peer presents (after the TLS library has
//! verified the signature chain to the trust bundle).
//!
//! Leaf: exactly one URI SAN, a SPIFFE ID with a path; basicConstraints
//! cA=false; keyUsage present, critical, with digitalSignature and without
//! keyCertSign or cRLSign; extendedKeyUsage with serverAuth and clientAuth
//! (both ends of a mesh hop use the same certificate for both roles).
//! Signing certificates: cA=true and keyCertSign.

use rustls::pki_types::CertificateDer;
use spiffe::SpiffeId;
use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    oid_registry,
    prelude::FromDer,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SvidError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("certificate {index} does not parse as X.509: {reason}")]
    Parse { index: usize, reason: String },
    #[error("the leaf must carry exactly one URI SAN (the SPIFFE ID); it has {0}")]
    UriSanCount(usize),
    #[error("the leaf's URI SAN `{uri}` is not a SPIFFE ID: {reason}")]
    NotSpiffeId { uri: String, reason: String },
    #[error("the leaf's SPIFFE ID {0} has no path; workload SVIDs name a workload")]
    NoPath(String),
    #[error("the leaf is a CA certificate (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("the leaf has no keyUsage extension")]
    MissingKeyUsage,
    #[error("the leaf's keyUsage extension is not marked critical")]
    KeyUsageNotCritical,
    #[error("the leaf's keyUsage lacks digitalSignature")]
    MissingDigitalSignature,
    #[error("the leaf's keyUsage allows keyCertSign or cRLSign; a leaf must not sign")]
    LeafCanSign,
    #[error("the leaf's extendedKeyUsage must include serverAuth and clientAuth")]
    ExtendedKeyUsage,
    #[error("signing certificate {index} is not a CA (basicConstraints cA=true is required)")]
    SignerNotCa { index: usize },
    #[error("signing certificate {index} lacks keyCertSign")]
    SignerCannotSign { index: usize },
    #[error("the SPIFFE ID {id} is not in trust domain {expected}")]
    WrongTrustDomain { id: String, expected: String },
    #[error("signing certificate {index} names {uri}, another trust domain than the leaf's {trust_domain}")]
    SignerOfAnotherTrustDomain { index: usize, uri: String, trust_domain: String },
}

/// Checks a chain (leaf first, then intermediates) and returns the leaf's
/// SPIFFE ID. Does not verify signatures: the TLS verifiers do.
pub fn check_chain(chain: &[CertificateDer<'_>]) -> Result<SpiffeId, SvidError> {
    let (leaf, signers) = chain.split_first().ok_or(SvidError::EmptyChain)?;
    let id = check_leaf(leaf)?;
    for (i, signer) in signers.iter().enumerate() {
        check_signer(signer, i + 1)?;
        // An intermediate that names its trust domain may sign only in it:
        // meshes that share a root stay apart by their intermediates.
        if let Some(uri) = other_trust_domain_named(&parse(signer, i + 1)?, id.trust_domain_name()) {
            let trust_domain = id.trust_domain_name().to_string();
            return Err(SvidError::SignerOfAnotherTrustDomain { index: i + 1, uri, trust_domain });
        }
    }
    Ok(id)
}

/// A `spiffe://` URI SAN of `cert` naming another trust domain than `trust_domain`, if any.
pub fn other_trust_domain_named(cert: &X509Certificate<'_>, trust_domain: &str) -> Option<String> {
    let sans = cert.subject_alternative_name().ok().flatten();
    sans.iter().flat_map(|san| san.value.general_names.iter()).find_map(|name| match name {
        GeneralName::URI(uri)
            if uri.strip_prefix("spiffe://").is_some_and(|rest| rest.split('/').next() != Some(trust_domain)) =>
        {
            Some(uri.to_string())
        }
        _ => None,
    })
}

/// Like [`check_chain`], and the ID must belong to `trust_domain`.
pub fn check_chain_in(chain: &[CertificateDer<'_>], trust_domain: &str) -> Result<SpiffeId, SvidError> {
    let id = check_chain(chain)?;
    if id.trust_domain_name() != trust_domain {
        return Err(SvidError::WrongTrustDomain { id: id.to_string(), expected: trust_domain.to_string() });
    }
    Ok(id)
}

fn parse(der: &[u8], index: usize) -> Result<X509Certificate<'_>, SvidError> {
    X509Certificate::from_der(der).map(|(_, cert)| cert).map_err(|e| SvidError::Parse { index, reason: e.to_string() })
}

pub fn check_leaf(der: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let cert = parse(der, 0)?;
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(SvidError::UriSanCount(uris.len()));
    };
    let id = SpiffeId::new(uri).map_err(|e| SvidError::NotSpiffeId { uri: uri.to_string(), reason: e.to_string() })?;
    if id.path().is_empty() {
        return Err(SvidError::NoPath(id.to_string()));
    }
    if cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::LeafIsCa);
    }
    let key_usage = cert
        .extensions()
        .iter()
        .find(|e| e.oid == oid_registry::OID_X509_EXT_KEY_USAGE)
        .ok_or(SvidError::MissingKeyUsage)?;
    if !key_usage.critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    let ParsedExtension::KeyUsage(usage) = key_usage.parsed_extension() else {
        return Err(SvidError::MissingKeyUsage);
    };
    if !usage.digital_signature() {
        return Err(SvidError::MissingDigitalSignature);
    }
    if usage.key_cert_sign() || usage.crl_sign() {
        return Err(SvidError::LeafCanSign);
    }
    match cert.extended_key_usage().ok().flatten() {
        Some(eku) if eku.value.server_auth && eku.value.client_auth => {}
        _ => return Err(SvidError::ExtendedKeyUsage),
    }
    Ok(id)
}

fn check_signer(der: &CertificateDer<'_>, index: usize) -> Result<(), SvidError> {
    let cert = parse(der, index)?;
    if !cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::SignerNotCa { index });
    }
    if !cert.key_usage().ok().flatten().is_some_and(|ku| ku.value.key_cert_sign()) {
        return Err(SvidError::SignerCannotSign { index });
    }
    Ok(())
}

/// What an operator reads of a certificate: who it is, who signed it, and
/// when it is valid (seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertificateSummary {
    pub subject: String,
    pub issuer: String,
    pub not_before: i64,
    pub not_after: i64,
}

pub fn summarize(der: &CertificateDer<'_>) -> Result<CertificateSummary, SvidError> {
    let cert = parse(der, 0)?;
    Ok(CertificateSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Checks a root (trust anchor) the same way as other signing certificates.
pub fn check_root(der: &CertificateDer<'_>) -> Result<(), SvidError> {
    check_signer(der, 0)
}

#[cfg(test)]
mod tests {
    //! One test per rule: each builds a certificate that breaks exactly that
    //! rule (with rcgen) and expects exactly that error; the certificates
    //! the embedded CA issues pass them all (see `ca::tests`).
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
        SanType,
    };

    fn leaf_params() -> CertificateParams {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI("spiffe://cluster.local/ns/shop/sa/cart".try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params
    }

    fn build(params: CertificateParams) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_well_formed_leaf_passes() {
        let id = check_leaf(&build(leaf_params())).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
    }

    #[test]
    fn two_uri_sans_are_rejected() {
        let mut params = leaf_params();
        params.subject_alt_names.push(SanType::URI("spiffe://cluster.local/ns/shop/sa/other".try_into().unwrap()));
        assert_eq!(check_leaf(&build(params)), Err(SvidError::UriSanCount(2)));
    }

    #[test]
    fn no_uri_san_is_rejected() {
        let mut params = leaf_params();
        params.subject_alt_names = vec![SanType::DnsName("cart.shop".try_into().unwrap())];
        assert_eq!(check_leaf(&build(params)), Err(SvidError::UriSanCount(0)));
    }

    #[test]
    fn non_spiffe_uri_is_rejected() {
        let mut params = leaf_params();
        params.subject_alt_names = vec![SanType::URI("https://cart.shop".try_into().unwrap())];
        assert!(matches!(check_leaf(&build(params)), Err(SvidError::NotSpiffeId { .. })));
    }

    #[test]
    fn id_without_path_is_rejected() {
        let mut params = leaf_params();
        params.subject_alt_names = vec![SanType::URI("spiffe://cluster.local".try_into().unwrap())];
        assert!(matches!(check_leaf(&build(params)), Err(SvidError::NoPath(_))));
    }

    #[test]
    fn ca_leaf_is_rejected() {
        let mut params = leaf_params();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert_eq!(check_leaf(&build(params)), Err(SvidError::LeafIsCa));
    }

    #[test]
    fn missing_key_usage_is_rejected() {
        let mut params = leaf_params();
        params.key_usages = vec![];
        assert_eq!(check_leaf(&build(params)), Err(SvidError::MissingKeyUsage));
    }

    #[test]
    fn non_critical_key_usage_is_rejected() {
        let mut params = leaf_params();
        params.key_usages = vec![];
        // keyUsage = digitalSignature, encoded by hand and marked non-critical.
        let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
        ext.set_criticality(false);
        params.custom_extensions = vec![ext];
        assert_eq!(check_leaf(&build(params)), Err(SvidError::KeyUsageNotCritical));
    }

    #[test]
    fn key_usage_without_digital_signature_is_rejected() {
        let mut params = leaf_params();
        params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        assert_eq!(check_leaf(&build(params)), Err(SvidError::MissingDigitalSignature));
    }

    #[test]
    fn leaf_with_key_cert_sign_or_crl_sign_is_rejected() {
        for extra in [KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign] {
            let mut params = leaf_params();
            params.key_usages.push(extra);
            assert_eq!(check_leaf(&build(params)), Err(SvidError::LeafCanSign));
        }
    }

    #[test]
    fn extended_key_usage_needs_server_and_client_auth() {
        for ekus in [vec![], vec![ExtendedKeyUsagePurpose::ServerAuth], vec![ExtendedKeyUsagePurpose::ClientAuth]] {
            let mut params = leaf_params();
            params.extended_key_usages = ekus;
            assert_eq!(check_leaf(&build(params)), Err(SvidError::ExtendedKeyUsage));
        }
    }

    #[test]
    fn signing_certificates_must_be_cas_that_can_sign() {
        let leaf = build(leaf_params());
        let mut not_ca = CertificateParams::default();
        not_ca.is_ca = IsCa::ExplicitNoCa;
        not_ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        assert_eq!(check_chain(&[leaf.clone(), build(not_ca)]), Err(SvidError::SignerNotCa { index: 1 }));
        let mut cannot_sign = CertificateParams::default();
        cannot_sign.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        cannot_sign.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        assert_eq!(check_chain(&[leaf, build(cannot_sign)]), Err(SvidError::SignerCannotSign { index: 1 }));
    }

    #[test]
    fn an_intermediate_of_another_trust_domain_signs_nothing_here() {
        let leaf = build(leaf_params());
        let mut signer = CertificateParams::default();
        signer.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        signer.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        signer.subject_alt_names = vec![SanType::URI("spiffe://partner.example".try_into().unwrap())];
        assert!(matches!(
            check_chain(&[leaf.clone(), build(signer.clone())]),
            Err(SvidError::SignerOfAnotherTrustDomain { index: 1, .. })
        ));
        signer.subject_alt_names = vec![SanType::URI("spiffe://cluster.local".try_into().unwrap())];
        assert!(check_chain(&[leaf, build(signer)]).is_ok(), "its own trust domain");
    }

    #[test]
    fn wrong_trust_domain_is_rejected() {
        let leaf = build(leaf_params());
        assert!(check_chain_in(std::slice::from_ref(&leaf), "cluster.local").is_ok());
        assert!(matches!(check_chain_in(&[leaf], "other.example"), Err(SvidError::WrongTrustDomain { .. })));
    }
}
