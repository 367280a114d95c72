//! `ambit-waypoint`: the L7 proxy of the services that declare a waypoint.
//!
//! It runs as a workload of its own, with its own SVID. It accepts only HBONE
//! on its pod's port 15008: source tunnels send it the streams of clients
//! calling a service that uses it, presenting the client pod's SVID. Inside
//! each CONNECT stream (`:authority` = the service address) it serves
//! HTTP/1.1 or HTTP/2, and for every request it normalizes the path,
//! authenticates the end user (RequestAuthentication JWT), authorizes
//! (AuthorizationPolicies that target its Gateway or the Service), and
//! forwards the request over HBONE to one of the service's endpoints,
//! presenting its own SVID. It never dials an endpoint any other way.
#![forbid(unsafe_code)]

mod io;
mod jwks;
mod upstream;

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ambit_authz::{
    Connection, Peer,
    jwt::JwtVerifier,
    request::{PathEscapes, PathRules, Request as PolicyRequest, normalize_path, request_host},
};
use ambit_config::{ConfigDir, Update, Updates, log_errors, watch_dir};
use ambit_hbone::{
    DEFAULT_POOL_IDLE_TIMEOUT, HBONE_PORT, HbonePool,
    server::{Accepted, accept, connect_target},
};
use ambit_identity::{Identity, ca_client::CaClient, federation::Federations, manager::CertManager, tls};
use ambit_kube::{Options, watch_cluster};
use ambit_model::{GATEWAY_NAME_LABEL, Gateway, JwtRule, Scope, Snapshot};
use ambit_runtime::{
    listener::accept_next,
    logging::{self, LogFormat, WarnLimiter},
    metrics::{Metrics, RequestLabels},
};
use ambit_state::{Endpoint, State};
use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use spiffe::SpiffeId;
use tokio::{net::TcpStream, sync::watch as state_watch};

use crate::{
    io::StreamIo,
    jwks::JwksStore,
    upstream::{Dial, HboneConnector},
};

/// Kubernetes mode: how long the waypoint waits for its own pod to have an
/// address in the API.
const OWN_POD_WAIT: Duration = Duration::from_secs(60);

