//! What a running daemon tells systemd, and the watchdog that decides whether it is alive.
//!
//! [`started`] says `READY=1` and "charging; worker ID" as the loops start, and starts the
//! [`Watchdog`] when systemd asks for one; [`stopping`] says `STOPPING=1` when the stop comes.
//! The watchdog sends `WATCHDOG=1` every half `WatchdogSec` while every loop has reported to
//! [`Health`] within that half. When one has not, it stops pinging and names the loop, in the
//! log and in `STATUS=`, so that systemd restarts the daemon. It reads only [`Health`], in
//! memory: it never waits on the database, and a database outage cannot stop its pings, since
//! every database wait is bounded ([`crate::store::WAIT_LIMIT`]) and a loop reports its handled
//! errors.

use std::sync::Arc;
use std::time::Duration;

use super::systemd::Notifier;
use crate::config::{EmailTransport, Settings};
use crate::health::Health;
use crate::store::WAIT_LIMIT;

/// Pings systemd while every loop is alive.
pub struct Watchdog {
    notifier: Arc<Notifier>,
    health: Arc<Health>,
    /// Half of systemd's `WatchdogSec`: how often it pings, and how long a loop may go without
    /// reporting before it counts as stalled.
    period: Duration,
    /// What `STATUS=` says while all is well, said again when a stall ends.
    running: String,
    /// The loops found stalled at the last check; empty while it pings.
    stalled: Vec<&'static str>,
}

