//! `[http]`: where the daemon answers health, readiness and metrics requests, and how stale
//! its worker may be before it stops reporting ready.

use std::net::SocketAddr;

use serde::Serialize;

use super::checker::Checker;
use super::duration::Dur;
use super::raw::section;

section!(Http {
    listen: String,
    ready_grace: String
});

#[derive(Debug, Clone, Serialize)]
pub struct HttpSettings {
    /// The address `/healthz`, `/readyz` and `/metrics` are served on.
    pub listen: SocketAddr,
    /// The longest the worker may go without completing a pass and still be ready.
    pub ready_grace: Dur,
}

pub(super) fn parse(r: &Http, c: &mut Checker) -> HttpSettings {
    let listen = c.parse(
        "http.listen",
        &r.listen,
        SocketAddr::from(([127, 0, 0, 1], 9464)),
        |s| {
            s.trim().parse().map_err(|_| {
                "an address and port such as 127.0.0.1:9464 (port 0 picks a free one)".to_string()
            })
        },
    );
    let ready_grace = c.dur("http.ready_grace", &r.ready_grace);
    HttpSettings {
        listen,
        ready_grace,
    }
}