#[derive(Parser)]
#[command(name = "ambit-waypoint", version, about = "ambit waypoint: L7 authorization for the services that use it")]
struct Args {
    /// Standalone mode: the configuration directory (the agents' own).
    #[arg(long, env = "AMBIT_CONFIG_DIR", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config_dir: Option<PathBuf>,
    /// Kubernetes mode: read the objects from the API server (the pod's
    /// service account, or $KUBECONFIG).
    #[arg(long, env = "AMBIT_KUBERNETES")]
    kubernetes: bool,
    /// This waypoint's pod, `namespace/name`, labelled with its Gateway's name.
    #[arg(long, env = "AMBIT_POD")]
    pod: String,
    /// The CA.
    #[arg(long, env = "AMBIT_CA_ADDR")]
    ca_addr: String,
    #[arg(long, env = "AMBIT_CA_ROOT")]
    ca_root: PathBuf,
    /// What the waypoint presents to the CA; it obtains the waypoint's own
    /// identity only. In standalone mode a token from `ambit-agent ca token
    /// --node N --identity NAMESPACE/SERVICE_ACCOUNT` (never the node's own);
    /// in Kubernetes mode its projected service-account token (audience
    /// `ambit-ca`).
    #[arg(long, env = "AMBIT_CA_TOKEN_FILE")]
    ca_token_file: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Merge runs of `/` in request paths before policies see them.
    #[arg(long)]
    merge_slashes: bool,
    /// Paths with `%2F`, `%5C`, `\` or `;` parameters, which applications
    /// read differently: `reject` (400) or `normalize` (decode them to `/`,
    /// drop the parameters, and forward that path).
    #[arg(long, default_value = "reject", value_parser = parse_path_escapes)]
    path_escapes: PathEscapes,
    /// CA certificates (PEM) trusted for https JWKS servers, besides the system's.
    #[arg(long)]
    jwks_ca: Option<PathBuf>,
    /// The only directory `file://` JWKS are read from (regular files of at
    /// most 1 MiB); without it, `file://` key sets are refused.
    #[arg(long)]
    jwks_dir: Option<PathBuf>,
    /// How often JWKS are fetched (or read) again, e.g. 20m, 1h, 30s.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    jwks_refresh: Duration,
    /// Serves `/metrics` (Prometheus) here, inside the pod.
    #[arg(long, default_value = "127.0.0.1:15020")]
    admin_addr: SocketAddr,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// `--path-escapes`.
fn parse_path_escapes(value: &str) -> Result<PathEscapes, String> {
    match value {
        "reject" => Ok(PathEscapes::Reject),
        "normalize" => Ok(PathEscapes::Normalize),
        other => Err(format!("`{other}`: give reject or normalize")),
    }
}

const X_FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the waypoint acts on, rebuilt on every configuration change.
struct View {
    state: State,
    jwt: JwtVerifier,
}

struct Waypoint {
    gateway: Gateway,
    identity: Identity,
    dial: Arc<Dial>,
    /// Pooled upstream HTTP/1.1 connections, each an HBONE stream.
    client: Client<HboneConnector, Incoming>,
    metrics: Arc<Metrics>,
    path_rules: PathRules,
    jwks: Arc<JwksStore>,
    next_endpoint: AtomicUsize,
    server_tls: Mutex<Option<(String, Arc<rustls::ServerConfig>)>>,
    /// Rate limit for refused HBONE connections' warnings.
    warnings: WarnLimiter,
}

/// The configuration's next snapshot, its errors logged; `None` once the
/// source has stopped.
async fn next_snapshot(updates: &mut Updates) -> Option<Snapshot> {
    let Update { snapshot, errors } = updates.next().await?;
    log_errors(&errors);
    Some(snapshot)
}

fn view(snapshot: Snapshot, trust_domain: &str, gateway: &Gateway) -> View {
    let target = format!("Gateway/{}", gateway.name);
    let rules: Vec<JwtRule> = snapshot
        .request_authentications
        .iter()
        .filter(|ra| {
            ra.namespace == gateway.namespace && matches!(&ra.scope, Scope::TargetRefs(t) if t.contains(&target))
        })
        .flat_map(|ra| ra.rules.iter().cloned())
        .collect();
    View { state: State::new(snapshot, trust_domain), jwt: JwtVerifier::new(rules) }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let trust = tls::TrustStore::new(tls::load_bundle(&args.ca_root, &args.trust_domain)?);
    tokio::spawn(tls::follow_bundle_file(args.ca_root.clone(), trust.clone()));
    let (mut updates, source) = match &args.config_dir {
        Some(dir) => (
            watch_dir(ConfigDir::new(dir))
                .with_context(|| format!("--config-dir {}: cannot watch it", dir.display()))?,
            dir.display().to_string(),
        ),
        None => (watch_cluster(ambit_kube::client().await?, Options::default()), "the API server".to_string()),
    };
    let mut snapshot = next_snapshot(&mut updates).await.context("the configuration source stopped")?;
    if args.kubernetes {
        // Kubelet writes the pod's address only once its sandbox is up.
        let deadline = tokio::time::Instant::now() + OWN_POD_WAIT;
        while !snapshot.pods.contains_key(&args.pod) {
            match tokio::time::timeout_at(deadline, next_snapshot(&mut updates)).await {
                Ok(Some(next)) => snapshot = next,
                Ok(None) => bail!("the configuration source stopped"),
                Err(_) => break,
            }
        }
    }
    let pod = snapshot
        .pods
        .get(&args.pod)
        .with_context(|| format!("--pod {}: no such pod (with an address) in {source}", args.pod))?
        .clone();
    let Some(gateway_name) = pod.labels.get(GATEWAY_NAME_LABEL) else {
        bail!("--pod {}: not a waypoint pod; label it {GATEWAY_NAME_LABEL}: <gateway>", args.pod);
    };
    let gateway_id = format!("{}/{gateway_name}", pod.namespace);
    let Some(gateway) = snapshot.gateways.get(&gateway_id).cloned() else {
        bail!("--pod {}: Gateway {gateway_id} is not in the configuration", args.pod);
    };
    let listen = SocketAddr::new(*pod.ips.first().context("the waypoint pod has no IP")?, HBONE_PORT);
    let identity = Identity::new(&args.trust_domain, &pod.namespace, &pod.service_account);
    let metrics = Arc::new(Metrics::new());
    let provider = CaClient::new(&args.ca_addr, pod.node.clone(), args.ca_token_file.clone(), &trust)?;
    let certs = CertManager::new(Arc::new(provider), metrics.clone());
    let mut svid = certs.acquire(&identity, &args.pod);
    svid.wait_for(Option::is_some).await.context("certificate manager stopped")?;

    let jwks = JwksStore::new(args.jwks_ca.as_deref(), args.jwks_dir.clone(), args.jwks_refresh)?;
    let first = view(snapshot, &args.trust_domain, &gateway);
    jwks.want(first.jwt.fetched_uris());
    // Callers of federated trust domains are verified as the agents verify them.
    let federations = Federations::new(trust.clone());
    federations.follow(&first.state.federations());
    let (view_tx, view_rx) = state_watch::channel(Arc::new(first));
    let trust_domain = args.trust_domain.clone();
    let gateway_for_reload = gateway.clone();
    let jwks_for_reload = jwks.clone();
    tokio::spawn(async move {
        while let Some(snapshot) = next_snapshot(&mut updates).await {
            let next = view(snapshot, &trust_domain, &gateway_for_reload);
            jwks_for_reload.want(next.jwt.fetched_uris());
            federations.follow(&next.state.federations());
            view_tx.send_replace(Arc::new(next));
            tracing::info!("configuration applied");
        }
    });

    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
    let admin = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("--admin-addr {}: cannot listen", args.admin_addr))?;
    tokio::spawn(serve_metrics(admin, metrics.clone()));
    let dial = Arc::new(Dial {
        ip: listen.ip(),
        svid,
        trust,
        view: view_rx,
        pool: HbonePool::new(metrics.clone(), DEFAULT_POOL_IDLE_TIMEOUT),
    });
    let client = Client::builder(TokioExecutor::new()).build(HboneConnector(dial.clone()));
    let waypoint = Arc::new(Waypoint {
        gateway,
        identity,
        dial,
        client,
        path_rules: PathRules { merge_slashes: args.merge_slashes, escapes: args.path_escapes },
        jwks,
        next_endpoint: AtomicUsize::new(0),
        server_tls: Mutex::new(None),
        warnings: WarnLimiter::new(metrics.clone()),
        metrics,
    });
    tracing::info!(gateway = %gateway_id, %listen, identity = %waypoint.identity, "waypoint ready");
    loop {
        let (tcp, peer) = accept_next(&listener, "hbone").await;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(waypoint.clone().connection(tcp, peer));
    }
}

