//! The Stripe adapter against a real Stripe-API peer: localstripe behind a layer that plays
//! Stripe's idempotency keys and drops requests and answers (tests/stripe/peer.py). Every test
//! runs the `autopay` binary, as an operator would, with `processor.kind = "stripe"`.

use std::collections::HashMap;
use std::time::Duration;

use crate::helpers::{Bin, Kind, Run, TestDb};
use crate::stripe_peer::{StripePeer, TEST_KEY};

/// The settings that point autopay at `peer`, with timings short enough for a test: an unknown
/// outcome is looked up three seconds later.
fn stripe_bin(db: &TestDb, peer: &StripePeer) -> Bin {
    Bin::new(db).run(&["migrate"]).ok();
    Bin::new(db)
        .with_env("AUTOPAY__PROCESSOR__KIND", "stripe")
        .with_env("AUTOPAY__PROCESSOR__STRIPE__API_BASE", &peer.api_base())
        .with_env("AUTOPAY__PROCESSOR__STRIPE__SECRET_KEY", TEST_KEY)
        .with_env("AUTOPAY__PROCESSOR__TIMEOUT", "2s")
        .with_env("AUTOPAY__PROCESSOR__SETTLE_DELAY", "3s")
        .with_env("AUTOPAY__PAYMENTS__BREAKER_MIN_ATTEMPTS", "1000000")
}

/// A member with a card (its number typed on standard input); returns the card id.
fn member_with_card(bin: &Bin, account: &str, number: &str) -> String {
    crate::helpers::add_member(bin, account).ok();
    bin.run_with_stdin(
        &[
            "card",
            "add",
            "--account",
            account,
            "--exp",
            "12/2030",
            "--terms-version",
            "2026-11",
        ],
        Some(&format!("{number}\n123\n")),
    )
    .ok()
    .id()
}

/// A monthly schedule of `amount` whose first payment is due now.
fn schedule_now(bin: &Bin, account: &str, card: &str, amount: &str) -> String {
    bin.run(&[
        "schedule",
        "add",
        "--account",
        account,
        "--card",
        card,
        "--monthly",
        "--day",
        "1",
        "--amount",
        amount,
        "--first-payment",
        "now",
    ])
    .ok()
    .id()
}

