//! A Stripe-API peer for the Stripe adapter's tests: `tests/stripe/peer.py`, which runs
//! localstripe (PyPI) on 127.0.0.1 behind a layer that plays Stripe's idempotency keys and
//! drops requests or answers on demand (tests/stripe/README.md).
//!
//! A missing `python3` or localstripe fails the test with the fix: never a skip.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long the peer has to say it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running peer.
pub struct StripePeer {
    pub port: u16,
    child: Child,
    http: reqwest::Client,
}

impl StripePeer {
    /// Starts a peer that lists PaymentIntents like localstripe (no filters, oldest first).
    pub fn start() -> StripePeer {
        Self::spawn(false)
    }

    /// Starts a peer that filters and orders PaymentIntent lists like Stripe.
    pub fn start_with_list_filters() -> StripePeer {
        Self::spawn(true)
    }

    fn spawn(list_filters: bool) -> StripePeer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/stripe/peer.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg("--port")
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if list_filters {
            cmd.arg("--list-filters");
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start python3 for the Stripe peer ({e}): install Python 3.11 and `python3 -m pip install 'localstripe>=1.15,<1.16'`")
        });
        let stdout = child.stdout.take().expect("the peer's stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.strip_prefix("listening on 127.0.0.1:") {
                    let _ = tx.send(port.trim().parse::<u16>().ok());
                }
            }
        });
        let port = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(Some(port)) => port,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the Stripe peer did not start within {READY_TIMEOUT:?} (its error is above); is localstripe installed? (`python3 -m pip install 'localstripe>=1.15,<1.16'`; .ci/run installs it)"
                );
            }
        };
        StripePeer {
            port,
            child,
            http: reqwest::Client::new(),
        }
    }

    /// The `processor.stripe.api_base` that reaches this peer.
    pub fn api_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Replaces the fault settings (tests/stripe/README.md).
    pub async fn faults(&self, faults: serde_json::Value) {
        let r = self
            .http
            .post(self.url("/_proxy/faults"))
            .header("Content-Type", "application/json")
            .body(faults.to_string())
            .send()
            .await
            .expect("set the peer's faults");
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }

    /// The peer's counters.
    pub async fn stats(&self) -> serde_json::Value {
        json(self.http.get(self.url("/_proxy/stats"))).await
    }

    /// A GET of the Stripe API with a test key.
    pub async fn api_get(&self, path: &str) -> serde_json::Value {
        json(self.http.get(self.url(path)).bearer_auth(TEST_KEY)).await
    }

    /// A form POST to the Stripe API with a test key.
    pub async fn api_post(&self, path: &str, form: &[(&str, &str)]) -> serde_json::Value {
        json(
            self.http
                .post(self.url(path))
                .bearer_auth(TEST_KEY)
                .form(form),
        )
        .await
    }

    /// Has localstripe send signed events of `events` to `url`.
    pub async fn send_webhooks_to(&self, url: &str, secret: &str, events: &[&str]) {
        let mut form = vec![("url", url), ("secret", secret)];
        form.extend(events.iter().map(|e| ("events[]", *e)));
        let r = self
            .http
            .post(self.url("/_config/webhooks/autopay"))
            .form(&form)
            .send()
            .await
            .expect("configure the peer's webhooks");
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }

    /// Every PaymentIntent the peer holds, oldest first.
    pub async fn payment_intents(&self) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/payment_intents?limit=100&starting_after={a}"),
                None => "/v1/payment_intents?limit=100".to_string(),
            };
            let page = self.api_get(&path).await;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            after = data
                .last()
                .and_then(|p| p["id"].as_str())
                .map(str::to_string);
            all.extend(data);
            if page["has_more"] != serde_json::json!(true) || after.is_none() {
                break;
            }
        }
        all.sort_by_key(|p| p["created"].as_i64());
        all
    }

    /// The succeeded PaymentIntents, by the `payment_id` in their metadata.
    pub async fn succeeded_by_payment(&self) -> std::collections::HashMap<String, usize> {
        let mut by = std::collections::HashMap::new();
        for pi in self.payment_intents().await {
            if pi["status"] == "succeeded" {
                let id = pi["metadata"]["payment_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                *by.entry(id).or_insert(0) += 1;
            }
        }
        by
    }
}

/// Sends a request to the peer and reads its JSON answer.
async fn json(request: reqwest::RequestBuilder) -> serde_json::Value {
    let text = request
        .send()
        .await
        .expect("the peer answers")
        .text()
        .await
        .expect("the peer's answer");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The secret key the tests configure: localstripe accepts any `sk_test_` key.
pub const TEST_KEY: &str = "sk_test_autopay";

impl Drop for StripePeer {
    fn drop(&mut self) {
        // SAFETY: a plain kill(2) of our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