impl Waypoint {
    fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        let svid = self.dial.svid.borrow().clone()?;
        let mut cached = self.server_tls.lock().expect("server tls lock");
        if let Some((_, config)) = cached.as_ref().filter(|(serial, _)| *serial == svid.serial) {
            return Some(config.clone());
        }
        let config = Arc::new(tls::server_config(&svid, &self.dial.trust).ok()?);
        *cached = Some((svid.serial.clone(), config.clone()));
        Some(config)
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let Some(config) = self.server_tls() else { return };
        let owner = self.dial.view.borrow().state.identity_at(peer.ip());
        let Accepted { mut conn, peer_id, .. } = match accept(tcp, peer, owner, config, &self.metrics).await {
            Ok(accepted) => accepted,
            Err(reason) => {
                if let Some(suppressed) = self.warnings.admit(peer.ip(), "hbone_rejected", &reason) {
                    let suppressed = (suppressed > 0).then_some(suppressed);
                    tracing::warn!(src_addr = %peer, error = %reason, suppressed, "HBONE connection rejected");
                }
                return;
            }
        };
        while let Some(Ok((request, respond))) = conn.accept().await {
            tokio::spawn(self.clone().stream(request, respond, peer_id.clone(), peer));
        }
    }

    /// One CONNECT stream: a client's connection to a service, carrying HTTP.
    async fn stream(
        self: Arc<Self>,
        request: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        client: SpiffeId,
        peer: SocketAddr,
    ) {
        let refuse = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
            let _ = respond.send_response(Response::builder().status(status).body(()).expect("valid"), true);
        };
        let authority = connect_target(&request);
        let gateway = self.gateway.id();
        let known = authority
            .and_then(|addr| self.dial.view.borrow().state.waypoint_target(&gateway, addr).map(|(svc, _)| (addr, svc)));
        let (Method::CONNECT, Some((target, service))) = (request.method().clone(), known) else {
            tracing::warn!(src_identity = %client, authority = ?request.uri().authority(), "not a CONNECT to a service or pod that uses this waypoint");
            return refuse(&mut respond, StatusCode::BAD_REQUEST);
        };
        let Ok(send) =
            respond.send_response(Response::builder().status(StatusCode::OK).body(()).expect("valid"), false)
        else {
            return;
        };
        let downstream = StreamIo::new(send, request.into_body());
        let caller = Arc::new(Caller { identity: client, ip: peer.ip(), target, service });
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| this.clone().request(req, caller.clone()));
        if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(downstream), service)
            .await
        {
            tracing::debug!(error = %e, "downstream HTTP connection ended");
        }
    }

    /// One HTTP request: normalize, authenticate, authorize, forward.
    async fn request(
        self: Arc<Self>,
        req: Request<Incoming>,
        caller: Arc<Caller>,
    ) -> Result<Response<BoxBody<Bytes, hyper::Error>>, Infallible> {
        let started = Instant::now();
        let view = self.dial.view.borrow().clone();
        let method = req.method().to_string();
        let raw_path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        let mut log = AccessLog {
            caller: &caller,
            metrics: &self.metrics,
            method: &method,
            path: raw_path.clone(),
            principal: None,
            policy: None,
            started,
        };
        let path = match normalize_path(&raw_path, self.path_rules) {
            Ok(path) => path,
            Err(e) => return Ok(log.local(StatusCode::BAD_REQUEST, &format!("bad path: {e}"))),
        };
        log.path = path.clone();
        let mut auth = view.jwt.authenticate(req.headers(), &self.jwks.keys());
        if let Some(uri) = auth.as_ref().err().and_then(|e| e.refetch_uri()) {
            self.jwks.refetch(uri).await;
            auth = view.jwt.authenticate(req.headers(), &self.jwks.keys());
        }
        let auth = match auth {
            Ok(auth) => auth,
            Err(e) => return Ok(log.local(StatusCode::UNAUTHORIZED, &format!("Jwt is not valid: {e}"))),
        };
        log.principal = auth.as_ref().map(|a| a.principal.clone());
        let host = match request_host(req.headers(), req.uri().authority().map(|a| a.as_str())) {
            Ok(host) => host,
            Err(e) => return Ok(log.local(StatusCode::BAD_REQUEST, &format!("bad host: {e}"))),
        };
        let forward_token = auth.as_ref().is_none_or(|a| a.forward_token);
        let conn = Connection {
            peer: Some(Peer::from_spiffe_id(&caller.identity)),
            src_ip: Some(caller.ip),
            dst_ip: Some(caller.target.ip()),
            dst_port: Some(caller.target.port()),
            request: Some(PolicyRequest {
                method: method.clone(),
                host,
                path: path.clone(),
                headers: req.headers().clone(),
                auth,
            }),
        };
        // Policies on the Gateway apply to all its traffic; those on a
        // Service, to that service's.
        let mut targets = vec![format!("{}/Gateway/{}", self.gateway.namespace, self.gateway.name)];
        if let Some((ns, name)) = caller.service.as_deref().and_then(|s| s.split_once('/')) {
            targets.push(format!("{ns}/Service/{name}"));
        }
        let decision = view.state.policies().evaluate_targets(&targets, &conn);
        log.policy = decision.reason.rule().map(ToString::to_string);
        if !decision.allows() {
            return Ok(log.local(StatusCode::FORBIDDEN, &format!("RBAC: access denied ({})", decision.reason)));
        }
        let Some((_, endpoints)) = view.state.waypoint_target(&self.gateway.id(), caller.target) else {
            return Ok(
                log.local(StatusCode::SERVICE_UNAVAILABLE, "the destination is gone, or no longer uses this waypoint")
            );
        };
        let mut req = req;
        let headers = req.headers_mut();
        // The verified token stays here unless the rule says otherwise, and
        // the app learns the caller's address from the waypoint, not from
        // headers the caller wrote.
        if !forward_token {
            headers.remove(header::AUTHORIZATION);
        }
        headers.remove(header::FORWARDED);
        headers.insert(X_FORWARDED_FOR, HeaderValue::try_from(caller.ip.to_string()).expect("an IP is a header value"));
        match self.forward(req, &path, &endpoints).await {
            Ok((response, endpoint)) => {
                log.done(response.status(), &endpoint);
                Ok(response.map(|body| body.boxed()))
            }
            Err(e) => Ok(log.local(StatusCode::SERVICE_UNAVAILABLE, &format!("upstream: {e:#}"))),
        }
    }

    /// Sends the request, with the normalized path, to an endpoint (round
    /// robin) over a pooled HBONE stream, as the waypoint's own identity.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        path: &str,
        endpoints: &[Endpoint],
    ) -> anyhow::Result<(Response<Incoming>, String)> {
        if endpoints.is_empty() {
            bail!("the service has no endpoints");
        }
        let endpoint = &endpoints[self.next_endpoint.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
        // The pool is keyed by this URI; upstream gets the origin form.
        let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
        let authority = req.uri().authority().map(|a| a.to_string());
        *req.uri_mut() = Uri::try_from(format!("http://{}{path}{query}", endpoint.addr))?;
        *req.version_mut() = http::Version::HTTP_11;
        if let (false, Some(authority)) = (req.headers().contains_key(header::HOST), authority) {
            req.headers_mut().insert(header::HOST, HeaderValue::try_from(authority)?);
        }
        for hop in ["connection", "keep-alive", "proxy-connection", "upgrade", "te"] {
            req.headers_mut().remove(hop);
        }
        Ok((self.client.request(req).await?, endpoint.workload.clone()))
    }
}

