//! Notifications end to end: outbox rows written with the changes members hear about, rendered
//! and delivered through the file transport and through a real SMTP server (aiosmtpd, STARTTLS
//! with a test CA, AUTH), with temporary failures, refusals, outages and hostile inputs.

use std::sync::Arc;

use autopay::clock::Clock;
use autopay::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use autopay::domain::payment::AmountRule;
use autopay::notify::dispatcher::Dispatcher;
use autopay::notify::mailer::SmtpMailer;
use autopay::notify::templates::{KINDS, Templates};
use autopay::store::{Member, NewMember, NewNotification};
use jiff::SignedDuration;
use mail_parser::{MessageParser, MimeHeaders};

use crate::engine::{World, usd};
use crate::helpers::{Bin, Kind, TestDb};
use crate::smtp_peer::{PeerOptions, SmtpPeer};

const USER: &str = "autopay";
const PASSWORD: &str = "s3cret-mail-pw";

fn peer() -> SmtpPeer {
    SmtpPeer::start(PeerOptions {
        starttls: true,
        wrapper: false,
        auth: Some((USER.into(), PASSWORD.into())),
    })
}

/// A world whose email settings point at the peer.
async fn world_for(peer: &SmtpPeer, password: &str) -> World {
    let port = peer.port.to_string();
    let ca = peer.ca_pem.display().to_string();
    World::with_settings(
        Kind::Sqlite,
        &[
            ("AUTOPAY__EMAIL__TRANSPORT", "smtp"),
            ("AUTOPAY__EMAIL__SMTP__HOST", "127.0.0.1"),
            ("AUTOPAY__EMAIL__SMTP__PORT", &port),
            ("AUTOPAY__EMAIL__SMTP__TLS", "required"),
            ("AUTOPAY__EMAIL__SMTP__CA_FILE", &ca),
            ("AUTOPAY__EMAIL__SMTP__USERNAME", USER),
            ("AUTOPAY__EMAIL__SMTP__PASSWORD", password),
            ("AUTOPAY__EMAIL__SMTP__TIMEOUT", "5s"),
        ],
    )
    .await
}

fn dispatcher(w: &World) -> Dispatcher {
    let mailer = SmtpMailer::new(&w.settings.email).expect("an SMTP transport");
    Dispatcher::new(
        &w.settings,
        w.store.clone(),
        Arc::new(mailer),
        Arc::new(Templates::builtin()),
        w.clock.clone(),
        "test-dispatcher".into(),
    )
    .expect("a dispatcher")
}

async fn member_at(w: &World, account: &str, email: &str, name: &str, kind: AccountType) -> Member {
    w.store
        .add_member(
            &NewMember {
                account_number: AccountNumber::parse(account).unwrap(),
                account_type: kind,
                name: MemberName::parse(name).unwrap(),
                email: EmailAddress::parse(email).unwrap(),
                time_zone: "America/Los_Angeles".into(),
            },
            &w.audit(),
        )
        .await
        .unwrap()
}

async fn enqueue(w: &World, member: &Member, kind: &str, key: &str, payload: serde_json::Value) {
    let n = NewNotification {
        kind: kind.into(),
        dedupe_key: key.into(),
        member_id: member.id,
        payload,
        expires_at: None,
    };
    assert!(w.store.enqueue(&n, w.clock.now()).await.unwrap());
}

/// Queues a receipt with the sample payload under `key`.
async fn receipt(w: &World, member: &Member, key: &str) {
    enqueue(
        w,
        member,
        "receipt",
        key,
        Templates::sample_payload("receipt"),
    )
    .await;
}

fn parse(raw: &[u8]) -> mail_parser::Message<'_> {
    MessageParser::default()
        .parse(raw)
        .expect("a MIME parser reads the message")
}

