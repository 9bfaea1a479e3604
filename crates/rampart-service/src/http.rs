//! The service's HTTP endpoint: `/metrics` (Prometheus / OpenMetrics text), `/healthz` (the
//! processing loop is alive), `/readyz` (consuming, and the broker acknowledges decisions),
//! and the operator's `POST /admin/revoke`, `/admin/rearm` and `/admin/reload`, which the
//! processing loop carries out between two micro-batches. Admin commands need a bearer token
//! ([`crate::auth`]); the other paths are open and show nothing secret. With `[service]
//! tls_certificate` and `tls_key` it serves HTTPS only ([`crate::tls`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use rampart_engine::pipeline::config::TlsFiles;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Access, Tokens};
use crate::metrics::{Health, Metrics, RefusalLabels, now_ms};
use crate::tls;

/// The processing loop counts as dead when it has not gone round for this long.
const STALL_MS: i64 = 30_000;
/// Connections served at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 256;
/// A TLS handshake that takes longer is given up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request whose headers take longer to arrive is given up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (kept alive across requests) is closed after this long.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

const PLAIN: &str = "text/plain; charset=utf-8";

/// An operator's command, for the processing loop.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AdminCommand {
    /// Lift `actor`'s blocks and holds (from `detector`, or all) and publish the revocation.
    Revoke {
        /// The actor.
        actor: String,
        /// Only this detector's blocks.
        detector: Option<String>,
        /// Why (goes into the decision's reason and the audit log).
        reason: String,
    },
    /// Take a detector out of the fail-safe's shadow.
    Rearm {
        /// The detector id.
        detector: String,
    },
    /// Reload the pipeline directory now.
    Reload,
}

/// Who sent an admin command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Operator {
    /// The name of the token they presented.
    pub name: String,
    /// The client's address.
    pub from: String,
    /// What they wrote in `by=` (their own words: a note, not an identity).
    pub note: Option<String>,
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} from {}", self.name, self.from)?;
        match &self.note {
            Some(note) => write!(f, " (by={note})"),
            None => Ok(()),
        }
    }
}

/// A command with who sent it and where the answer goes.
#[derive(Debug)]
pub struct AdminRequest {
    /// The command.
    pub command: AdminCommand,
    /// Who sent it.
    pub operator: Operator,
    /// The HTTP status and body to answer with.
    pub reply: mpsc::Sender<(u16, String)>,
}

/// A running HTTP endpoint; stops when dropped.
pub struct Endpoint {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// The address it listens on (the port resolved when `:0` was asked for).
    pub address: String,
    /// `https` when it serves TLS, `http` otherwise.
    pub scheme: &'static str,
}

/// What every request may need, shared by the connections.
struct Shared {
    registry: Registry,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    admin: mpsc::Sender<AdminRequest>,
    tokens: Tokens,
}

impl Endpoint {
    /// Serves `metrics` and `health` on `listen` (e.g. `127.0.0.1:9464`), over TLS with the
    /// certificate and key files of `tls` if given, and admin commands to the holders of
    /// `tokens`.
    pub fn start(
        listen: &str,
        tls: Option<&TlsFiles>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        admin: mpsc::Sender<AdminRequest>,
        tokens: Tokens,
    ) -> Result<Self, String> {
        let listener =
            std::net::TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let address = listener
            .local_addr()
            .map_or_else(|_| listen.to_string(), |a| a.to_string());
        let acceptor = tls.map(tls::acceptor).transpose()?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
        let shared = Arc::new(Shared {
            registry: metrics.registry(),
            metrics,
            health,
            admin,
            tokens,
        });
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("rampart-http".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let serving = std::pin::pin!(accept(listener, acceptor, shared));
                    future::select(serving, stopped).await;
                });
                // An admin command still waiting for the processing loop is not waited for.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| format!("cannot start the HTTP thread: {e}"))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            address,
            scheme,
        })
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts connections (at most [`MAX_CONNECTIONS`] at a time) and serves each on its own
/// task, after a TLS handshake if `acceptor` is given.
async fn accept(listener: std::net::TcpListener, acceptor: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "the HTTP endpoint cannot accept connections"),
    };
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "the HTTP endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!(%from, "HTTP connection refused: {MAX_CONNECTIONS} are open");
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (acceptor, shared, open) = (acceptor.clone(), Arc::clone(&shared), Arc::clone(&open));
        tokio::spawn(async move {
            let served = async {
                match acceptor {
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => serve_connection(tls, from, shared).await,
                            Ok(Err(e)) => tracing::debug!(%from, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%from, "TLS handshake timed out"),
                        }
                    }
                    None => serve_connection(stream, from, shared).await,
                }
            };
            if tokio::time::timeout(CONNECTION_LIFETIME, served).await.is_err() {
                tracing::debug!(%from, "HTTP connection closed after {CONNECTION_LIFETIME:?}");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Serves HTTP/1.1 (and 1.0) requests on one connection.
async fn serve_connection<S>(io: S, from: SocketAddr, shared: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| respond(request, from, Arc::clone(&shared)));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = connection.await {
        tracing::debug!(%from, error = %e, "HTTP connection ended");
    }
}