impl Watchdog {
    /// A watchdog for systemd's `interval` over `loops`. Each loop's clock starts now, so a loop
    /// stuck in its very first iteration is named too.
    pub fn new(
        notifier: Arc<Notifier>,
        health: Arc<Health>,
        interval: Duration,
        loops: &[&'static str],
        running: String,
    ) -> Watchdog {
        for name in loops {
            health.beat(name);
        }
        Watchdog {
            notifier,
            health,
            period: interval / 2,
            running,
            stalled: Vec::new(),
        }
    }

    /// How often [`Watchdog::check`] runs.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// One look: sends `WATCHDOG=1` and returns true when every loop reported within the
    /// period (or the daemon is stopping: its loops end one by one then, systemd no longer
    /// watches, and `daemon.shutdown_grace` bounds the stop); otherwise sends nothing, says
    /// which loops stalled (once per stall), and returns false.
    pub fn check(&mut self) -> bool {
        let stalled = if self.health.is_stopping() {
            Vec::new()
        } else {
            self.health.stalled(self.period)
        };
        if !stalled.is_empty() {
            if stalled != self.stalled {
                let names = stalled.join(", ");
                tracing::error!(
                    loops = %names,
                    silent_for_more_than = ?self.period,
                    "a loop stopped reporting: no more watchdog pings, so systemd restarts autopay"
                );
                tell(self.notifier.status(&format!(
                    "stalled: {names} loop silent for over {}s; systemd restarts autopay",
                    self.period.as_secs_f64().ceil()
                )));
            }
            self.stalled = stalled;
            return false;
        }
        if !self.stalled.is_empty() {
            tracing::info!(loops = %self.stalled.join(", "), "the stalled loops report again; watchdog pings resume");
            self.stalled.clear();
            if !self.health.is_stopping() {
                tell(self.notifier.status(&self.running));
            }
        }
        tell(self.notifier.watchdog());
        true
    }

    /// Checks every period, for ever.
    pub async fn run(mut self) {
        let mut every = tokio::time::interval(self.period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.check();
        }
    }
}

/// The watchdog task of a running daemon, ended when this is dropped.
pub struct Running(Option<tokio::task::JoinHandle<()>>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The loops start: `READY=1`, the running status, and the watchdog when systemd asks for one.
/// `loops` are the names the loops report to `health` under.
pub fn started(
    notifier: &Arc<Notifier>,
    health: &Arc<Health>,
    settings: &Settings,
    worker_id: &str,
    loops: &[&'static str],
) -> Running {
    let running = format!("charging; worker {worker_id}");
    tell(notifier.ready());
    tell(notifier.status(&running));
    let task = notifier.watchdog_interval().map(|interval| {
        warn_if_short(interval, settings);
        let watchdog = Watchdog::new(
            notifier.clone(),
            health.clone(),
            interval,
            loops,
            running.clone(),
        );
        tracing::info!(interval = ?interval, every = ?watchdog.period(), "systemd watchdog on");
        tokio::spawn(watchdog.run())
    });
    Running(task)
}

/// The stop came: `STOPPING=1`, and what the daemon is waiting for.
pub fn stopping(notifier: &Notifier, grace: Duration) {
    tell(notifier.stopping());
    tell(notifier.status(&format!(
        "stopping: finishing the charges in flight (at most {}s)",
        grace.as_secs()
    )));
}

/// The longest a loop may rightly go without reporting under these settings. The worker
/// sleeps up to `daemon.poll_interval`, then a pass may make two processor calls (a lookup,
/// then the same request sent again) and meet five bounded database waits (a claim, before and
/// after the call, the breaker's count, the next wake-up). The mail loop also sleeps up to
/// `daemon.poll_interval`, then may spend a connection attempt and one step of the conversation
/// on a message and meet three bounded waits (a claim, the result, the next due time).
pub fn longest_silence(settings: &Settings) -> Duration {
    let poll = settings.daemon.poll_interval.as_std();
    let worker = poll + 2 * settings.processor.timeout.as_std() + 5 * WAIT_LIMIT;
    let mail = if settings.email.transport == EmailTransport::Smtp {
        poll + 2 * settings.email.smtp.timeout.as_std() + 3 * WAIT_LIMIT
    } else {
        poll + 3 * WAIT_LIMIT
    };
    worker.max(mail)
}

/// Warns when `WatchdogSec` (`interval`) is too short for these settings: a slow processor or
/// database would then get a healthy daemon restarted.
fn warn_if_short(interval: Duration, settings: &Settings) {
    let needed = longest_silence(settings);
    if interval / 2 < needed {
        tracing::warn!(
            "WatchdogSec={}s lets a loop stay silent {}s, and these settings let a healthy loop stay silent up to {}s (daemon.poll_interval + 2 x processor.timeout + 5 x {}s database waits): a slow processor or database could get autopay restarted. Set WatchdogSec to at least {}s",
            interval.as_secs_f64(),
            (interval / 2).as_secs_f64(),
            needed.as_secs(),
            WAIT_LIMIT.as_secs(),
            2 * needed.as_secs()
        );
    }
}

/// A notification systemd did not take is worth a warning, never a failure.
fn tell(sent: std::io::Result<()>) {
    if let Err(e) = sent {
        tracing::warn!(error.message = %e, "systemd notification not sent");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;
    use crate::daemon::systemd::socket_address;

    /// systemd's end of the socket, as a test sees it.
    struct Systemd {
        _dir: tempfile::TempDir,
        socket: UnixDatagram,
    }

    impl Systemd {
        fn listen() -> (Systemd, Arc<Notifier>) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify.sock");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_nonblocking(true).unwrap();
            let addr = socket_address(path.as_os_str()).unwrap();
            let notifier = Notifier::to_address(Some(addr), Some(Duration::from_millis(200)));
            (Systemd { _dir: dir, socket }, Arc::new(notifier.unwrap()))
        }

        /// Everything sent so far.
        fn heard(&self) -> Vec<String> {
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while let Ok(n) = self.socket.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            got
        }

        fn pings(&self) -> usize {
            self.heard().iter().filter(|m| *m == "WATCHDOG=1").count()
        }
    }

    #[test]
    fn it_pings_while_every_loop_reports_and_stops_when_one_stalls() {
        let (systemd, notifier) = Systemd::listen();
        let health = Arc::new(Health::new());
        let interval = notifier.watchdog_interval().unwrap();
        let mut dog = Watchdog::new(
            notifier,
            health.clone(),
            interval,
            &["worker", "mail"],
            "charging; worker w".into(),
        );
        assert!(dog.check());
        assert_eq!(systemd.heard(), vec!["WATCHDOG=1"]);

        // The worker goes silent for longer than half the interval; mail keeps reporting.
        std::thread::sleep(Duration::from_millis(150));
        health.beat("mail");
        assert!(!dog.check());
        let heard = systemd.heard();
        assert!(!heard.contains(&"WATCHDOG=1".to_string()), "{heard:?}");
        assert_eq!(heard.len(), 1, "{heard:?}");
        assert!(
            heard[0].starts_with("STATUS=stalled: worker loop silent"),
            "{heard:?}"
        );
        // Said once per stall, not at every check.
        assert!(!dog.check());
        assert!(systemd.heard().is_empty());

        // The worker reports again: pings resume and the status says so.
        health.beat("worker");
        health.beat("mail");
        assert!(dog.check());
        assert_eq!(
            systemd.heard(),
            vec!["STATUS=charging; worker w", "WATCHDOG=1"]
        );
    }

    #[test]
    fn a_loop_stuck_in_its_first_iteration_is_named_too() {
        let (systemd, notifier) = Systemd::listen();
        let health = Arc::new(Health::new());
        let mut dog = Watchdog::new(
            notifier,
            health,
            Duration::from_millis(100),
            &["worker"],
            "charging".into(),
        );
        std::thread::sleep(Duration::from_millis(80));
        assert!(!dog.check());
        assert!(systemd.heard()[0].contains("worker loop"));
    }

    #[test]
    fn while_stopping_it_pings_though_the_loops_have_ended() {
        let (systemd, notifier) = Systemd::listen();
        let health = Arc::new(Health::new());
        let mut dog = Watchdog::new(
            notifier,
            health.clone(),
            Duration::from_millis(100),
            &["worker"],
            "charging".into(),
        );
        health.set_stopping();
        std::thread::sleep(Duration::from_millis(80));
        assert!(dog.check());
        assert_eq!(systemd.heard(), vec!["WATCHDOG=1"]);
    }

    #[tokio::test]
    async fn the_running_watchdog_stops_pinging_once_a_loop_stalls() {
        let (systemd, notifier) = Systemd::listen();
        let health = Arc::new(Health::new());
        // Checks every 100ms; a loop may be silent 100ms.
        let dog = Watchdog::new(
            notifier,
            health.clone(),
            Duration::from_millis(200),
            &["worker"],
            "charging".into(),
        );
        let task = tokio::spawn(dog.run());
        for _ in 0..10 {
            health.beat("worker");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let while_alive = systemd.pings();
        assert!(while_alive >= 3, "{while_alive} pings in 500ms");
        // The worker stops reporting: after at most one more check, no more pings.
        tokio::time::sleep(Duration::from_millis(250)).await;
        systemd.heard();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(systemd.pings(), 0);
        task.abort();
    }

    #[test]
    fn the_longest_healthy_silence_adds_up_the_bounded_waits() {
        let settings = Settings::load(None, Vec::<(String, String)>::new()).unwrap();
        // 30s poll + 2 x 30s processor timeout + 5 x 10s database waits.
        assert_eq!(longest_silence(&settings), Duration::from_secs(140));
        // The unit's WatchdogSec=5min allows 150s.
        assert!(longest_silence(&settings) < Duration::from_secs(300) / 2);
    }
}
