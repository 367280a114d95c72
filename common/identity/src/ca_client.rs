//! The agent's identity provider for the embedded CA: generates each key
//! locally, sends a certificate request with the caller's token, and checks
//! what comes back before using it. The token is read from its file for
//! every request: a projected service-account token is rotated in place.

use std::{path::PathBuf, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::TlsConnector;

use super::{
    Identity, IdentityError, IdentityProvider, ProviderFuture, Svid,
    ca_server::{CA_NAMESPACE, CA_SERVICE_ACCOUNT, SvidRequest, SvidResponse, read_body},
};
use crate::tls::{self, TrustStore};

const CA_TIMEOUT: Duration = Duration::from_secs(10);

pub struct CaClient {
    /// `host:port`; a name is resolved at every connection, so a CA
    /// Service that moves is followed.
    addr: String,
    server_name: ServerName<'static>,
    node: String,
    token_file: PathBuf,
    trust: TrustStore,
    tls: Arc<rustls::ClientConfig>,
}

impl CaClient {
    /// A client of the CA at `addr`, for `node`, presenting the token in
    /// `token_file` (a node token, or a projected service-account token).
    pub fn new(addr: &str, node: String, token_file: PathBuf, trust: &TrustStore) -> anyhow::Result<Self> {
        let host = match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => host,
            _ => anyhow::bail!(
                "--ca-addr {addr}: give host:port, e.g. ambit-ca.ambit-system.svc:15012 or 10.0.0.10:15012"
            ),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| anyhow::anyhow!("--ca-addr {addr}: {host} is not a host name or address: {e}"))?;
        let ca_identity = Identity::new(trust.trust_domain(), CA_NAMESPACE, CA_SERVICE_ACCOUNT);
        let tls = tls::client_config(None, trust, ca_identity.spiffe_id())?;
        let client =
            Self { addr: addr.to_string(), server_name, node, token_file, trust: trust.clone(), tls: Arc::new(tls) };
        // A token file that cannot be read is a start-up error, not a
        // renewal that fails later.
        client.token()?;
        Ok(client)
    }

    fn token(&self) -> Result<String, IdentityError> {
        match std::fs::read_to_string(&self.token_file) {
            Ok(token) => Ok(token.trim().to_string()),
            Err(e) => Err(IdentityError::Token { path: self.token_file.display().to_string(), reason: e.to_string() }),
        }
    }

    async fn request(&self, identity: &Identity) -> Result<Svid, IdentityError> {
        let crypto = |e: rcgen::Error| IdentityError::Crypto(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(|_| IdentityError::Crypto(format!("{identity} is not a URI")))?,
        )];
        let csr = params.serialize_request(&key).map_err(crypto)?;
        let body = serde_json::to_vec(&SvidRequest {
            node: self.node.clone(),
            token: self.token()?,
            namespace: identity.namespace.clone(),
            service_account: identity.service_account.clone(),
            csr: STANDARD.encode(csr.der()),
        })
        .expect("serializable");

        let unreachable = |reason: String| IdentityError::Unreachable { addr: self.addr.clone(), reason };
        let exchange = async {
            let tcp =
                tokio::net::TcpStream::connect(self.addr.as_str()).await.map_err(|e| unreachable(e.to_string()))?;
            let tls = TlsConnector::from(self.tls.clone())
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| unreachable(format!("TLS: {e}")))?;
            let (mut client, conn) = h2::client::handshake(tls).await.map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(conn);
            let request = http::Request::post(format!("https://{}/v1/svid", self.addr))
                .header("content-type", "application/json")
                .body(())
                .expect("valid request");
            let (response, mut stream) = client.send_request(request, false).map_err(|e| unreachable(e.to_string()))?;
            stream.send_data(Bytes::from(body), true).map_err(|e| unreachable(e.to_string()))?;
            let response = response.await.map_err(|e| unreachable(e.to_string()))?;
            let status = response.status();
            let body = read_body(response.into_body(), 256 * 1024).await.map_err(|e| unreachable(e.to_string()))?;
            Ok::<_, IdentityError>((status, body))
        };
        let (status, body) = tokio::time::timeout(CA_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {CA_TIMEOUT:?}")))??;
        let refused = |reason: String| IdentityError::Refused { identity: identity.to_string(), reason };
        if !status.is_success() {
            let reason = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("HTTP {status}"));
            return Err(refused(reason));
        }
        let response: SvidResponse =
            serde_json::from_slice(&body).map_err(|e| refused(format!("bad response: {e}")))?;
        let invalid = |reason: String| IdentityError::InvalidSvid { identity: identity.to_string(), reason };
        let chain = response
            .chain
            .iter()
            .map(|c| STANDARD.decode(c).map(CertificateDer::from))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        tls::verify_issued(&self.trust.local(), &chain).map_err(invalid)?;
        Svid::from_chain(identity, chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()), self.trust.trust_domain())
            .map_err(invalid)
    }
}

impl IdentityProvider for CaClient {
    fn fetch<'a>(&'a self, identity: &'a Identity) -> ProviderFuture<'a> {
        Box::pin(self.request(identity))
    }
}