/// One request's answer, worked out on a blocking thread: an admin command waits for the
/// processing loop.
async fn respond(
    request: hyper::Request<Incoming>,
    from: SocketAddr,
    shared: Arc<Shared>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let asked = Asked {
        post: request.method() == Method::POST,
        path: request.uri().path().to_string(),
        query: request.uri().query().unwrap_or_default().to_string(),
        authorization: request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        from: from.to_string(),
    };
    let (status, content_type, body) = tokio::task::spawn_blocking(move || answer(&shared, &asked))
        .await
        .unwrap_or_else(|e| (500, PLAIN, format!("the request failed: {e}\n")));
    let mut response = hyper::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type);
    if status == 401 {
        response = response.header(header::WWW_AUTHENTICATE, "Bearer realm=\"rampart\"");
    }
    Ok(response
        .body(Full::new(Bytes::from(body)))
        .expect("a status and headers that are valid"))
}

/// What an answer depends on in a request.
struct Asked {
    post: bool,
    path: String,
    query: String,
    authorization: Option<String>,
    from: String,
}

/// The status, content type and body answering `asked`.
fn answer(shared: &Shared, asked: &Asked) -> (u16, &'static str, String) {
    let Shared {
        registry,
        metrics,
        health,
        admin,
        tokens,
    } = shared;
    match asked.path.as_str() {
        p if p.starts_with("/admin/") => {
            let (status, body) = match tokens.check(asked.authorization.as_deref()) {
                Access::Granted(name) if asked.post => {
                    handle_admin(p, &asked.query, name, asked.from.clone(), admin)
                }
                Access::Granted(_) => (405, "admin commands are POST requests\n".to_string()),
                refused => refuse(&refused, p, &asked.from, metrics),
            };
            (status, PLAIN, body)
        }
        "/metrics" => {
            metrics.ready.set(i64::from(ready(health).is_ok()));
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(e) => (500, PLAIN, format!("cannot encode metrics: {e}\n")),
            }
        }
        "/healthz" => {
            let age = now_ms() - health.heartbeat_ms.load(Ordering::Relaxed);
            if age <= STALL_MS {
                (200, PLAIN, "ok\n".to_string())
            } else {
                let why = format!("the processing loop has not run for {} s\n", age / 1000);
                (503, PLAIN, why)
            }
        }
        "/readyz" => {
            let notes: String = health.notes().iter().map(|n| format!("{n}\n")).collect();
            match ready(health) {
                Ok(()) => (200, PLAIN, format!("ready\n{notes}")),
                Err(why) => (503, PLAIN, format!("not ready: {why}\n{notes}")),
            }
        }
        _ => (
            404,
            PLAIN,
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
    }
}

/// The answer to an admin request without a valid token: 403 when admin commands are off, 401
/// with no detail otherwise. Counted and logged with the client's address.
fn refuse(access: &Access, path: &str, from: &str, metrics: &Metrics) -> (u16, String) {
    metrics
        .admin_refused
        .get_or_create(&RefusalLabels {
            reason: access.reason(),
        })
        .inc();
    tracing::warn!(%from, %path, reason = access.reason(), "admin request refused");
    match access {
        Access::Disabled => (
            403,
            "admin commands are off: no admin token is configured (RAMPART_ADMIN_TOKEN, or \
             [service] admin_tokens in pipeline.toml)\n"
                .into(),
        ),
        _ => (401, "unauthorized\n".into()),
    }
}

/// Parses an admin command, hands it to the processing loop and waits for its answer.
fn handle_admin(
    path: &str,
    query: &str,
    name: String,
    from: String,
    admin: &mpsc::Sender<AdminRequest>,
) -> (u16, String) {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let command = match path {
        "/admin/revoke" => match param("actor") {
            Some(actor) => AdminCommand::Revoke {
                actor,
                detector: param("detector"),
                reason: param("reason").unwrap_or_else(|| "revoked by an operator".into()),
            },
            None => {
                return (
                    400,
                    "revoke needs ?actor=... (and optionally &detector=...&reason=...)\n".into(),
                );
            }
        },
        "/admin/rearm" => match param("detector") {
            Some(detector) => AdminCommand::Rearm { detector },
            None => return (400, "rearm needs ?detector=...\n".into()),
        },
        "/admin/reload" => AdminCommand::Reload,
        _ => {
            return (
                404,
                "unknown admin command: try /admin/revoke, /admin/rearm or /admin/reload\n".into(),
            );
        }
    };
    let operator = Operator {
        name,
        from,
        note: param("by"),
    };
    let (reply, answer) = mpsc::channel();
    if admin
        .send(AdminRequest {
            command,
            operator,
            reply,
        })
        .is_err()
    {
        return (503, "the processing loop has stopped\n".into());
    }
    answer
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| (504, "the processing loop did not answer within 30 s\n".into()))
}

fn ready(health: &Health) -> Result<(), String> {
    if let Some(why) = health.not_ready() {
        return Err(why);
    }
    if health.assigned.load(Ordering::Relaxed) == 0 {
        return Err("no input partition assigned yet".into());
    }
    Ok(())
}