/// `/metrics` for Prometheus; every other path is 404.
async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (tcp, _) = accept_next(&listener, "metrics").await;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/metrics" => (StatusCode::OK, metrics.encode()),
                    _ => (StatusCode::NOT_FOUND, "endpoints: /metrics\n".to_string()),
                };
                async move { Response::builder().status(status).body(Full::new(Bytes::from(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

struct Caller {
    identity: SpiffeId,
    ip: IpAddr,
    /// The CONNECT `:authority`: a service address or a pod address.
    target: SocketAddr,
    /// `namespace/name` when `target` is a service.
    service: Option<String>,
}

/// One access-log line per request.
struct AccessLog<'a> {
    caller: &'a Caller,
    metrics: &'a Metrics,
    method: &'a str,
    path: String,
    principal: Option<String>,
    /// The policy rule that decided (`namespace/name rule N`), if one did.
    policy: Option<String>,
    started: Instant,
}

impl AccessLog<'_> {
    /// Answers locally (refusals and failures) and logs why.
    fn local(&self, status: StatusCode, reason: &str) -> Response<BoxBody<Bytes, hyper::Error>> {
        self.write(status, "-", Some(reason));
        let body = match status {
            StatusCode::FORBIDDEN => "RBAC: access denied\n",
            StatusCode::UNAUTHORIZED => "Jwt is not valid\n",
            StatusCode::BAD_REQUEST => "bad request\n",
            _ => "upstream unavailable\n",
        };
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {}).boxed())
            .expect("valid response")
    }

    fn done(&self, status: StatusCode, endpoint: &str) {
        self.write(status, endpoint, None);
    }

    fn write(&self, status: StatusCode, endpoint: &str, reason: Option<&str>) {
        let labels = RequestLabels {
            reporter: "waypoint".into(),
            source_principal: self.caller.identity.to_string(),
            destination_service: self.caller.service.clone().unwrap_or_else(|| "unknown".into()),
            response_code: status.as_u16().to_string(),
        };
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics.request_duration.get_or_create(&labels).observe(self.started.elapsed().as_secs_f64() * 1000.0);
        tracing::info!(
            target: "ambit::request",
            method = self.method,
            path = %self.path,
            status = status.as_u16(),
            src_identity = %self.caller.identity,
            src_addr = %self.caller.ip,
            request_principal = self.principal.as_deref().unwrap_or("-"),
            dst_service = self.caller.service.as_deref().unwrap_or("-"),
            dst_workload = endpoint,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            policy = self.policy.as_deref().unwrap_or("-"),
            reason = reason.unwrap_or("-"),
            "request"
        );
    }
}