fn payments(bin: &Bin) -> Vec<serde_json::Value> {
    bin.run(&["payment", "list", "--json"])
        .ok()
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn state_of(account_payments: &[serde_json::Value], schedule: &str) -> String {
    account_payments
        .iter()
        .find(|p| p["schedule_id"] == schedule)
        .map(|p| p["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Runs `run --drain` until every payment rests (no `processing`, `unknown` or `scheduled`),
/// waiting out the settle delay between runs; returns the last run.
fn drain_until_settled(bin: &Bin) -> Run {
    let mut last = bin.run(&["run", "--drain"]).ok();
    for _ in 0..8 {
        let open = payments(bin).iter().any(|p| {
            matches!(
                p["state"].as_str(),
                Some("processing" | "unknown" | "scheduled")
            )
        });
        if !open {
            break;
        }
        std::thread::sleep(Duration::from_millis(3500));
        last = bin.run(&["run", "--drain"]).ok();
    }
    last
}

/// A database, and the member A-100200 with a Visa card and a 30.00 payment due now; the
/// schedule's id.
async fn one_payment_due(peer: &StripePeer) -> (TestDb, Bin, String) {
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = stripe_bin(&db, peer);
    let card = member_with_card(&bin, "A-100200", "4242424242424242");
    let s = schedule_now(&bin, "A-100200", &card, "30.00");
    (db, bin, s)
}

/// Makes the peer do `mode` (tests/stripe/README.md) to the next charge request.
async fn fault_next_charge(peer: &StripePeer, mode: &str) {
    peer.faults(serde_json::json!({"rules": [
        {"mode": mode, "path_prefix": "/v1/payment_intents", "method": "POST"}
    ]}))
    .await;
}

async fn posts_to_payment_intents(peer: &StripePeer) -> i64 {
    peer.stats().await["by_route"]["POST /v1/payment_intents"]
        .as_i64()
        .unwrap_or(0)
}

#[tokio::test]
async fn due_payments_are_charged_and_declines_recorded_through_stripe() {
    let db = TestDb::new(Kind::Sqlite).await;
    let peer = StripePeer::start();
    let bin = stripe_bin(&db, &peer);
    let good = member_with_card(&bin, "A-100200", "4242424242424242");
    let bad = member_with_card(&bin, "A-100201", "4000000000000341");
    // A card whose bank wants the cardholder to authenticate (3-D Secure): off-session, nobody
    // can, so the payment fails and the member is asked to pay online or by phone.
    let strict = member_with_card(&bin, "A-100202", "4000002500003155");
    let paid = schedule_now(&bin, "A-100200", &good, "30.00");
    let declined = schedule_now(&bin, "A-100201", &bad, "45.00");
    let authenticate = schedule_now(&bin, "A-100202", &strict, "20.00");
    bin.run(&["run", "--drain"]).ok();

    let all = payments(&bin);
    assert_eq!(state_of(&all, &paid), "succeeded", "{all:#?}");
    // localstripe's decline carries no decline code: Stripe's generic decline, retried later.
    assert_eq!(state_of(&all, &declined), "retry_wait", "{all:#?}");
    let a = all
        .iter()
        .find(|p| p["schedule_id"] == authenticate)
        .unwrap();
    assert_eq!(
        (a["state"].as_str(), a["decline_code"].as_str()),
        (Some("failed"), Some("authentication_required"))
    );
    let failed_mail = std::fs::read_dir(db.path().join("mail"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .find(|m| m.contains("confirm this payment yourself"))
        .expect("a failure notice for the 3-D Secure card");
    assert!(failed_mail.contains("Pay by phone"), "{failed_mail}");
    let p = all.iter().find(|p| p["schedule_id"] == paid).unwrap();
    let reference = p["processor_reference"].as_str().unwrap();
    assert!(reference.starts_with("pi_"), "{reference}");
    let d = all.iter().find(|p| p["schedule_id"] == declined).unwrap();
    assert_eq!(d["decline_code"], "generic_decline");

    // One PaymentIntent per payment: the approved one with the attempt's metadata.
    let pis = peer.payment_intents().await;
    assert_eq!(pis.len(), 3, "{pis:#?}");
    // The PaymentIntent left waiting for the member to authenticate is canceled: it can never
    // be completed after autopay recorded the payment as failed.
    let waiting = pis
        .iter()
        .find(|pi| pi["metadata"]["schedule_id"] == authenticate)
        .unwrap();
    assert_eq!(waiting["status"], "canceled", "{waiting:#}");
    let approved = pis.iter().find(|pi| pi["id"] == reference).unwrap();
    assert_eq!(approved["status"], "succeeded");
    assert_eq!(approved["amount"], 3000);
    assert_eq!(approved["metadata"]["payment_id"], p["id"]);
    assert_eq!(approved["metadata"]["attempt"], "1");
    assert_eq!(approved["metadata"]["account_last4"], "0200");
    let keys: Vec<&String> = approved["metadata"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "account_last4",
            "attempt",
            "installation_id",
            "occurrence",
            "payment_id",
            "schedule_id"
        ]
    );

    // Each member's Customer carries only the installation and member ids: no name, email or
    // description leaves the plan.
    let customers = peer.api_get("/v1/customers?limit=100").await;
    let customers = customers["data"].as_array().unwrap();
    assert_eq!(customers.len(), 3);
    for c in customers {
        let keys: Vec<&String> = c["metadata"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["installation_id", "member_id"]);
        assert!(c["email"].is_null() && c["name"].is_null() && c["description"].is_null());
    }
    // The card keeps Stripe's PaymentMethod, the test mode and the consent it was saved under.
    let cards = bin
        .run(&["card", "list", "--account", "A-100200", "--json"])
        .ok()
        .json();
    assert_eq!(cards[0]["processor"], "stripe");
    assert_eq!(cards[0]["processor_mode"], "test");
    assert_eq!(cards[0]["consent"]["via"], "cli");
    assert_eq!(cards[0]["consent"]["terms_version"], "2026-11");
    assert!(
        !cards.to_string().contains("pm_"),
        "the token is never shown: {cards}"
    );
}

#[tokio::test]
async fn a_dropped_answer_is_settled_by_lookup_without_a_second_payment_intent() {
    let peer = StripePeer::start();
    // list_filters stays at its default (true): the peer's refusal of the filters is detected
    // and the whole list paged instead.
    let (_db, bin, s) = one_payment_due(&peer).await;
    fault_next_charge(&peer, "drop_answer").await;
    bin.run(&["run", "--drain"]).ok();
    assert_eq!(state_of(&payments(&bin), &s), "unknown");
    let run = drain_until_settled(&bin);
    assert_eq!(state_of(&payments(&bin), &s), "succeeded", "{}", run.stderr);
    assert_eq!(peer.payment_intents().await.len(), 1);
    assert_eq!(posts_to_payment_intents(&peer).await, 1, "never sent again");
    assert!(
        run.stderr.contains("does not know the list filters"),
        "the refusal was detected: {}",
        run.stderr
    );
}

#[tokio::test]
async fn a_dropped_request_is_resent_with_its_key_and_charged_once() {
    let peer = StripePeer::start_with_list_filters();
    let (_db, bin, s) = one_payment_due(&peer).await;
    fault_next_charge(&peer, "drop_request").await;
    bin.run(&["run", "--drain"]).ok();
    assert_eq!(state_of(&payments(&bin), &s), "unknown");
    drain_until_settled(&bin);
    assert_eq!(state_of(&payments(&bin), &s), "succeeded");
    let pis = peer.payment_intents().await;
    assert_eq!(pis.len(), 1, "{pis:#?}");
    assert_eq!(
        posts_to_payment_intents(&peer).await,
        2,
        "the lost request, then its resend"
    );
}

#[tokio::test]
async fn a_replayed_server_error_is_never_resent_again_and_charges_nothing() {
    let peer = StripePeer::start_with_list_filters();
    let (_db, bin, s) = one_payment_due(&peer).await;
    fault_next_charge(&peer, "status_500").await;
    bin.run(&["run", "--drain"]).ok();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(3500));
        bin.run(&["run", "--drain"]).ok();
    }
    // The 500 left nothing at Stripe; the lookup found nothing and the same request went once
    // more, which Stripe answered by replaying the stored 500. A replayed error is never resent:
    // lookups alone settle it (here: still nothing, so the payment waits for them).
    assert_eq!(posts_to_payment_intents(&peer).await, 2);
    assert_eq!(peer.stats().await["replayed"], 1);
    assert!(peer.payment_intents().await.is_empty());
    assert_eq!(state_of(&payments(&bin), &s), "unknown");
}

#[tokio::test]
async fn a_burst_of_charges_stays_under_the_rate_limit() {
    let db = TestDb::new(Kind::Sqlite).await;
    let peer = StripePeer::start_with_list_filters();
    let bin = stripe_bin(&db, &peer).with_env("AUTOPAY__PROCESSOR__MAX_REQUESTS_PER_SECOND", "4");
    for i in 0..12 {
        let account = format!("A-1003{i:02}");
        let card = member_with_card(&bin, &account, "4242424242424242");
        schedule_now(&bin, &account, &card, "10.00");
    }
    let reset = reqwest::Client::new()
        .delete(format!("{}/_proxy/stats", peer.api_base()))
        .send()
        .await
        .unwrap();
    assert!(reset.status().is_success());
    bin.run(&["run", "--drain"]).ok();
    let stats = peer.stats().await;
    assert_eq!(stats["by_route"]["POST /v1/payment_intents"], 12);
    assert!(
        stats["max_in_one_second"].as_i64().unwrap() <= 4,
        "no second held more than the limit: {stats}"
    );
    let succeeded: HashMap<String, usize> = peer.succeeded_by_payment().await;
    assert_eq!(succeeded.len(), 12);
}

#[tokio::test]
async fn refused_credentials_release_the_payment_untouched_and_pause_charging() {
    let peer = StripePeer::start_with_list_filters();
    let (_db, bin, s) = one_payment_due(&peer).await;
    fault_next_charge(&peer, "status_401").await;
    let run = bin.run(&["run", "--drain"]).ok();
    assert!(
        run.stderr.contains("refused autopay's credentials"),
        "{}",
        run.stderr
    );
    let all = payments(&bin);
    assert_eq!(
        state_of(&all, &s),
        "scheduled",
        "released untouched: {all:#?}"
    );
    let status = bin.run(&["status", "--json"]).ok().json();
    assert!(
        status.to_string().contains("refused autopay's credentials"),
        "charging is paused with the reason: {status}"
    );
    // Nothing more is sent until an operator resumes; then the payment is charged once.
    bin.run(&["run", "--drain"]).ok();
    assert_eq!(posts_to_payment_intents(&peer).await, 1);
    bin.run(&["charging", "resume"]).ok();
    bin.run(&["run", "--drain"]).ok();
    assert_eq!(state_of(&payments(&bin), &s), "succeeded");
    assert_eq!(peer.succeeded_by_payment().await.len(), 1);
}

#[tokio::test]
async fn an_amount_under_stripe_s_minimum_is_skipped_and_stays_owed() {
    let db = TestDb::new(Kind::Sqlite).await;
    let peer = StripePeer::start_with_list_filters();
    let bin = stripe_bin(&db, &peer);
    let card = member_with_card(&bin, "A-100200", "4242424242424242");
    let s = schedule_now(&bin, "A-100200", &card, "0.30");
    bin.run(&["run", "--drain"]).ok();
    let all = payments(&bin);
    let p = all.iter().find(|p| p["schedule_id"] == s).unwrap();
    assert_eq!(p["state"], "skipped");
    assert_eq!(p["decline_code"], "below_minimum");
    assert_eq!(posts_to_payment_intents(&peer).await, 0, "never sent");
}

#[tokio::test]
async fn tokens_from_a_portal_are_checked_against_the_member_s_customer() {
    let db = TestDb::new(Kind::Sqlite).await;
    let peer = StripePeer::start_with_list_filters();
    let bin = stripe_bin(&db, &peer);
    member_with_card(&bin, "A-100200", "4242424242424242");
    let member = bin
        .run(&["member", "show", "A-100200", "--json"])
        .ok()
        .json();
    let card_form = [
        ("type", "card"),
        ("card[number]", "5555555555554444"),
        ("card[exp_month]", "4"),
        ("card[exp_year]", "2031"),
        ("card[cvc]", "123"),
    ];
    // A PaymentMethod saved to nobody is attached to the member's Customer and added.
    let loose = peer.api_post("/v1/payment_methods", &card_form).await;
    let loose_id = loose["id"].as_str().unwrap();
    let added = bin
        .run(&[
            "card",
            "add",
            "--account",
            "A-100200",
            "--token",
            loose_id,
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(added["last4"], "4444");
    let attached = peer
        .api_get(&format!("/v1/payment_methods/{loose_id}"))
        .await;
    assert!(attached["customer"].as_str().unwrap().starts_with("cus_"));
    // One saved to someone else's Customer is refused, and nothing is stored.
    let stranger = peer.api_post("/v1/customers", &[]).await;
    let theirs = peer.api_post("/v1/payment_methods", &card_form).await;
    let theirs_id = theirs["id"].as_str().unwrap();
    peer.api_post(
        &format!("/v1/payment_methods/{theirs_id}/attach"),
        &[("customer", stranger["id"].as_str().unwrap())],
    )
    .await;
    let refused = bin
        .run(&["card", "add", "--account", "A-100200", "--token", theirs_id])
        .fails_with(65);
    assert!(
        refused.stderr.contains("another Stripe customer"),
        "{}",
        refused.stderr
    );
    // A SetupIntent must have succeeded for this member's Customer.
    let customer = attached["customer"].as_str().unwrap();
    let pm = peer.api_post("/v1/payment_methods", &card_form).await;
    let si = peer
        .api_post(
            "/v1/setup_intents",
            &[("customer", customer), ("usage", "off_session")],
        )
        .await;
    let si_id = si["id"].as_str().unwrap();
    let unconfirmed = bin
        .run(&["card", "add", "--account", "A-100200", "--token", si_id])
        .fails_with(65);
    assert!(
        unconfirmed.stderr.contains("not succeeded"),
        "{}",
        unconfirmed.stderr
    );
    peer.api_post(
        &format!("/v1/setup_intents/{si_id}/confirm"),
        &[("payment_method", pm["id"].as_str().unwrap())],
    )
    .await;
    bin.run(&["card", "add", "--account", "A-100200", "--token", si_id])
        .ok();
    let cards = bin
        .run(&["card", "list", "--account", "A-100200", "--json"])
        .ok()
        .json();
    assert_eq!(cards.as_array().unwrap().len(), 3, "{cards}");
    assert!(member.to_string().contains("A-100200"));
}

#[tokio::test]
async fn a_live_key_never_sends_a_card_number_and_other_processors_cards_stop_the_daemon() {
    let db = TestDb::new(Kind::Sqlite).await;
    let peer = StripePeer::start_with_list_filters();
    // A card saved with the simulated processor...
    let simulated = Bin::new(&db);
    simulated.run(&["migrate"]).ok();
    crate::helpers::member_with_card(&simulated);
    // ...cannot be charged by Stripe: the daemon refuses to start, saying how to fix it.
    let bin = stripe_bin(&db, &peer);
    let run = bin.run(&["run", "--drain"]).fails_with(78);
    assert!(run.stderr.contains("1 simulated"), "{}", run.stderr);
    assert_eq!(peer.stats().await["requests"], 0);
    // Under a live key, a typed number is refused before anything is sent.
    let live = stripe_bin(&db, &peer)
        .with_env("AUTOPAY__PROCESSOR__STRIPE__SECRET_KEY", "sk_live_autopay");
    let refused = live
        .run_with_stdin(
            &["card", "add", "--account", "A-100200", "--exp", "12/2030"],
            Some("4242424242424242\n123\n"),
        )
        .fails_with(65);
    assert!(refused.stderr.contains("--token"), "{}", refused.stderr);
    assert!(!refused.stderr.contains("4242424242424242"));
    assert_eq!(peer.stats().await["requests"], 0);
}

const WEBHOOK_SECRET: &str = "whsec_autopay_test";

/// A `Stripe-Signature` header for `body`, signed at `t` with `secret`.
fn signature(secret: &str, t: i64, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{t}.{body}").as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

fn event(id: &str, kind: &str, object: &str) -> String {
    serde_json::json!({
        "id": id, "object": "event", "type": kind, "livemode": false,
        "created": 1, "data": {"object": {"id": object}},
    })
    .to_string()
}

/// POSTs a webhook to a daemon: the status and the answer's text.
async fn deliver(port: u16, signature: Option<&str>, body: &str) -> (u16, String) {
    let mut r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/webhooks/stripe"))
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(s) = signature {
        r = r.header("Stripe-Signature", s);
    }
    let answer = r.send().await.expect("the daemon answers");
    let status = answer.status().as_u16();
    (status, answer.text().await.unwrap_or_default())
}

fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}

#[tokio::test]
async fn signed_webhooks_settle_a_lost_answer_at_once_and_bad_ones_are_refused() {
    let peer = StripePeer::start_with_list_filters();
    let (db, bin, s) = one_payment_due(&peer).await;
    // A lookup would wait a minute: only the webhook can settle the payment sooner.
    let bin = bin
        .with_env("AUTOPAY__PROCESSOR__SETTLE_DELAY", "60s")
        .with_env("AUTOPAY__PROCESSOR__STRIPE__WEBHOOK_SECRET", WEBHOOK_SECRET);
    fault_next_charge(&peer, "drop_answer").await;
    let mut env = bin.env.clone();
    env.push(("AUTOPAY__DATABASE__URL".into(), db.url.clone()));
    env.push(("AUTOPAY__DAEMON__POLL_INTERVAL".into(), "1s".into()));
    let logs = tempfile::tempdir().unwrap();
    let mut daemon = crate::helpers::Daemon::start("webhooks", &env, logs.path());
    let url = format!("http://127.0.0.1:{}/webhooks/stripe", daemon.port);
    peer.send_webhooks_to(
        &url,
        WEBHOOK_SECRET,
        &["payment_intent.succeeded", "payment_intent.payment_failed"],
    )
    .await;
    let started = std::time::Instant::now();
    let mut state = String::new();
    while started.elapsed() < Duration::from_secs(20) {
        state = state_of(&payments(&bin), &s);
        if state == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        state, "succeeded",
        "settled by the webhook, not the 60 s lookup"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(peer.payment_intents().await.len(), 1);
    assert_eq!(posts_to_payment_intents(&peer).await, 1);

    let port = daemon.port;
    let body = event("evt_direct_1", "payment_intent.succeeded", "pi_none");
    // A bad signature, a stale one, none at all: 400, nothing done.
    let (code, _) = deliver(
        port,
        Some(&signature("whsec_wrong", now_secs(), &body)),
        &body,
    )
    .await;
    assert_eq!(code, 400);
    let (code, text) = deliver(
        port,
        Some(&signature(WEBHOOK_SECRET, now_secs() - 600, &body)),
        &body,
    )
    .await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("webhook_tolerance"), "{text}");
    assert_eq!(deliver(port, None, &body).await.0, 400);
    // A body over 64 KiB is refused before anything else.
    let big = "x".repeat(70 * 1024);
    assert_eq!(
        deliver(
            port,
            Some(&signature(WEBHOOK_SECRET, now_secs(), &big)),
            &big
        )
        .await
        .0,
        413
    );
    // A valid event twice: handled once (its object does not exist: nothing to do), then a
    // duplicate.
    let signed = signature(WEBHOOK_SECRET, now_secs(), &body);
    assert_eq!(
        deliver(port, Some(&signed), &body).await,
        (200, "ignored\n".into())
    );
    assert_eq!(
        deliver(port, Some(&signed), &body).await,
        (200, "duplicate: already handled\n".into())
    );

    // A refund and a dispute of the charge: recorded, no balance changes; the fraud dispute
    // disables the card.
    let reference = payments(&bin)
        .iter()
        .find(|p| p["schedule_id"] == s)
        .and_then(|p| p["processor_reference"].as_str().map(str::to_string))
        .unwrap();
    let pi = peer
        .api_get(&format!("/v1/payment_intents/{reference}"))
        .await;
    let charge = pi["latest_charge"]["id"]
        .as_str()
        .or(pi["latest_charge"].as_str())
        .unwrap()
        .to_string();
    peer.api_post(
        "/v1/refunds",
        &[("charge", charge.as_str()), ("amount", "500")],
    )
    .await;
    let body = event("evt_refund_1", "charge.refunded", &charge);
    let (code, text) = deliver(
        port,
        Some(&signature(WEBHOOK_SECRET, now_secs(), &body)),
        &body,
    )
    .await;
    assert_eq!((code, text.as_str()), (200, "refund\n"));
    let dispute = reqwest::Client::new()
        .post(format!("{}/_proxy/disputes", peer.api_base()))
        .body(serde_json::json!({"payment_intent": reference, "charge": charge, "reason": "fraudulent"}).to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dispute: serde_json::Value = serde_json::from_str(&dispute).unwrap();
    let body = event(
        "evt_dispute_1",
        "charge.dispute.created",
        dispute["id"].as_str().unwrap(),
    );
    let (code, text) = deliver(
        port,
        Some(&signature(WEBHOOK_SECRET, now_secs(), &body)),
        &body,
    )
    .await;
    assert_eq!((code, text.as_str()), (200, "dispute\n"));
    let cards = bin
        .run(&["card", "list", "--account", "A-100200", "--json"])
        .ok()
        .json();
    assert_eq!(cards[0]["status"], "disabled", "{cards}");
    let status = bin.run(&["status"]).ok();
    assert!(
        status.stdout.contains("1 refund(s) and 1 dispute(s)"),
        "{}",
        status.stdout
    );
    let paid = payments(&bin);
    assert_eq!(
        state_of(&paid, &s),
        "succeeded",
        "a refund changes no payment"
    );
    // A second succeeded PaymentIntent for the paid payment (someone charged it by hand at
    // Stripe): reported as a charge the payment does not record, for a person to check.
    let metadata: Vec<(String, String)> = pi["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (format!("metadata[{k}]"), v.as_str().unwrap().to_string()))
        .collect();
    let mut form: Vec<(&str, &str)> = vec![
        ("amount", "3000"),
        ("currency", "usd"),
        ("payment_method", pi["payment_method"].as_str().unwrap()),
        ("confirm", "true"),
    ];
    form.extend(metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let extra = peer.api_post("/v1/payment_intents", &form).await;
    assert_eq!(extra["status"], "succeeded", "{extra:#}");
    let body = event(
        "evt_extra_1",
        "payment_intent.succeeded",
        extra["id"].as_str().unwrap(),
    );
    let (code, text) = deliver(
        port,
        Some(&signature(WEBHOOK_SECRET, now_secs(), &body)),
        &body,
    )
    .await;
    assert_eq!((code, text.as_str()), (200, "unrecorded_charge\n"));
    // The card networks' updater: the card's details are read back from Stripe.
    let pm = pi["payment_method"].as_str().unwrap();
    let body = event("evt_pm_1", "payment_method.automatically_updated", pm);
    let (code, text) = deliver(
        port,
        Some(&signature(WEBHOOK_SECRET, now_secs(), &body)),
        &body,
    )
    .await;
    assert_eq!((code, text.as_str()), (200, "card_refreshed\n"));
    let cards = bin
        .run(&["card", "list", "--account", "A-100200", "--json"])
        .ok()
        .json();
    assert_eq!(
        cards[0]["status"], "disabled",
        "a card disabled after a fraud dispute stays so"
    );
    daemon.stop();
}

#[tokio::test]
async fn a_card_renewed_at_stripe_is_read_back_before_an_expiry_notice() {
    let db = TestDb::new(Kind::Sqlite).await;
    let peer = StripePeer::start_with_list_filters();
    let bin = stripe_bin(&db, &peer).with_env("AUTOPAY__REMINDERS__CARD_EXPIRY_DAYS", "45");
    let first = member_with_card(&bin, "A-100200", "4242424242424242");
    let second = member_with_card(&bin, "A-100201", "5555555555554444");
    for (account, card) in [("A-100200", &first), ("A-100201", &second)] {
        schedule_now(&bin, account, card, "10.00");
    }
    bin.run(&["run", "--drain"]).ok();
    // The local copies say both cards expire this month; Stripe holds 12/2030 for them (the
    // networks' updater renewed them there).
    let this_month = jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .date();
    let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE payment_methods SET exp_month = $1, exp_year = $2")
        .bind(i64::from(this_month.month()))
        .bind(i64::from(this_month.year()))
        .execute(&pool)
        .await
        .unwrap();
    bin.run(&["run", "--drain"]).ok();
    let card = |account: &str| {
        bin.run(&["card", "list", "--account", account, "--json"])
            .ok()
            .json()[0]
            .clone()
    };
    assert_eq!(card("A-100200")["exp_year"], 2030, "read back from Stripe");
    assert_eq!(card("A-100201")["exp_year"], 2030);
    let notices: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM notifications WHERE kind = 'card_expiring'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        notices.is_empty(),
        "no notice for a card Stripe renewed: {notices:?}"
    );
    // Read at most once a day: a second run asks Stripe nothing more.
    bin.run(&["run", "--drain"]).ok();
    let after = peer.stats().await["by_route"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("GET /v1/payment_methods/"))
        .map(|(_, n)| n.as_i64().unwrap())
        .sum::<i64>();
    assert_eq!(after, 2, "each card read once");
}

/// Done when: three daemons on one PostgreSQL, through a peer that drops 5 % of the answers
/// after charging and 5 % of the requests before it, one daemon killed with SIGKILL now and
/// then. Afterwards, at the peer: no payment has two succeeded PaymentIntents, and every
/// succeeded one is recorded by autopay as that payment's success (and every success has one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_through_a_lossy_peer_charge_each_payment_once() {
    const MEMBERS: usize = 50;
    const PER_MEMBER: usize = 4;
    let seed = crate::helpers::env_number(
        "AUTOPAY_STRIPE_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("stripe chaos: AUTOPAY_STRIPE_CHAOS_SEED={seed}");
    let mut dice = crate::helpers::Rng(seed);
    let db = TestDb::new(Kind::Postgres).await;
    let peer = StripePeer::start_with_list_filters();
    let bin = stripe_bin(&db, &peer);
    load_stripe_payments(&db, &peer, MEMBERS, PER_MEMBER).await;
    peer.faults(serde_json::json!({
        "drop_request_rate": 0.05, "drop_answer_rate": 0.05, "seed": seed % 1_000_000,
        "path_prefix": "/v1/payment_intents", "methods": ["POST"],
    }))
    .await;
    let mut env = bin.env.clone();
    for (k, v) in [
        ("AUTOPAY__DATABASE__URL", db.url.as_str()),
        ("AUTOPAY__DATABASE__MAX_CONNECTIONS", "8"),
        ("AUTOPAY__LOG__FORMAT", "json"),
        ("AUTOPAY__LOG__LEVEL", "warn"),
        ("AUTOPAY__PROCESSOR__TIMEOUT", "1s"),
        ("AUTOPAY__PROCESSOR__SETTLE_DELAY", "2s"),
        ("AUTOPAY__PROCESSOR__MAX_REQUESTS_PER_SECOND", "20"),
        ("AUTOPAY__DAEMON__LEASE", "32s"),
        ("AUTOPAY__DAEMON__SHUTDOWN_GRACE", "5s"),
        ("AUTOPAY__DAEMON__POLL_INTERVAL", "1s"),
        ("AUTOPAY__DAEMON__CONCURRENCY", "4"),
        ("AUTOPAY__REMINDERS__DAYS_BEFORE", "0"),
        ("AUTOPAY__REMINDERS__CARD_EXPIRY_DAYS", "0"),
    ] {
        env.push((k.into(), v.into()));
    }
    let logs = tempfile::tempdir().unwrap();
    let mut killed = crate::helpers::Daemon::start("killed", &env, logs.path());
    let mut steady = crate::helpers::Daemon::start("steady", &env, logs.path());
    let mut third = crate::helpers::Daemon::start("third", &env, logs.path());
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let started = std::time::Instant::now();
    let mut kills = 0;
    let mut next_kill = started + dice.millis(300, 1500);
    loop {
        if kills < 3 && std::time::Instant::now() >= next_kill {
            killed.kill();
            std::thread::sleep(dice.millis(100, 500));
            killed.spawn();
            kills += 1;
            next_kill = std::time::Instant::now() + dice.millis(500, 2500);
        }
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM payments WHERE state IN ('scheduled', 'processing', 'retry_wait', 'unknown')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let planned: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM payments")
            .fetch_one(&pool)
            .await
            .unwrap();
        if kills >= 3 && open == 0 && planned == (MEMBERS * PER_MEMBER) as i64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(150) {
            let kept = logs.keep();
            panic!(
                "not settled in time: {open} payments open; daemon logs in {}",
                kept.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    for d in [&mut killed, &mut steady, &mut third] {
        d.stop();
    }
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, COUNT(*) FROM payments GROUP BY state ORDER BY state")
            .fetch_all(&pool)
            .await
            .unwrap();
    let why: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT state, reason, decline_code FROM payments WHERE state <> 'succeeded' LIMIT 5",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    eprintln!("payments by state: {states:?}; not succeeded: {why:?}");
    let stats = peer.stats().await;
    eprintln!(
        "stripe chaos settled in {elapsed:?}; the peer dropped {} requests and {} answers",
        stats["dropped_requests"], stats["dropped_answers"]
    );
    assert!(
        stats["dropped_requests"].as_i64().unwrap() + stats["dropped_answers"].as_i64().unwrap()
            > 0
    );

    // At the peer: succeeded PaymentIntents per payment.
    let mut succeeded: HashMap<String, Vec<String>> = HashMap::new();
    for pi in peer.payment_intents().await {
        if pi["status"] == "succeeded" {
            succeeded
                .entry(pi["metadata"]["payment_id"].as_str().unwrap().to_string())
                .or_default()
                .push(pi["id"].as_str().unwrap().to_string());
        }
    }
    let twice: Vec<_> = succeeded.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(twice.is_empty(), "charged twice: {twice:?}");
    let rows: Vec<(uuid::Uuid, String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT id, state, processor_reference, reason FROM payments")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), MEMBERS * PER_MEMBER);
    let mut review = 0;
    for (id, state, reference, reason) in &rows {
        let charged = succeeded.get(&id.to_string()).map(|p| &p[0]);
        match state.as_str() {
            "succeeded" => assert_eq!(reference.as_ref(), charged, "payment {id}"),
            "needs_review" => {
                assert!(
                    reason.is_some(),
                    "payment {id} needs review without a reason"
                );
                review += 1;
            }
            other => {
                assert!(
                    charged.is_none(),
                    "payment {id} is {other} but was charged at the peer"
                )
            }
        }
    }
    for pid in succeeded.keys() {
        assert!(
            rows.iter().any(|(id, state, ..)| id.to_string() == *pid
                && (state == "succeeded" || state == "needs_review")),
            "payment {pid} was charged at the peer without autopay recording it"
        );
    }
    eprintln!("{} payments, {review} need review", rows.len());
    let charged = rows.iter().filter(|r| r.1 == "succeeded").count();
    assert!(
        charged + review >= rows.len() * 9 / 10,
        "most payments are charged: {states:?}"
    );
}

/// Adds `members` members, each with a card saved at the peer (a Customer of their own) and
/// `per_member` monthly schedules whose first payments are due now, through the store and the
/// adapter in this process: the CLI would take a second per member.
async fn load_stripe_payments(db: &TestDb, peer: &StripePeer, members: usize, per_member: usize) {
    use autopay::clock::{Clock, SystemClock};
    use autopay::domain::card::{CardNumber, Expiry, SecurityCode};
    use autopay::domain::money::{Currency, Money};
    use autopay::processor::{CardOwner, Processor};
    use autopay::store::{Audit, Consent, NewCard};

    let api_base = peer.api_base();
    let settings = crate::engine::settings(&[
        ("AUTOPAY__PROCESSOR__KIND", "stripe"),
        ("AUTOPAY__PROCESSOR__STRIPE__API_BASE", api_base.as_str()),
        ("AUTOPAY__PROCESSOR__STRIPE__SECRET_KEY", TEST_KEY),
    ]);
    let store = db.store().await;
    let installation = store.control().await.unwrap().installation_id;
    let stripe = autopay::processor::stripe::StripeProcessor::new(
        &settings.processor.stripe,
        Duration::from_secs(10),
        installation,
    )
    .unwrap();
    let now = SystemClock.now();
    let audit = Audit {
        actor: "test-load".into(),
        at: now,
    };
    for m in 0..members {
        let member = crate::helpers::add_load_member(store.as_ref(), m, &audit).await;
        let owner = CardOwner {
            member_id: member.id,
            customer: None,
        };
        // A card of its own per member: the networks' limits count per card (fingerprint).
        let number = CardNumber::parse(&visa_number(m)).unwrap();
        let code = SecurityCode::parse("123", number.brand()).unwrap();
        let t = stripe
            .tokenize(&owner, &number, &code, Expiry::new(12, 2035).unwrap())
            .await
            .unwrap();
        let card = store
            .add_card(
                &NewCard {
                    member_id: member.id,
                    processor: "stripe".into(),
                    processor_token: t.token,
                    brand: t.details.brand,
                    last4: t.details.last4,
                    expiry: t.details.expiry,
                    fingerprint: t.fingerprint,
                    customer: t.customer,
                    processor_mode: stripe.mode().map(str::to_string),
                    consent: Consent {
                        at: now,
                        via: "cli".into(),
                        terms_version: None,
                    },
                },
                &audit,
            )
            .await
            .unwrap();
        for i in 0..per_member {
            crate::helpers::schedule_first_due(
                store.as_ref(),
                (member.id, card.id),
                now,
                Money::from_minor(1000 + i as i64, Currency::USD),
                &audit,
            )
            .await;
        }
    }
}

/// A Visa number of its own for `n`: `4111 11`, nine digits and the check digit.
fn visa_number(n: usize) -> String {
    let body = format!("411111{n:09}");
    let sum: u32 = body
        .chars()
        .rev()
        .enumerate()
        .map(|(i, c)| {
            let d = c.to_digit(10).unwrap();
            if i % 2 == 0 {
                let dd = d * 2;
                if dd > 9 { dd - 9 } else { dd }
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}
