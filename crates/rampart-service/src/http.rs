//! The service's HTTP endpoint: `/metrics` (Prometheus / OpenMetrics text), `/healthz` (the
//! processing loop is alive) and `/readyz` (consuming, and the broker acknowledges decisions).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use prometheus_client::registry::Registry;
use tiny_http::{Header, Response, Server};

use crate::metrics::{Health, Metrics, now_ms};

/// The processing loop counts as dead when it has not gone round for this long.
const STALL_MS: i64 = 30_000;

/// A running HTTP endpoint; stops when dropped.
pub struct Endpoint {
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    /// The address it listens on (the port resolved when `:0` was asked for).
    pub address: String,
}

impl Endpoint {
    /// Serves `metrics` and `health` on `listen` (e.g. `127.0.0.1:9464`).
    pub fn start(listen: &str, metrics: Arc<Metrics>, health: Arc<Health>) -> Result<Self, String> {
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
            .spawn(move || serve(&serving, &registry, &metrics, &health))
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

fn serve(server: &Server, registry: &Registry, metrics: &Metrics, health: &Health) {
    const PLAIN: &str = "text/plain; charset=utf-8";
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or_default().to_string();
        let (status, content_type, body) = match path.as_str() {
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
            "/readyz" => match ready(health) {
                Ok(()) => (200, PLAIN, "ready\n".to_string()),
                Err(why) => (503, PLAIN, format!("not ready: {why}\n")),
            },
            _ => (
                404,
                PLAIN,
                "not found: try /metrics, /healthz or /readyz\n".to_string(),
            ),
        };
        let header = Header::from_bytes("Content-Type", content_type).expect("a valid header");
        let response = Response::from_string(body)
            .with_status_code(status)
            .with_header(header);
        if let Err(e) = request.respond(response) {
            tracing::debug!(error = %e, "HTTP client went away");
        }
    }
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
