//! A tiny enforcement point: an HTTP gateway that refuses blocked actors.
//!
//! ```text
//! cargo run --release --example gateway -- --brokers 127.0.0.1:9092 --topic rampart.decisions --listen 127.0.0.1:8080 \
//!     --trust k1=keys/k1.pub.pem
//! curl -H 'X-Actor: arn:aws:iam::123456789012:user/mallory' http://127.0.0.1:8080/CreateAccessKey
//! ```
//!
//! Each request names its actor in the `X-Actor` header and its action in the
//! path. A blocked actor gets `403` with the decision's reason, guidance and expiry as JSON; an
//! action held for review gets `202` ("accepted, pending approval") with who approves in the
//! guidance; everyone else `200`. `/blocked` lists the actors blocked now.
//!
//! With `--trust ID=PUBLIC_KEY.pem` (repeat it during a key rotation), only decisions signed by
//! those keys are enforced: a block or revocation someone else wrote onto the topic is ignored
//! and counted (`/blocked` shows how many).
//!
//! At start it reads what is in force from the service's enforcement-state topic and the last
//! ten minutes of decisions; until then (`"caught_up": false` in `/blocked`) it lets requests
//! through as the blocks it knows allow (fail-open), or with `--fail-closed` refuses every
//! request with `503`.

use std::time::Duration;

use clap::Parser;
use rampart_enforce::signing::Verifier;
use rampart_enforce::{Bootstrap, Check, Config, Enforcer};
use tiny_http::{Header, Response, Server};

#[derive(Parser)]
struct Args {
    /// Bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Rampart's decisions topic.
    #[arg(long, default_value = "rampart.decisions")]
    topic: String,
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Enforce only decisions signed by this key: `ID=PATH` of its public key (SPKI PEM), as
    /// `rampart keys generate` writes it. Repeat it to trust several keys during a rotation.
    #[arg(long = "trust", value_name = "ID=PATH")]
    trust: Vec<String>,
    /// Until the enforcement state and the recent decisions have been read, refuse every
    /// request (503) instead of letting through actors whose block is not known yet.
    #[arg(long)]
    fail_closed: bool,
    /// Where what is in force comes from at start: `auto` (the enforcement-state topic
    /// `<topic>.enforcement` and the decisions of the last `--lookback`, or the whole decisions
    /// topic when there is no state topic) or `decisions` (the whole decisions topic).
    #[arg(long, default_value = "auto", value_parser = ["auto", "decisions"])]
    bootstrap: String,
    /// With the enforcement state: seconds of decisions read back at start.
    #[arg(long, default_value_t = 600)]
    lookback: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let verify = if args.trust.is_empty() {
        eprintln!("gateway: no --trust key: every decision on the topic is believed");
        None
    } else {
        let mut verifier = Verifier::new();
        for trust in &args.trust {
            let (id, path) = trust
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--trust {trust}: write ID=PATH"))?;
            verifier.trust_file(id, path.as_ref())?;
        }
        Some(verifier)
    };
    let enforcer = Enforcer::start(Config {
        brokers: args.brokers,
        topic: args.topic,
        properties: Vec::new(),
        topic_timeout: Duration::from_secs(60),
        verify,
        bootstrap: match args.bootstrap.as_str() {
            "decisions" => Bootstrap::Decisions,
            _ => Bootstrap::Auto,
        },
        lookback: Duration::from_secs(args.lookback),
    })?;
    let server =
        Server::http(&args.listen).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    eprintln!("gateway: listening on {}", args.listen);
    let json = Header::from_bytes("Content-Type", "application/json").expect("a valid header");
    for request in server.incoming_requests() {
        let url = request.url().to_string();
        let path = url.split('?').next().unwrap_or_default();
        let (status, body) = if path == "/blocked" {
            let stats = enforcer.stats();
            (
                200,
                serde_json::json!({
                    "blocked": enforcer.blocked_actors(),
                    "caught_up": enforcer.caught_up(),
                    "decisions_read": stats.decisions,
                    "ignored_unsigned": stats.unsigned,
                    "ignored_bad_signatures": stats.bad_signatures,
                }),
            )
        } else if args.fail_closed && !enforcer.caught_up() {
            (
                503,
                serde_json::json!({
                    "allowed": false,
                    "reason": "the gateway is still reading which blocks are in force",
                }),
            )
        } else {
            let action = path.trim_start_matches('/');
            let actor = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("X-Actor"))
                .map(|h| h.value.to_string())
                .unwrap_or_default();
            match enforcer.check(&actor, action) {
                Check::Review(hold) => (
                    202,
                    serde_json::json!({
                        "allowed": false,
                        "pending_approval": true,
                        "actor": actor,
                        "action": action,
                        "reason": hold.reason,
                        "guidance": hold.guidance,
                        "held_until": hold.expires_at.to_rfc3339(),
                        "decision_id": hold.decision_id,
                        "detector": hold.detector,
                    }),
                ),
                Check::Block(block) => (
                    403,
                    serde_json::json!({
                        "allowed": false,
                        "actor": actor,
                        "action": action,
                        "reason": block.reason,
                        "guidance": block.guidance,
                        "blocked_until": block.expires_at.to_rfc3339(),
                        "decision_id": block.decision_id,
                        "detector": block.detector,
                    }),
                ),
                Check::Allow => (
                    200,
                    serde_json::json!({ "allowed": true, "actor": actor, "action": action }),
                ),
            }
        };
        let response = Response::from_string(format!("{body}\n"))
            .with_status_code(status)
            .with_header(json.clone());
        let _ = request.respond(response);
    }
    Ok(())
}