/// The checks every delivered message must pass: headers, multipart/alternative, UTF-8.
fn assert_well_formed(raw: &[u8], notification_id: &str) {
    let m = parse(raw);
    assert_eq!(
        m.message_id(),
        Some(format!("{notification_id}@example.org").as_str())
    );
    assert!(
        m.subject()
            .is_some_and(|s| !s.is_empty() && !s.contains('\n'))
    );
    assert!(m.date().is_some());
    assert_eq!(
        m.from().and_then(|f| f.first()).and_then(|a| a.address()),
        Some("billing@example.org")
    );
    let ct = m.content_type().expect("a Content-Type");
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("multipart", Some("alternative"))
    );
    assert_eq!((m.text_body_count(), m.html_body_count()), (1, 1));
    for part in [m.text_part(0).unwrap(), m.html_part(0).unwrap()] {
        let ct = part.content_type().unwrap();
        assert_eq!(
            ct.attribute("charset").map(str::to_lowercase).as_deref(),
            Some("utf-8")
        );
    }
    let text = m.body_text(0).unwrap();
    assert!(
        text.contains("Example Health Plan") && text.contains("1-800-555-0100"),
        "{text}"
    );
}

#[tokio::test]
async fn a_drain_writes_receipts_and_notices_as_eml_files_a_mail_client_opens() {
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db);
    let run = bin.run(&["run", "--demo", "--drain"]).ok();
    assert!(
        run.stdout.contains("sent (.eml files in mail)"),
        "{}",
        run.stdout
    );
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(db.path().join("mail")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let (id, kind) = name.trim_end_matches(".eml").split_at(36);
        let raw = std::fs::read(&path).unwrap();
        assert_well_formed(&raw, id);
        kinds.push(kind.trim_start_matches('-').to_string());
        if kind.ends_with("receipt")
            && parse(&raw)
                .to()
                .and_then(|t| t.first())
                .and_then(|a| a.address())
                == Some("ana.diaz@example.org")
        {
            let text = parse(&raw).body_text(0).unwrap().to_string();
            assert!(
                text.contains("165.00 USD")
                    && text.contains("Visa ending 4242")
                    && text.contains("INV-D1001"),
                "{text}"
            );
            assert!(text.contains("Dear Ana Díaz"), "UTF-8 survives: {text}");
        }
    }
    for kind in [
        "setup",
        "receipt",
        "declined",
        "failed",
        "card_disabled",
        "schedule_suspended",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    // A second drain sends nothing again.
    let before = std::fs::read_dir(db.path().join("mail")).unwrap().count();
    bin.run(&["run", "--drain"]).ok();
    assert_eq!(
        std::fs::read_dir(db.path().join("mail")).unwrap().count(),
        before
    );
}

