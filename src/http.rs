//! The daemon's HTTP side, on `http.listen` (127.0.0.1:9464 by default):
//!
//! - `GET /healthz`: alive. 200 while every loop of the process has finished an iteration within
//!   `http.ready_grace`; 503 naming the loops that have not.
//! - `GET /readyz`: ready to charge. 200 when the database answers, the worker completed a pass
//!   within `http.ready_grace`, no periodic job missed a fire time by more than
//!   `daemon.tick_alarm`, charging is not paused by the circuit breaker (or a processor that
//!   refused autopay's credentials), mail is not paused, and
//!   the process is not stopping; 503 otherwise. The JSON body gives every check's result.
//! - `GET /metrics`: Prometheus text format (src/metrics.rs names each metric). The gauges read
//!   from the database at each scrape are the same on every host.
//!
//! - `POST /webhooks/stripe`: Stripe's events, with processor.kind = "stripe" and a webhook
//!   secret set (404 otherwise); bodies over [`WEBHOOK_MAX_BODY`] are refused (413). What is
//!   done with each is in src/daemon/webhooks.rs. Only this path is meant to be reachable from
//!   outside, through the plan's TLS proxy.
//!
//! No answer waits on the database for more than [`DB_WAIT`]: a database outage turns
//! readiness red, never hangs a probe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;

use crate::clock::Clock;
use crate::daemon::ticks::TickRecord;
use crate::health::Health;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// The longest a probe waits on the database.
pub const DB_WAIT: Duration = Duration::from_secs(3);

/// What the handlers read.
pub struct HttpState {
    pub store: Arc<dyn Store>,
    pub health: Arc<Health>,
    pub ticks: Option<Arc<TickRecord>>,
    pub clock: Arc<dyn Clock>,
    /// `http.ready_grace`.
    pub ready_grace: Duration,
    /// `daemon.tick_alarm`.
    pub tick_alarm: Duration,
    /// None when another recorder was installed first (tests): `/metrics` then says so.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Stripe's webhooks, when the Stripe adapter is in use.
    pub webhooks: Option<Arc<crate::daemon::webhooks::Webhooks>>,
}

/// The largest webhook body accepted: Stripe's events are a few KiB.
pub const WEBHOOK_MAX_BODY: usize = 64 * 1024;

/// The routes, for the server and for tests.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route(
            "/webhooks/stripe",
            post(stripe_webhook).layer(DefaultBodyLimit::max(WEBHOOK_MAX_BODY)),
        )
        .with_state(state)
}

async fn stripe_webhook(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(webhooks) = &s.webhooks else {
        return (StatusCode::NOT_FOUND, "webhooks are off\n").into_response();
    };
    let signature = headers
        .get("Stripe-Signature")
        .and_then(|v| v.to_str().ok());
    let (status, text) = webhooks.handle(signature, &body).await;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, format!("{text}\n")).into_response()
}

/// Binds `listen` and serves until `shutdown`. The bound address is returned once listening
/// (port 0 picks a free one) through `bound`.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        format!(
            "http.listen = {listen}: cannot listen there ({e}); choose a free address and port, or stop what holds it"
        )
    })
}

/// Serves on a bound listener until `shutdown` fires.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<HttpState>, shutdown: Shutdown) {
    let app = router(state);
    let stopped = async move { shutdown.wait().await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
    {
        tracing::error!(error = %e, "the health and metrics server stopped");
    }
}

#[derive(Debug, Serialize)]
struct Alive {
    alive: bool,
    stalled: Vec<&'static str>,
}

async fn healthz(State(s): State<Arc<HttpState>>) -> Response {
    let stalled = s.health.stalled(s.ready_grace);
    let code = if stalled.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Alive {
            alive: stalled.is_empty(),
            stalled,
        }),
    )
        .into_response()
}

/// One readiness check: "ok", or what is wrong.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: std::collections::BTreeMap<&'static str, String>,
}

const OK: &str = "ok";

