//! A token bucket shared by every worker of one process: the processor's
//! `processor.max_requests_per_second`, and the mail dispatcher's `email.max_per_second`.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> RateLimiter {
        let per_second = f64::from(per_second.max(1));
        RateLimiter {
            per_second,
            state: Mutex::new((per_second, Instant::now())),
        }
    }

    /// Waits for one request's token. A burst of up to one second's worth passes at once.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut state = self.state.lock().await;
                let (tokens, last) = &mut *state;
                let now = Instant::now();
                *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second)
                    .min(self.per_second);
                *last = now;
                if *tokens >= 1.0 {
                    *tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - *tokens) / self.per_second)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_the_rate_wait_for_their_token() {
        let limiter = RateLimiter::new(10);
        let start = Instant::now();
        for _ in 0..30 {
            limiter.acquire().await;
        }
        // 10 pass at once, the other 20 at 10 per second.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1900), "{took:?}");
        assert!(took <= Duration::from_millis(2100), "{took:?}");
    }
}