#[tokio::test]
async fn a_setup_email_queued_before_an_address_change_goes_to_the_new_address() {
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    crate::helpers::add_member(&bin, "A-100200").ok();
    let card = crate::helpers::add_card(&bin, "A-100200", "4242424242424242")
        .ok()
        .id();
    // The setup confirmation is queued for ana@example.org ...
    bin.run(&[
        "schedule",
        "add",
        "--account",
        "A-100200",
        "--card",
        &card,
        "--monthly",
        "--day",
        "1",
        "--amount",
        "10.00",
    ])
    .ok();
    // ... and the member's address changes before it goes.
    bin.run(&[
        "member",
        "update",
        "A-100200",
        "--email",
        "ana.new@example.org",
    ])
    .ok();
    bin.run(&["run", "--drain"]).ok();

    let mail: Vec<_> = std::fs::read_dir(db.path().join("mail"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(mail.len(), 1, "{mail:?}");
    let raw = std::fs::read(&mail[0]).unwrap();
    let to: Vec<String> = parse(&raw)
        .to()
        .map(|t| {
            t.iter()
                .filter_map(|a| a.address())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(to, ["ana.new@example.org"]);
    let member = db
        .store()
        .await
        .member(&AccountNumber::parse("A-100200").unwrap())
        .await
        .unwrap();
    let rows = db
        .store()
        .await
        .notifications(Some(member.id))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].recipient.as_str(), rows[0].state.as_str()),
        ("ana.new@example.org", "sent"),
        "the row records where it went"
    );
}

#[tokio::test]
async fn every_kind_reaches_a_real_smtp_server_once_with_its_message_id() {
    let peer = peer();
    let w = world_for(&peer, PASSWORD).await;
    let ana = member_at(
        &w,
        "A-100200",
        "ana@example.org",
        "Ana Díaz",
        AccountType::IndividualFamily,
    )
    .await;
    let acme = member_at(
        &w,
        "E-500000",
        "benefits@acme.example",
        "Acme Manufacturing",
        AccountType::EmployerGroup,
    )
    .await;
    for kind in KINDS {
        enqueue(
            &w,
            &ana,
            kind,
            &format!("{kind}:ana"),
            Templates::sample_payload(kind),
        )
        .await;
    }
    let mut group = Templates::sample_payload("receipt");
    group["member_name"] = "Acme Manufacturing".into();
    group["account_type"] = "employer-group".into();
    enqueue(&w, &acme, "receipt", "receipt:acme", group).await;
    let report = dispatcher(&w).drain().await.unwrap();
    assert_eq!(
        (report.sent, report.failed, report.retrying),
        (KINDS.len() as u64 + 1, 0, 0),
        "{report:?}"
    );
    let got = peer.received();
    assert_eq!(got.len(), KINDS.len() + 1, "each once");
    let outbox = w.store.notifications(None).await.unwrap();
    for n in &outbox {
        assert_eq!(n.state, "sent");
        let matching: Vec<_> = got
            .iter()
            .filter(|r| {
                parse(&r.raw).message_id() == Some(format!("{}@example.org", n.id).as_str())
            })
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "notification {} ({}) arrived once",
            n.id,
            n.kind
        );
        assert!(matching[0].tls && matching[0].authenticated);
        assert_eq!(matching[0].rcpt_tos, std::slice::from_ref(&n.recipient));
        assert_well_formed(&matching[0].raw, &n.id.to_string());
    }
    let to_acme = got
        .iter()
        .find(|r| r.rcpt_tos == ["benefits@acme.example"])
        .unwrap();
    let text = parse(&to_acme.raw).body_text(0).unwrap().to_string();
    assert!(
        text.contains("Dear benefits administrator of Acme Manufacturing"),
        "{text}"
    );
    // Nothing is sent twice.
    assert_eq!(dispatcher(&w).drain().await.unwrap().claimed, 0);
}

