//! A processor that counts its requests for `autopay bench`: the largest number that reached it
//! in any sliding one-second window, the figure `processor.max_requests_per_second` promises to
//! bound. It holds only the last second's request times, whatever the length of the run.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jiff::Timestamp;

use crate::domain::card::{CardNumber, Expiry, SecurityCode};
use crate::processor::simulated::SimulatedProcessor;
use crate::processor::{
    AttemptRef, CardDetails, CardOwner, ChargeOutcome, ChargeRequest, Lookup, Processor,
    ProcessorAttempt, ProcessorError, Tokenized,
};

const WINDOW: Duration = Duration::from_secs(1);

/// Request times within the last second, and the most ever seen in one second.
#[derive(Debug, Default)]
pub struct Window {
    recent: VecDeque<Instant>,
    most: usize,
}

impl Window {
    /// Counts a request made at `at` (times never go backwards).
    pub fn count(&mut self, at: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|first| at.duration_since(*first) >= WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(at);
        self.most = self.most.max(self.recent.len());
    }

    pub fn most(&self) -> usize {
        self.most
    }
}

/// The simulated processor, every charge and lookup counted as it reaches it.
pub struct Counted {
    inner: Arc<SimulatedProcessor>,
    window: Mutex<Window>,
}

impl Counted {
    pub fn new(inner: Arc<SimulatedProcessor>) -> Counted {
        Counted {
            inner,
            window: Mutex::new(Window::default()),
        }
    }

    /// The most requests that reached the processor in any one-second window.
    pub fn most_in_one_second(&self) -> usize {
        self.lock().most()
    }

    fn count(&self) {
        self.lock().count(Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Processor for Counted {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn tokenize(
        &self,
        owner: &CardOwner,
        number: &CardNumber,
        security_code: &SecurityCode,
        expiry: Expiry,
    ) -> Result<Tokenized, ProcessorError> {
        self.inner
            .tokenize(owner, number, security_code, expiry)
            .await
    }
    async fn card_details(&self, token: &str) -> Result<CardDetails, ProcessorError> {
        self.inner.card_details(token).await
    }
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        self.count();
        self.inner.charge(request).await
    }
    async fn find_attempt(&self, attempt: &AttemptRef) -> Lookup {
        self.count();
        self.inner.find_attempt(attempt).await
    }
    async fn list_attempts(
        &self,
        since: Timestamp,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError> {
        self.count();
        self.inner.list_attempts(since).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_in_any_sliding_second_is_kept() {
        let start = Instant::now();
        let ms = |n: u64| start + Duration::from_millis(n);
        let mut w = Window::default();
        // Three at the start, three more 900 ms later: six within one second.
        for t in [0, 1, 2, 900, 901, 902] {
            w.count(ms(t));
        }
        assert_eq!(w.most(), 6);
        // A second after the first three, they no longer count; the most stays 6.
        for t in [1_500, 1_501] {
            w.count(ms(t));
        }
        assert_eq!(w.most(), 6);
        assert_eq!(w.recent.len(), 5);
        // Exactly one second apart is two windows.
        let mut w = Window::default();
        w.count(ms(0));
        w.count(ms(1_000));
        assert_eq!(w.most(), 1);
    }
}
