//! A rate limit shared by every worker of one process: the processor's
//! `processor.max_requests_per_second`, and the mail dispatcher's `email.max_per_second`.
//!
//! The limit is a promise about any sliding one-second window: at most `per_second` grants in
//! it. A grant waits until the `per_second`-th grant before it is a full second old (a log of
//! the grant times of the last second, at most `per_second` of them). On top, bursts are at most a tenth of the limit (a token
//! bucket of that size, refilled at the limit's rate), so a backlog is spread over the second
//! rather than sent at once.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// The window the limiter keeps: a second and a margin of 20 ms, so that the moments between a
/// grant and its request leaving (a task preempted on a busy host) never put one request more
/// into a second as the processor sees it. The promise is about one second; the margin costs
/// 2 % of the rate at the limit.
const WINDOW: Duration = Duration::from_millis(1_020);

#[derive(Debug)]
pub struct RateLimiter {
    per_second: u32,
    /// Waiters line up here and are served in the order they came (tokio's mutex is fair), so
    /// no request waits behind later ones and runs out of `processor.timeout` while they pass.
    line: Mutex<()>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The times of the grants in the last window (at most `per_second`), oldest first. Older
    /// ones are dropped: they can no longer hold a grant back, and a log of every grant up to
    /// `per_second` would grow with each request until it held that many (1.6 MB at the
    /// bench's lifted limit of 100,000).
    granted: VecDeque<Instant>,
    /// Burst tokens and when they were last refilled.
    tokens: f64,
    refilled: Instant,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> RateLimiter {
        let per_second = per_second.max(1);
        RateLimiter {
            per_second,
            line: Mutex::new(()),
            state: Mutex::new(State {
                granted: VecDeque::new(),
                tokens: f64::from(Self::burst_of(per_second)),
                refilled: Instant::now(),
            }),
        }
    }

    /// The largest burst: a tenth of the limit, at least one.
    fn burst_of(per_second: u32) -> u32 {
        (per_second / 10).max(1)
    }

    /// Waits for one request's turn, first come first served.
    pub async fn acquire(&self) {
        let _line = self.line.lock().await;
        let rate = f64::from(self.per_second);
        let burst = f64::from(Self::burst_of(self.per_second));
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                s.tokens =
                    (s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate).min(burst);
                s.refilled = now;
                while s
                    .granted
                    .front()
                    .is_some_and(|oldest| now.saturating_duration_since(*oldest) >= WINDOW)
                {
                    s.granted.pop_front();
                }
                let window_full = s.granted.len() >= self.per_second as usize;
                // The grant that would leave the window if this one were made now.
                let window_wait = match s.granted.front() {
                    Some(oldest) if window_full => {
                        (*oldest + WINDOW).saturating_duration_since(now)
                    }
                    _ => Duration::ZERO,
                };
                if s.tokens >= 1.0 && window_wait.is_zero() {
                    s.tokens -= 1.0;
                    if window_full {
                        s.granted.pop_front();
                    }
                    s.granted.push_back(now);
                    return;
                }
                let token_wait = Duration::from_secs_f64(((1.0 - s.tokens) / rate).max(0.0));
                token_wait.max(window_wait).max(Duration::from_micros(100))
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most grants in any window of one second, from their times.
    fn most_in_a_second(times: &[Instant]) -> usize {
        let mut most = 0;
        for (i, t) in times.iter().enumerate() {
            let n = times[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_secs(1))
                .count();
            most = most.max(n);
        }
        most
    }

    /// The first request leaves 15 ms after its grant (its task preempted), the next ones at once:
    /// the processor still sees no second with more than the limit.
    #[tokio::test(start_paused = true)]
    async fn a_request_that_leaves_late_does_not_put_one_more_in_a_second() {
        let limiter = RateLimiter::new(10);
        let mut sent = Vec::new();
        for i in 0..21 {
            limiter.acquire().await;
            let late = if i == 0 {
                Duration::from_millis(15)
            } else {
                Duration::ZERO
            };
            sent.push(Instant::now() + late);
        }
        sent.sort();
        assert!(most_in_a_second(&sent) <= 10, "{}", most_in_a_second(&sent));
    }

    /// Waiters are served in the order they came: with more waiting than a second's worth,
    /// none is overtaken by a later one (which would stretch its wait past the others').
    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_the_order_they_came() {
        let limiter = std::sync::Arc::new(RateLimiter::new(4));
        let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..12 {
            let (l, served) = (limiter.clone(), served.clone());
            tasks.spawn(async move {
                l.acquire().await;
                served.lock().unwrap().push(i);
            });
            // Each waiter is in line before the next one comes.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tasks.join_all().await;
        let served = served.lock().unwrap().clone();
        assert_eq!(served, (0..12).collect::<Vec<_>>());
    }

    /// The log keeps the last second's grants only: at a high limit and a low rate it holds a
    /// few times, not one for every request up to the limit.
    #[tokio::test(start_paused = true)]
    async fn the_log_holds_only_the_last_seconds_grants() {
        let limiter = RateLimiter::new(100_000);
        for _ in 0..3 {
            for _ in 0..50 {
                limiter.acquire().await;
            }
            tokio::time::advance(Duration::from_secs(2)).await;
        }
        limiter.acquire().await;
        let state = limiter.state.lock().await;
        assert_eq!(state.granted.len(), 1);
        assert!(
            state.granted.capacity() < 1_000,
            "{}",
            state.granted.capacity()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_the_rate_wait_for_their_turn() {
        let limiter = RateLimiter::new(10);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..30 {
            limiter.acquire().await;
            times.push(Instant::now());
        }
        // One at once, then ten a second: 29 more take 2.9 s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2800), "{took:?}");
        assert!(took <= Duration::from_millis(3100), "{took:?}");
        assert!(most_in_a_second(&times) <= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn no_sliding_second_holds_more_than_the_limit_and_bursts_are_a_tenth() {
        for limit in [1, 7, 25, 100, 500] {
            let limiter = std::sync::Arc::new(RateLimiter::new(limit));
            // Idle long enough for any bucket to be full, then a crowd of concurrent callers.
            tokio::time::sleep(Duration::from_secs(5)).await;
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..(limit * 3) {
                let l = limiter.clone();
                tasks.spawn(async move {
                    l.acquire().await;
                    Instant::now()
                });
            }
            let mut times: Vec<Instant> = tasks.join_all().await;
            times.sort();
            assert!(most_in_a_second(&times) <= limit as usize, "limit {limit}");
            let first = times[0];
            let burst = times.iter().take_while(|t| **t == first).count();
            assert!(
                burst <= (limit as usize / 10).max(1),
                "limit {limit}: burst {burst}"
            );
        }
    }
}