#[tokio::test]
async fn a_temporary_refusal_is_retried_and_delivered_once() {
    let peer = peer();
    let w = world_for(&peer, PASSWORD).await;
    let m = member_at(
        &w,
        "A-100200",
        "tempfail-1+ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    receipt(&w, &m, "receipt:1").await;
    let first = dispatcher(&w).drain().await.unwrap();
    assert_eq!((first.sent, first.retrying), (0, 1));
    assert!(peer.received().is_empty());
    // Not before email.retry_delays' first delay (1m); then once.
    assert_eq!(dispatcher(&w).drain().await.unwrap().claimed, 0);
    w.advance(SignedDuration::from_secs(61));
    assert_eq!(dispatcher(&w).drain().await.unwrap().sent, 1);
    assert_eq!(peer.received().len(), 1);
    assert!(!w.store.member_by_id(m.id).await.unwrap().email_bouncing);
}

#[tokio::test]
async fn a_refused_recipient_fails_that_notification_and_flags_the_address() {
    let peer = peer();
    let w = world_for(&peer, PASSWORD).await;
    let bad = member_at(
        &w,
        "A-100200",
        "reject+ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    let good = member_at(
        &w,
        "B-100300",
        "ben@example.org",
        "Ben",
        AccountType::IndividualFamily,
    )
    .await;
    receipt(&w, &bad, "receipt:bad").await;
    receipt(&w, &good, "receipt:good").await;
    let report = dispatcher(&w).drain().await.unwrap();
    assert_eq!(
        (report.sent, report.failed, report.paused),
        (1, 1, false),
        "{report:?}"
    );
    assert!(w.store.member_by_id(bad.id).await.unwrap().email_bouncing);
    assert_eq!(w.store.status().await.unwrap().members_bouncing, 1);
    // The operator finds the member by the flag, and a new address clears it.
    let bin = Bin::new(&w._db);
    let listed = bin.run(&["member", "list", "--bouncing"]).ok().stdout;
    assert!(listed.contains("A-100200"), "{listed}");
    assert!(!listed.contains("B-100300"), "{listed}");
    bin.run(&["member", "update", "A-100200", "--email", "ana@example.org"])
        .ok();
    let listed = bin.run(&["member", "list", "--bouncing"]).ok().stdout;
    assert!(!listed.contains("A-100200"), "{listed}");
    // Not retried.
    w.advance(SignedDuration::from_hours(24));
    assert_eq!(dispatcher(&w).drain().await.unwrap().claimed, 0);
    assert_eq!(peer.received().len(), 1);
}

#[tokio::test]
async fn a_wrong_password_pauses_mail_and_loses_nothing() {
    let peer = peer();
    let wrong = world_for(&peer, "not-the-password").await;
    let m = member_at(
        &wrong,
        "A-100200",
        "ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    for i in 0..3 {
        receipt(&wrong, &m, &format!("receipt:{i}")).await;
    }
    let report = dispatcher(&wrong).drain().await.unwrap();
    assert!(report.paused, "{report:?}");
    assert_eq!((report.sent, report.failed), (0, 0));
    let control = wrong.store.control().await.unwrap();
    let paused = control.mail_paused.expect("mail paused");
    assert!(
        paused.reason.contains("authentication"),
        "{}",
        paused.reason
    );
    assert!(
        !paused.reason.contains("not-the-password"),
        "the password never appears"
    );
    let status = Bin::new(&wrong._db).run(&["status"]).ok().stdout;
    assert!(status.contains("PAUSED"), "{status}");
    // The operator fixes the password: everything goes, once, and mail is running again.
    let fixed_env = world_for(&peer, PASSWORD).await;
    let fixed = World {
        settings: fixed_env.settings.clone(),
        ..wrong
    };
    fixed.advance(SignedDuration::from_secs(61));
    let report = dispatcher(&fixed).drain().await.unwrap();
    assert_eq!(report.sent, 3, "{report:?}");
    assert_eq!(peer.received().len(), 3);
    assert!(fixed.store.control().await.unwrap().mail_paused.is_none());
}

#[tokio::test]
async fn relay_denied_and_an_untrusted_certificate_pause_mail_without_failing_anything() {
    let peer = peer();
    let w = world_for(&peer, PASSWORD).await;
    let m = member_at(
        &w,
        "A-100200",
        "relaydenied@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    receipt(&w, &m, "receipt:relay").await;
    let report = dispatcher(&w).drain().await.unwrap();
    assert_eq!(
        (report.paused, report.failed, report.retrying),
        (true, 0, 1),
        "{report:?}"
    );
    assert!(
        w.store
            .control()
            .await
            .unwrap()
            .mail_paused
            .unwrap()
            .reason
            .contains("relay")
    );

    // Without the test CA the server's certificate is not trusted: a session refusal too.
    let untrusted = World::with_settings(
        Kind::Sqlite,
        &[
            ("AUTOPAY__EMAIL__TRANSPORT", "smtp"),
            ("AUTOPAY__EMAIL__SMTP__HOST", "127.0.0.1"),
            ("AUTOPAY__EMAIL__SMTP__PORT", &peer.port.to_string()),
            ("AUTOPAY__EMAIL__SMTP__USERNAME", USER),
            ("AUTOPAY__EMAIL__SMTP__PASSWORD", PASSWORD),
        ],
    )
    .await;
    let m = member_at(
        &untrusted,
        "A-100200",
        "ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    receipt(&untrusted, &m, "receipt:tls").await;
    let report = dispatcher(&untrusted).drain().await.unwrap();
    assert_eq!((report.paused, report.failed), (true, 0), "{report:?}");
    let reason = untrusted
        .store
        .control()
        .await
        .unwrap()
        .mail_paused
        .unwrap()
        .reason;
    assert!(reason.contains("certificate"), "{reason}");
    assert!(peer.received().is_empty());
}

#[tokio::test]
async fn the_server_down_for_a_while_loses_nothing() {
    let mut peer = peer();
    let w = world_for(&peer, PASSWORD).await;
    let m = member_at(
        &w,
        "A-100200",
        "ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    peer.stop();
    for i in 0..4 {
        receipt(&w, &m, &format!("receipt:{i}")).await;
    }
    let down = dispatcher(&w).drain().await.unwrap();
    assert_eq!(
        (down.sent, down.retrying, down.failed),
        (0, 4, 0),
        "{down:?}"
    );
    w.advance(SignedDuration::from_secs(61));
    let still_down = dispatcher(&w).drain().await.unwrap();
    assert_eq!(still_down.sent, 0);
    peer.restart();
    w.advance(SignedDuration::from_secs(6 * 60));
    let up = dispatcher(&w).drain().await.unwrap();
    assert_eq!(up.sent, 4, "{up:?}");
    let got = peer.received();
    assert_eq!(got.len(), 4, "everything arrives, once");
}

#[tokio::test]
async fn an_unreachable_server_pauses_mail_and_when_it_answers_everything_that_waited_goes_at_once()
{
    let mut peer = peer();
    let w = world_for(&peer, PASSWORD).await;
    let m = member_at(
        &w,
        "A-100200",
        "ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    peer.stop();
    for i in 0..3 {
        receipt(&w, &m, &format!("receipt:{i}")).await;
    }
    let down = dispatcher(&w).drain().await.unwrap();
    assert!(down.paused, "{down:?}");
    assert_eq!((down.sent, down.failed), (0, 0), "{down:?}");
    let pause = w.store.control().await.unwrap().mail_paused.unwrap();
    assert!(
        pause.reason.contains("cannot reach the mail server"),
        "{pause:?}"
    );
    // The server is back. The three that waited are not due again for a while; a new receipt
    // is due now: the first delivery lifts the pause and everything goes.
    peer.restart();
    receipt(&w, &m, "receipt:new").await;
    let up = dispatcher(&w).drain().await.unwrap();
    assert_eq!(up.sent, 4, "{up:?}");
    assert!(w.store.control().await.unwrap().mail_paused.is_none());
    assert_eq!(peer.received().len(), 4);
}

#[tokio::test]
async fn hostile_values_in_every_field_cannot_inject_headers_or_markup() {
    let peer = peer();
    let w = world_for(&peer, PASSWORD).await;
    let m = member_at(
        &w,
        "A-100200",
        "ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    let hostile = [
        "<script>alert(1)</script>",
        "\r\nBcc: evil@example.com",
        "{{ 7*7 }}",
        "\u{202e}gnp.exe",
        &"A".repeat(5000),
    ];
    for kind in KINDS {
        let mut payload = Templates::sample_payload(kind);
        for (i, value) in payload.as_object_mut().unwrap().values_mut().enumerate() {
            if value.is_string() {
                *value = serde_json::Value::String(hostile[i % hostile.len()].to_string());
            }
        }
        enqueue(&w, &m, kind, &format!("{kind}:hostile"), payload).await;
    }
    let report = dispatcher(&w).drain().await.unwrap();
    assert_eq!(report.sent as usize, KINDS.len(), "{report:?}");
    for got in peer.received() {
        assert_eq!(got.rcpt_tos, ["ana@example.org"], "no extra recipient");
        let parsed = parse(&got.raw);
        assert!(parsed.header("Bcc").is_none());
        let html = parsed.body_html(0).unwrap();
        assert!(!html.contains("<script>"), "HTML is escaped");
        let text = parsed.body_text(0).unwrap();
        assert!(!text.contains("49"), "template syntax in data is not run");
    }
}

async fn changes_members_hear_about_write_their_outbox_rows(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4242424242424242").await;
    let s = w
        .schedule_now(
            &m,
            &card,
            AmountRule::Fixed {
                amount: usd("25.00"),
            },
        )
        .await;
    let other = w.card(&m, "5555555555554444").await;
    let change = autopay::store::ScheduleChange {
        id: s.id,
        expected_version: s.version,
        card_id: other.id,
        recurrence: s.recurrence.clone(),
        amount: s.amount,
        next_run_at: s.next_run_at,
        next_occurrence: s.next_occurrence,
        lift_suspension: true,
        summary: "card".into(),
    };
    let changed = w.store.update_schedule(&change, &w.audit()).await.unwrap();
    let paused = w.store.pause_schedule(s.id, &w.audit()).await.unwrap();
    w.store.cancel_schedule(s.id, &w.audit()).await.unwrap();
    let keys: Vec<String> = w
        .store
        .notifications(Some(m.id))
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.dedupe_key)
        .collect();
    assert_eq!(
        keys,
        vec![
            format!("setup:{}", s.id),
            format!("changed:{}:{}", s.id, changed.version),
            format!("paused:{}:{}", s.id, paused.version),
            format!("cancelled:{}", s.id),
        ]
    );
    let setup = &w.store.notifications(Some(m.id)).await.unwrap()[0];
    assert_eq!(setup.payload["card"], "Visa ending 4242");
    assert_eq!(setup.payload["amount"], "25.00 USD");
}

async fn reminders_go_once_before_the_charge_and_only_to_members_who_want_them(kind: Kind) {
    use autopay::notify::reminders::{scan_card_expiry, scan_upcoming};
    let w = World::new(kind).await;
    let wants = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&wants, "4242424242424242").await;
    w.schedule_now(
        &wants,
        &card,
        AmountRule::Fixed {
            amount: usd("25.00"),
        },
    )
    .await;
    let quiet = w.member("B-100300", AccountType::IndividualFamily).await;
    let quiet_card = w.card(&quiet, "4242424242424242").await;
    w.schedule_now(&quiet, &quiet_card, AmountRule::Balance)
        .await;
    let off = autopay::store::MemberChange {
        reminders: Some(false),
        ..Default::default()
    };
    w.store
        .update_member(&quiet.account_number, &off, &w.audit())
        .await
        .unwrap();
    w.engine().drain().await.unwrap();
    // The next charge is on Jan 1 (09:00 New York); three days before, one reminder.
    w.clock.set("2026-12-29T15:00:00Z".parse().unwrap());
    assert_eq!(
        scan_upcoming(w.store.as_ref(), &w.settings, w.clock.now())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        scan_upcoming(w.store.as_ref(), &w.settings, w.clock.now())
            .await
            .unwrap(),
        0,
        "once per occurrence"
    );
    let reminder = w
        .store
        .notifications(Some(wants.id))
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.kind == "reminder")
        .unwrap();
    assert_eq!(reminder.payload["amount"], "25.00");
    assert!(
        w.store
            .notifications(Some(quiet.id))
            .await
            .unwrap()
            .iter()
            .all(|n| n.kind != "reminder")
    );
    // Not sent after its moment: once the charge time passes, the reminder expires unsent.
    w.clock.set("2027-01-01T15:00:00Z".parse().unwrap());
    let claimed = w
        .store
        .claim_notifications("d", w.clock.now(), std::time::Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert!(claimed.iter().all(|c| c.notification.kind != "reminder"));
    let states: Vec<(String, String)> = w
        .store
        .notifications(Some(wants.id))
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.kind, n.state))
        .collect();
    assert!(
        states.contains(&("reminder".into(), "expired".into())),
        "{states:?}"
    );
    // A card expiring within reminders.card_expiry_days while a schedule uses it.
    w.clock.set("2030-11-15T12:00:00Z".parse().unwrap());
    assert_eq!(
        scan_card_expiry(w.store.as_ref(), &w.settings, w.clock.now())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        scan_card_expiry(w.store.as_ref(), &w.settings, w.clock.now())
            .await
            .unwrap(),
        0
    );
}

/// The dispatcher records outcomes in groups: one transaction for many deliveries, each row
/// written only while its own claim still holds it.
async fn a_grouped_commit_records_each_outcome_for_its_own_claim_only(kind: Kind) {
    use autopay::store::{Delivered, DeliveryOutcome};
    let w = World::new(kind).await;
    let ana = member_at(
        &w,
        "A-100200",
        "ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    for key in ["r1", "r2", "r3"] {
        receipt(&w, &ana, key).await;
    }
    let lease = std::time::Duration::from_secs(60);
    let first = w
        .store
        .claim_notifications("first", w.clock.now(), lease, 10)
        .await
        .unwrap();
    let mine: Vec<_> = first
        .iter()
        .filter(|o| o.notification.dedupe_key.starts_with('r'))
        .collect();
    assert_eq!(mine.len(), 3, "one claim takes every due row");
    // The first claim's lease runs out; another dispatcher claims the same rows.
    w.advance(SignedDuration::from_mins(2));
    let second = w
        .store
        .claim_notifications("second", w.clock.now(), lease, 10)
        .await
        .unwrap();
    assert_eq!(
        second.len(),
        first.len(),
        "expired leases are claimed again"
    );
    let stale: Vec<Delivered> = first
        .iter()
        .map(|o| Delivered {
            lease: o.lease,
            outcome: DeliveryOutcome::Sent,
        })
        .collect();
    assert!(
        w.store
            .finish_notifications(&stale, w.clock.now())
            .await
            .unwrap()
            .iter()
            .all(|recorded| !recorded),
        "a claim that lost its lease records nothing"
    );
    let by_key = |key: &str| {
        second
            .iter()
            .find(|o| o.notification.dedupe_key == key)
            .unwrap()
            .lease
    };
    let retry_at = w.clock.now() + SignedDuration::from_mins(5);
    let done = vec![
        Delivered {
            lease: by_key("r3"),
            outcome: DeliveryOutcome::Failed {
                error: "550 no such user".into(),
                bounce: true,
            },
        },
        Delivered {
            lease: by_key("r1"),
            outcome: DeliveryOutcome::Sent,
        },
        Delivered {
            lease: by_key("r2"),
            outcome: DeliveryOutcome::Retry {
                error: "451 try later".into(),
                at: retry_at,
            },
        },
    ];
    assert_eq!(
        w.store
            .finish_notifications(&done, w.clock.now())
            .await
            .unwrap(),
        vec![true, true, true],
        "answers in the order asked, whatever order the rows were written in"
    );
    let states: std::collections::BTreeMap<String, (String, i64)> = w
        .store
        .notifications(Some(ana.id))
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.dedupe_key, (n.state, n.attempts)))
        .collect();
    assert_eq!(states["r1"], ("sent".to_string(), 2));
    assert_eq!(states["r2"], ("pending".to_string(), 2));
    assert_eq!(states["r3"], ("failed".to_string(), 2));
    assert!(w.store.member_by_id(ana.id).await.unwrap().email_bouncing);
    // Recorded once: the same outcomes again find no claim to finish.
    assert_eq!(
        w.store
            .finish_notifications(&done, w.clock.now())
            .await
            .unwrap(),
        vec![false, false, false]
    );
}