/// Runs every readiness check.
pub async fn readiness(s: &HttpState) -> Readiness {
    let mut checks = std::collections::BTreeMap::new();
    let now = s.clock.now();
    let control = tokio::time::timeout(DB_WAIT, s.store.control()).await;
    let (database, charging, mail) = match control {
        Ok(Ok(c)) => {
            let charging = match &c.charging_paused {
                Some(p) if p.by.as_deref() == Some("breaker") => {
                    format!(
                        "paused by the circuit breaker since {}: {}",
                        p.since, p.reason
                    )
                }
                Some(p) if p.by.as_deref() == Some("processor") => {
                    format!(
                        "paused since {} because the processor refused autopay's credentials: {}",
                        p.since, p.reason
                    )
                }
                // An operator's pause is deliberate: the daemon is still as ready as it is asked
                // to be.
                _ => OK.to_string(),
            };
            let mail = match &c.mail_paused {
                Some(p) => format!("paused since {}: {}", p.since, p.reason),
                None => OK.to_string(),
            };
            (OK.to_string(), charging, mail)
        }
        Ok(Err(e)) => (e.to_string(), "unknown".into(), "unknown".into()),
        Err(_) => (
            format!("no answer within {DB_WAIT:?}"),
            "unknown".into(),
            "unknown".into(),
        ),
    };
    checks.insert("database", database);
    checks.insert("charging", charging);
    checks.insert("mail", mail);
    let grace = jiff::SignedDuration::try_from(s.ready_grace).unwrap_or(jiff::SignedDuration::MAX);
    checks.insert(
        "worker",
        match s.health.last_pass() {
            Some(t) if now.duration_since(t) <= grace => OK.to_string(),
            Some(t) => format!("last completed a pass at {t}, longer ago than http.ready_grace"),
            None => "has not completed a pass yet".to_string(),
        },
    );
    let stale = s
        .ticks
        .as_ref()
        .map(|t| t.stale(now, s.tick_alarm))
        .unwrap_or_default();
    checks.insert(
        "ticks",
        if stale.is_empty() {
            OK.to_string()
        } else {
            stale
                .iter()
                .map(|j| format!("{} missed its run at {}", j.job, j.due))
                .collect::<Vec<_>>()
                .join("; ")
        },
    );
    checks.insert(
        "stopping",
        if s.health.is_stopping() {
            "the daemon is stopping".to_string()
        } else {
            OK.to_string()
        },
    );
    Readiness {
        ready: checks.values().all(|v| v == OK),
        checks,
    }
}

async fn readyz(State(s): State<Arc<HttpState>>) -> Response {
    let r = readiness(&s).await;
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r)).into_response()
}

/// Sets the gauges read from the database and this process's ages, then renders everything.
async fn metrics_text(State(s): State<Arc<HttpState>>) -> Response {
    use crate::metrics as m;
    let Some(handle) = &s.metrics else {
        return (
            StatusCode::NOT_FOUND,
            "metrics are not exported by this process (another recorder is installed)\n",
        )
            .into_response();
    };
    let now = s.clock.now();
    // The three reads wait at once: a scrape during a database outage answers within one
    // DB_WAIT, well inside a scraper's timeout.
    let (status, backlog, ready) = tokio::join!(
        tokio::time::timeout(DB_WAIT, s.store.status()),
        tokio::time::timeout(DB_WAIT, s.store.due_backlog(now)),
        readiness(&s),
    );
    if let Ok(Ok(status)) = status {
        for state in crate::domain::payment::PaymentState::ALL {
            let n = status.payments.get(state.as_str()).copied().unwrap_or(0);
            metrics::gauge!(m::PAYMENTS_BY_STATE, "state" => state.as_str()).set(n as f64);
        }
        for state in ["pending", "sending", "sent", "failed", "expired"] {
            let n = status.notifications.get(state).copied().unwrap_or(0);
            metrics::gauge!(m::OUTBOX, "state" => state).set(n as f64);
        }
        // Automatic pauses by name; anyone else's is an operator's.
        let paused_by = |by: &str| {
            status.control.charging_paused.as_ref().is_some_and(|p| {
                let automatic = matches!(p.by.as_deref(), Some("breaker" | "processor"));
                if automatic {
                    p.by.as_deref() == Some(by)
                } else {
                    by == "operator"
                }
            })
        };
        for by in ["operator", "breaker", "processor"] {
            metrics::gauge!(m::CHARGING_PAUSED, "by" => by).set(f64::from(u8::from(paused_by(by))));
        }
        metrics::gauge!(m::MAIL_PAUSED)
            .set(f64::from(u8::from(status.control.mail_paused.is_some())));
        metrics::gauge!(m::BOUNCING).set(status.members_bouncing as f64);
        metrics::gauge!(m::FINDINGS).set(status.findings_open as f64);
    }
    if let Ok(Ok((count, oldest))) = backlog {
        metrics::gauge!(m::DUE_BACKLOG).set(count as f64);
        let age = oldest.map_or(0.0, |t| now.duration_since(t).as_secs_f64().max(0.0));
        metrics::gauge!(m::OLDEST_DUE_SECONDS).set(age);
    }
    if let Some(ticks) = &s.ticks {
        for (job, last) in ticks.last_runs() {
            let age = last.map_or(f64::NAN, |t| now.duration_since(t).as_secs_f64());
            metrics::gauge!(m::TICK_AGE, "job" => job).set(age);
        }
    }
    if let Some(t) = s.health.last_pass() {
        metrics::gauge!(m::PASS_AGE).set(now.duration_since(t).as_secs_f64());
    }
    for (check, result) in ready.checks {
        metrics::gauge!(m::READY_CHECK, "check" => check).set(f64::from(u8::from(result == OK)));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
