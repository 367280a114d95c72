//! The admin endpoint (default 127.0.0.1:15020):
//!
//! - `/metrics`: Prometheus metrics (OpenMetrics text);
//! - `/healthz/ready`: 200 once the kernel programs are attached and every
//!   enrolled pod's certificate is loaded, 503 with the reasons before;
//! - `/config_dump`: the state the agent acts on (no private keys);
//! - `/certs`: every identity held, with serial, validity and chain (each
//!   signer summarized), and the roots the agent trusts.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

use ambit_identity::{ca::pem, svid::summarize, tls::TrustBundle};
use ambit_runtime::{listener::accept_next, metrics::Metrics};

use crate::{capture::CaptureCounters, proxy::ProxyContext};

/// A pod the agent captures, as the admin endpoint shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EnrolledPod {
    pub pod: String,
    pub identity: String,
    pub ips: Vec<std::net::IpAddr>,
    pub netns_cookie: u64,
}

/// The enrolled pods with no valid certificate yet, one line each.
pub fn missing_certificates(ctx: &ProxyContext, enrolled: &[EnrolledPod]) -> Vec<String> {
    let held = ctx.certs.held();
    let now = SystemTime::now();
    enrolled
        .iter()
        .filter(|pod| {
            !held
                .iter()
                .any(|(id, svid)| id.to_string() == pod.identity && svid.as_ref().is_some_and(|s| s.is_valid_at(now)))
        })
        .map(|pod| format!("  {}: no valid certificate for {} yet", pod.pod, pod.identity))
        .collect()
}

pub struct Admin {
    pub node: String,
    pub ctx: Arc<ProxyContext>,
    pub capture: Arc<CaptureCounters>,
    pub enrolled: watch::Receiver<Vec<EnrolledPod>>,
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, _) = accept_next(&listener, "admin").await;
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.route(&request)) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    }

    fn route(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        match request.uri().path() {
            "/metrics" => {
                self.refresh_gauges();
                reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics().encode(),
                )
            }
            "/healthz/ready" => match self.not_ready() {
                reasons if reasons.is_empty() => reply(StatusCode::OK, "text/plain", "ready\n".into()),
                reasons => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready:\n{}\n", reasons.join("\n")),
                ),
            },
            "/config_dump" => json(self.config_dump()),
            "/certs" => json(self.certs()),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "endpoints: /metrics /healthz/ready /config_dump /certs\n".into(),
            ),
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.ctx.metrics
    }

    /// Gauges read at scrape time: the kernel counters and the enrolment count.
    fn refresh_gauges(&self) {
        for (name, value) in self.capture.read() {
            self.metrics().capture_events.get_or_create(&Metrics::name(name)).set(value as i64);
        }
        self.metrics().enrolled_pods.set(self.enrolled.borrow().len() as i64);
    }

    /// Why the agent is not ready; empty when it is.
    fn not_ready(&self) -> Vec<String> {
        missing_certificates(&self.ctx, &self.enrolled.borrow())
    }

    fn config_dump(&self) -> serde_json::Value {
        let state = self.ctx.state.borrow().clone();
        serde_json::json!({
            "node": self.node,
            "trust_domain": self.ctx.trust.trust_domain(),
            "enrolled": *self.enrolled.borrow(),
            "state": state.snapshot(),
        })
    }

    fn certs(&self) -> serde_json::Value {
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let identities: Vec<serde_json::Value> = self
            .ctx
            .certs
            .held()
            .into_iter()
            .map(|(identity, svid)| match svid {
                Some(svid) => serde_json::json!({
                    "identity": identity.to_string(),
                    "serial": svid.serial,
                    "not_before": unix(svid.not_before),
                    "not_after": unix(svid.not_after),
                    "chain": svid.chain.iter().map(|c| pem("CERTIFICATE", c)).collect::<Vec<_>>(),
                    "signers": svid.chain[1..].iter().filter_map(|c| summarize(c).ok()).collect::<Vec<_>>(),
                }),
                None => serde_json::json!({ "identity": identity.to_string(), "serial": null }),
            })
            .collect();
        let bundle = |bundle: &TrustBundle| {
            let roots: Vec<_> = bundle.roots().iter().filter_map(|c| summarize(c).ok()).collect();
            serde_json::json!({ "trust_domain": bundle.trust_domain, "roots": roots })
        };
        let federated: Vec<_> = self.ctx.trust.foreign().values().map(bundle).collect();
        serde_json::json!({
            "now": unix(SystemTime::now()),
            "identities": identities,
            "trust_bundle": bundle(&self.ctx.trust.local()),
            "federated_bundles": federated,
        })
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn json(value: serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(&value).expect("serializable");
    reply(StatusCode::OK, "application/json", body + "\n")
}