crate::helpers::on_both!(
    changes_members_hear_about_write_their_outbox_rows,
    a_grouped_commit_records_each_outcome_for_its_own_claim_only,
    reminders_go_once_before_the_charge_and_only_to_members_who_want_them,
);

#[tokio::test]
async fn a_message_refused_as_spam_fails_alone_without_pausing_mail_or_flagging_the_address() {
    let peer = peer();
    let w = world_for(&peer, PASSWORD).await;
    let spam = member_at(
        &w,
        "A-100200",
        "spam+ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    let policy = member_at(
        &w,
        "C-100400",
        "policy+cy@example.org",
        "Cy",
        AccountType::IndividualFamily,
    )
    .await;
    let good = member_at(
        &w,
        "B-100300",
        "ben@example.org",
        "Ben",
        AccountType::IndividualFamily,
    )
    .await;
    for (m, key) in [
        (&spam, "receipt:spam"),
        (&policy, "receipt:policy"),
        (&good, "receipt:good"),
    ] {
        receipt(&w, m, key).await;
    }
    let report = dispatcher(&w).drain().await.unwrap();
    // "554 5.7.1 rejected as spam" after the data and "550 5.7.1" for one recipient are about
    // one message each: those fail, the other goes, and mail keeps running.
    assert_eq!(
        (report.sent, report.failed, report.paused),
        (1, 2, false),
        "{report:?}"
    );
    assert!(w.store.control().await.unwrap().mail_paused.is_none());
    for m in [&spam, &policy] {
        assert!(!w.store.member_by_id(m.id).await.unwrap().email_bouncing);
    }
    assert_eq!(peer.received().len(), 1);
    // Failed for good: not retried.
    w.advance(SignedDuration::from_hours(24));
    assert_eq!(dispatcher(&w).drain().await.unwrap().claimed, 0);
}

