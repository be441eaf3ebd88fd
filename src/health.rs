//! What a running process knows about its own health, for the systemd watchdog, the readiness
//! check and the tick alarms: when each loop last finished an iteration (a handled error counts:
//! the loop is alive), when the worker last completed a pass, and whether the process is
//! stopping.
//!
//! Loops report with [`Health::beat`]; the watchdog asks [`Health::stalled`] which loops have
//! not reported for too long. Nothing here reads the database, so the answer never waits on it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;

#[derive(Debug, Default)]
struct State {
    beats: BTreeMap<&'static str, Instant>,
    last_pass: Option<Timestamp>,
    stopping: bool,
}

/// A process's view of its own loops.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the plain data inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loop `name` finished an iteration (or handled an error) just now.
    pub fn beat(&self, name: &'static str) {
        self.state().beats.insert(name, Instant::now());
    }

    /// The loops that have not reported within `within`, by name.
    pub fn stalled(&self, within: Duration) -> Vec<&'static str> {
        let now = Instant::now();
        self.state()
            .beats
            .iter()
            .filter(|(_, at)| now.duration_since(**at) > within)
            .map(|(name, _)| *name)
            .collect()
    }

    /// The worker completed a pass (planning and claiming) at `at`.
    pub fn pass_completed(&self, at: Timestamp) {
        self.state().last_pass = Some(at);
    }

    /// When the worker last completed a pass.
    pub fn last_pass(&self) -> Option<Timestamp> {
        self.state().last_pass
    }

    /// The process was told to stop.
    pub fn set_stopping(&self) {
        self.state().stopping = true;
    }

    pub fn is_stopping(&self) -> bool {
        self.state().stopping
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_named_as_stalled() {
        let h = Health::new();
        h.beat("worker");
        h.beat("mail");
        assert!(h.stalled(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(20));
        h.beat("mail");
        assert_eq!(h.stalled(Duration::from_millis(10)), vec!["worker"]);
    }

    #[test]
    fn stopping_and_the_last_pass_are_remembered() {
        let h = Health::new();
        assert!(!h.is_stopping() && h.last_pass().is_none());
        h.set_stopping();
        h.pass_completed(Timestamp::UNIX_EPOCH);
        assert!(h.is_stopping());
        assert_eq!(h.last_pass(), Some(Timestamp::UNIX_EPOCH));
    }
}
