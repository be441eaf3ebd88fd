//! `autopay bench --idle SECONDS`: how much CPU an idle daemon uses. It loads `--payments`
//! schedules none of which falls due for weeks into a throwaway database, runs the real daemon
//! (worker loop, mail loop, wake-ups, periodic jobs, health server) with an empty outbox for a
//! few seconds to settle, then measures this process's CPU time (user and system, every thread) over SECONDS.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::bench::{Due, backend_name, load, progress, round};
use super::output::{self, Table};
use super::{CliError, Context};
use crate::clock::{Clock, SystemClock};
use crate::config::{Backend, DatabaseUrl, EmailTransport, Ledger};
use crate::daemon::Daemon;
use crate::processor::simulated::SimulatedProcessor;
use crate::store;

/// Left to the daemon before the measured window: its first pass, first wake-up checks and
/// connections.
const SETTLE: Duration = Duration::from_secs(3);

/// One backend's idle figures.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub backend: Backend,
    pub schedules: u32,
    pub seconds: u64,
    /// CPU time (user + system) the whole process used over the window.
    pub cpu_seconds: f64,
    /// `cpu_seconds / seconds`: the share of one core.
    pub share_of_one_core: f64,
}

/// This process's CPU time so far, user and system, in seconds.
fn cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given and touches nothing else.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
    if !ok {
        return None;
    }
    // SAFETY: getrusage returned 0, so it initialized the struct.
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// Loads `n` schedules that are not due, runs the daemon idle for `seconds`, and measures.
pub(super) async fn measure(
    ctx: &Context,
    url: DatabaseUrl,
    n: u32,
    seconds: u64,
) -> Result<IdleResult, CliError> {
    let backend = url.backend();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = store::open(&url, ctx.settings.database.max_connections).await?;
    store.migrate(clock.now()).await?;
    let processor = SimulatedProcessor::in_memory(clock.clone(), Duration::ZERO);
    load(
        ctx,
        store.as_ref(),
        &url,
        &processor,
        clock.as_ref(),
        n,
        Due::Later,
    )
    .await?;
    drop(store);
    let mut settings = ctx.settings.clone();
    settings.database.url = url;
    settings.processor.simulated.ledger = Ledger::Memory;
    settings.email.transport = EmailTransport::Log;
    settings.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    // Idle means nothing to do: what the load queued (the confirmation of the one schedule
    // added through the store; the bulk copies queue nothing) is delivered (to the log,
    // unthrottled) before the daemon starts.
    settings.email.max_per_second = 10_000;
    let daemon = Daemon::build(settings, clock).await?;
    let drained = daemon.drain().await?;
    progress(format!(
        "delivered {} queued confirmation(s) before measuring",
        drained.mail.sent
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon.run_until_stopped(async {
        let _ = stopped.await;
    }));
    progress(format!(
        "loaded; the daemon settles for {}s, then is measured idle for {seconds}s...",
        SETTLE.as_secs()
    ));
    tokio::time::sleep(SETTLE).await;
    let before = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = cpu_seconds();
    let _ = stop.send(());
    match running.await {
        Ok(done) => {
            done?;
        }
        Err(e) => return Err(CliError::internal(format!("the idle daemon stopped: {e}"))),
    }
    let (Some(before), Some(after)) = (before, after) else {
        return Err(CliError::internal(
            "getrusage failed: the CPU time cannot be read on this system",
        ));
    };
    let cpu = after - before;
    progress(format!(
        "{}: {cpu:.3} CPU seconds over {seconds}s with {n} schedules",
        backend_name(backend)
    ));
    Ok(IdleResult {
        backend,
        schedules: n,
        seconds,
        cpu_seconds: round(cpu, 3),
        share_of_one_core: round(cpu / seconds as f64, 4),
    })
}

pub(super) fn print(ctx: &Context, results: &[IdleResult]) -> Result<(), CliError> {
    if ctx.json {
        return output::json(results);
    }
    let mut t = Table::new(vec![
        "BACKEND",
        "SCHEDULES",
        "SECONDS",
        "CPU S",
        "SHARE OF ONE CORE",
    ]);
    for r in results {
        t.row(vec![
            backend_name(r.backend).to_string(),
            r.schedules.to_string(),
            r.seconds.to_string(),
            format!("{:.3}", r.cpu_seconds),
            format!("{:.2}%", r.share_of_one_core * 100.0),
        ]);
    }
    output::say(t.render());
    Ok(())
}