#[tokio::test]
async fn a_sender_refused_at_mail_from_pauses_mail_and_fails_nothing() {
    let peer = peer();
    let port = peer.port.to_string();
    let ca = peer.ca_pem.display().to_string();
    let w = World::with_settings(
        Kind::Sqlite,
        &[
            ("AUTOPAY__EMAIL__TRANSPORT", "smtp"),
            (
                "AUTOPAY__EMAIL__FROM",
                "Billing <refusedsender@example.org>",
            ),
            ("AUTOPAY__EMAIL__SMTP__HOST", "127.0.0.1"),
            ("AUTOPAY__EMAIL__SMTP__PORT", &port),
            ("AUTOPAY__EMAIL__SMTP__TLS", "required"),
            ("AUTOPAY__EMAIL__SMTP__CA_FILE", &ca),
            ("AUTOPAY__EMAIL__SMTP__USERNAME", USER),
            ("AUTOPAY__EMAIL__SMTP__PASSWORD", PASSWORD),
            ("AUTOPAY__EMAIL__SMTP__TIMEOUT", "5s"),
        ],
    )
    .await;
    let m = member_at(
        &w,
        "A-100200",
        "ana@example.org",
        "Ana",
        AccountType::IndividualFamily,
    )
    .await;
    for i in 0..2 {
        receipt(&w, &m, &format!("receipt:{i}")).await;
    }
    let report = dispatcher(&w).drain().await.unwrap();
    assert_eq!(
        (report.paused, report.failed, report.retrying),
        (true, 0, 2),
        "{report:?}"
    );
    let reason = w.store.control().await.unwrap().mail_paused.unwrap().reason;
    assert!(
        reason.contains("MAIL FROM") && reason.contains("email.from"),
        "{reason}"
    );
    assert!(!reason.contains(PASSWORD), "{reason}");
    assert!(peer.received().is_empty());
}
