//! The service's HTTP endpoint: `/metrics` (Prometheus / OpenMetrics text), `/healthz` (the
//! processing loop is alive), `/readyz` (consuming, and the broker acknowledges decisions),
//! and the operator's `POST /admin/revoke`, `/admin/rearm` and `/admin/reload`, which the
//! processing loop carries out between two micro-batches. Admin commands need a bearer token
//! ([`crate::auth`]); the other paths are open and show nothing secret.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tiny_http::{Header, Response, Server};

use crate::auth::{Access, Tokens};
use crate::metrics::{Health, Metrics, RefusalLabels, now_ms};

/// The processing loop counts as dead when it has not gone round for this long.
const STALL_MS: i64 = 30_000;

/// An operator's command, for the processing loop.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    /// The address it listens on (the port resolved when `:0` was asked for).
    pub address: String,
}

impl Endpoint {
    /// Serves `metrics` and `health` on `listen` (e.g. `127.0.0.1:9464`), and admin commands
    /// to the holders of `tokens`.
    pub fn start(
        listen: &str,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        admin: mpsc::Sender<AdminRequest>,
        tokens: Tokens,
    ) -> Result<Self, String> {
        let server = Server::http(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let address = server
            .server_addr()
            .to_ip()
            .map_or_else(|| listen.to_string(), |a| a.to_string());
        let server = Arc::new(server);
        let registry = metrics.registry();
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("rampart-http".into())
            .spawn(move || serve(&serving, &registry, &metrics, &health, &admin, &tokens))
            .map_err(|e| format!("cannot start the HTTP thread: {e}"))?;
        Ok(Self {
            server,
            thread: Some(thread),
            address,
        })
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    server: &Server,
    registry: &Registry,
    metrics: &Metrics,
    health: &Health,
    admin: &mpsc::Sender<AdminRequest>,
    tokens: &Tokens,
) {
    const PLAIN: &str = "text/plain; charset=utf-8";
    for request in server.incoming_requests() {
        let (path, query) = match request.url().split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (request.url().to_string(), String::new()),
        };
        let (status, content_type, body) = match path.as_str() {
            p if p.starts_with("/admin/") => {
                let from = request
                    .remote_addr()
                    .map_or_else(|| "unknown".to_string(), ToString::to_string);
                let authorization = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .map(|h| h.value.as_str());
                let (status, body) = match tokens.check(authorization) {
                    Access::Granted(name) if *request.method() == tiny_http::Method::Post => {
                        handle_admin(p, &query, name, from, admin)
                    }
                    Access::Granted(_) => (405, "admin commands are POST requests\n".to_string()),
                    refused => refuse(&refused, p, &from, metrics),
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
        };
        let header = Header::from_bytes("Content-Type", content_type).expect("a valid header");
        let mut response = Response::from_string(body)
            .with_status_code(status)
            .with_header(header);
        if status == 401 {
            response.add_header(
                Header::from_bytes("WWW-Authenticate", "Bearer realm=\"rampart\"").expect("a valid header"),
            );
        }
        if let Err(e) = request.respond(response) {
            tracing::debug!(error = %e, "HTTP client went away");
        }
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
