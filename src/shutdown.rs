//! The stop signal every long-running part of a process watches: the worker loop, the mail
//! loop, the HTTP server. Cloned into signal handlers and tests; triggering it once stops them
//! all.

use tokio::sync::watch;

/// Tells every loop of the process to stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            tx: watch::channel(false).0,
        }
    }

    pub fn trigger(&self) {
        // send_replace stores the value even when no loop is waiting at this moment (each
        // subscribes only inside `wait`); `send` would drop it, and the stop would be lost.
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

impl Default for Shutdown {
    fn default() -> Shutdown {
        Shutdown::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_while_no_loop_is_waiting_is_still_seen() {
        let shutdown = Shutdown::new();
        // Every loop busy: nobody is inside `wait`.
        shutdown.trigger();
        assert!(shutdown.is_triggered());
        tokio::time::timeout(std::time::Duration::from_secs(1), shutdown.wait())
            .await
            .expect("wait returns at once after a trigger");
    }

    #[tokio::test]
    async fn a_stop_wakes_a_loop_that_waits() {
        let shutdown = Shutdown::new();
        let waiting = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.wait().await }
        });
        tokio::task::yield_now().await;
        shutdown.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("the waiting loop wakes")
            .unwrap();
    }
}
