//! Hostile input, generated. Thousands of names, emails, references, bill-import rows, tokens
//! and settings values go through the library's parsers: each is refused with a clear error or
//! accepted and round-trips. A few hundred more go through the real binary: each is refused with
//! its sysexits code (64 usage, 65 data, 66 not found, 78 config) or stored verbatim and shown
//! escaped. Nothing panics, no header is injected into an email, and no card number hidden in
//! the input is echoed or stored: every output and every byte of the database, the ledger and
//! the mail folder is scanned for each one.
//!
//! Card numbers are hidden the ways the card-number detector knows them: 12 to 19 digits that
//! pass the Luhn check, written plain or in groups of four with single spaces or dashes, with no
//! other digit touching them. `HOSTILE_SCALE=N` multiplies the binary runs (the default 1 keeps
//! the test under about 20 seconds; `HOSTILE_SCALE=10 cargo nextest run hostile` is the long
//! run).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use autopay::clock::ManualClock;
use autopay::config::Settings;
use autopay::domain::bill::read_import;
use autopay::domain::card::luhn_check_digit;
use autopay::domain::member::{EmailAddress, MemberName};
use autopay::domain::money::Currency;
use autopay::domain::text::{Reference, is_control_or_invisible};
use autopay::processor::Processor;
use autopay::processor::simulated::{SimulatedProcessor, TEST_CARDS};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use crate::helpers::{Bin, Kind, Run, TestDb};

/// A generated value and the card numbers (digits only) hidden in it.
#[derive(Debug, Clone, Default)]
struct Hostile {
    text: String,
    cards: Vec<String>,
}

impl Hostile {
    fn plain(text: impl Into<String>) -> Hostile {
        Hostile {
            text: text.into(),
            cards: Vec::new(),
        }
    }

    fn join(parts: Vec<Hostile>) -> Hostile {
        Hostile {
            text: parts.iter().map(|p| p.text.as_str()).collect(),
            cards: parts.into_iter().flat_map(|p| p.cards).collect(),
        }
    }
}

/// A Luhn-valid card number: a public test number, or any 12 to 19 digits.
fn card_number() -> impl Strategy<Value = String> {
    let known: Vec<&'static str> = TEST_CARDS.iter().map(|(n, _)| *n).collect();
    prop_oneof![
        prop::sample::select(known).prop_map(String::from),
        "[1-9][0-9]{10,17}".prop_map(|partial| format!("{partial}{}", luhn_check_digit(&partial))),
    ]
}

/// The ways a person writes a card number: plain, or in fours with spaces or dashes.
fn spellings(digits: &str) -> [String; 3] {
    let groups: Vec<String> = digits
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    [digits.to_string(), groups.join(" "), groups.join("-")]
}

/// A card number, spelled some way, between two characters that are not digits, spaces or
/// dashes (so it stands as a number of its own).
fn card_piece() -> impl Strategy<Value = Hostile> {
    let edge = || prop::sample::select(vec![":", "#", "(", ")", "/", "=", "ref", "é", "x", "|"]);
    (card_number(), 0usize..3, edge(), edge()).prop_map(|(digits, style, before, after)| {
        let spelled = spellings(&digits)[style].clone();
        Hostile {
            text: format!("{before}{spelled}{after}"),
            cards: vec![digits],
        }
    })
}

/// Strings that attack something: headers, terminals, SQL, templates, shells, CSV, paths.
const ATTACKS: &[&str] = &[
    "\r\nBcc: evil@example.net",
    "\nSubject: you won",
    "\u{1b}[2J\u{1b}[H",
    "\u{1b}]0;owned\u{7}",
    "'; DROP TABLE members; --",
    "{{ 7*7 }}",
    "{% include '/etc/passwd' %}",
    "<script>alert(1)</script>",
    "%s%n%x",
    "../../etc/passwd",
    "${HOME}$(id)`id`",
    "\"quoted\"",
    "back\\slash",
    "=cmd|' /C calc'!A0",
    "a,b,\"c\"\n",
    "\u{0}",
    "password = hunter2",
    "postgres://u:hunter2@db/x",
];

/// One piece of hostile text.
fn piece() -> impl Strategy<Value = Hostile> {
    let invisible: Vec<char> = ('\u{202A}'..='\u{202E}')
        .chain('\u{2066}'..='\u{2069}')
        .chain([
            '\u{2028}', '\u{2029}', '\u{200B}', '\u{FEFF}', '\u{200E}', '\u{61C}',
        ])
        .collect();
    prop_oneof![
        5 => "[A-Za-z][A-Za-z '.-]{0,12}".prop_map(Hostile::plain),
        3 => "\\PC{1,8}".prop_map(Hostile::plain),
        1 => prop_oneof![
            prop::char::range('\u{0}', '\u{1F}'),
            Just('\u{7F}'),
            prop::char::range('\u{80}', '\u{9F}'),
        ]
        .prop_map(|c| Hostile::plain(c.to_string())),
        1 => prop::sample::select(invisible).prop_map(|c| Hostile::plain(c.to_string())),
        2 => prop::sample::select(ATTACKS).prop_map(Hostile::plain),
        2 => card_piece(),
        1 => "[a-z]{150,260}".prop_map(Hostile::plain),
    ]
}

/// Hostile free text: a few pieces, or nothing at all.
fn hostile_text() -> BoxedStrategy<Hostile> {
    prop::collection::vec(piece(), 0..5)
        .prop_map(Hostile::join)
        .boxed()
}

/// Names: mostly a real name, often with something hostile around it.
fn names() -> BoxedStrategy<Hostile> {
    prop_oneof![
        2 => "[A-Z][a-zé]{1,10} [A-Z][a-zö'-]{1,12}".prop_map(Hostile::plain),
        1 => prop::sample::select(vec!["李小龍", "محمدرضا", "Zoë Ångström", "می\u{200C}خواهم"])
            .prop_map(Hostile::plain),
        3 => hostile_text(),
    ]
    .boxed()
}

fn valid_email() -> impl Strategy<Value = String> {
    (
        "[a-z0-9]{1,8}(\\.[a-z0-9]{1,6})?(\\+[a-z0-9]{1,5})?",
        "[a-z][a-z0-9]{1,8}",
        prop::sample::select(vec!["com", "org", "net", "example"]),
    )
        .prop_map(|(local, domain, tld)| format!("{local}@{domain}.{tld}"))
}

/// Emails: valid ones, and valid ones with hostile text or a header around them.
fn emails() -> BoxedStrategy<Hostile> {
    prop_oneof![
        3 => valid_email().prop_map(Hostile::plain),
        2 => (hostile_text(), valid_email()).prop_map(|(h, e)| Hostile {
            text: format!("{}{e}", h.text),
            cards: h.cards,
        }),
        1 => (valid_email(), prop::sample::select(ATTACKS)).prop_map(|(e, a)| Hostile::plain(format!("{e}{a}"))),
        1 => (card_piece(), valid_email()).prop_map(|(c, e)| Hostile {
            text: format!("{}{e}", c.text),
            cards: c.cards,
        }),
    ]
    .boxed()
}

/// References: plausible ones and hostile ones.
fn reference_values() -> BoxedStrategy<Hostile> {
    prop_oneof![
        2 => "INV-[0-9]{1,8}".prop_map(Hostile::plain),
        3 => hostile_text(),
    ]
    .boxed()
}

/// Tokens: the simulated processor's own shape, broken ones, the portal's, and hostile text.
fn tokens() -> BoxedStrategy<Hostile> {
    prop_oneof![
        1 => "[0-9a-f]{12}".prop_map(|n| Hostile::plain(format!("sim_approve_visa_4242_122030_{n}x"))),
        1 => prop::sample::select(vec!["tok_visa", "tok_mastercard", "tok_chargeDeclined"]).prop_map(Hostile::plain),
        1 => "(sim|tok|pm|seti)_[A-Za-z0-9_-]{0,40}".prop_map(Hostile::plain),
        2 => card_piece().prop_map(|c| Hostile {
            text: format!("sim_approve_visa_4242_122030_{}", c.text),
            cards: c.cards,
        }),
        3 => hostile_text(),
    ]
    .boxed()
}

/// One CSV cell: what the billing system would send, or something hostile; quoted (doubling
/// quotes) or written raw.
fn cell(good: BoxedStrategy<String>) -> BoxedStrategy<Hostile> {
    (
        prop_oneof![2 => good.prop_map(Hostile::plain), 1 => hostile_text()],
        any::<bool>(),
    )
        .prop_map(|(h, quote)| {
            if quote {
                Hostile {
                    text: format!("\"{}\"", h.text.replace('"', "\"\"")),
                    cards: h.cards,
                }
            } else {
                h
            }
        })
        .boxed()
}

/// A bill-import file: a header sometimes, then rows of account,reference,amount,due_date.
fn csv_files() -> BoxedStrategy<Hostile> {
    let row = (
        cell(Just("H-000001".to_string()).boxed()),
        cell("INV-[0-9]{1,6}".boxed()),
        cell("[0-9]{1,4}\\.[0-9]{2}".boxed()),
        cell("2027-0[1-9]-1[0-9]".boxed()),
    )
        .prop_map(|(a, r, m, d)| {
            Hostile::join(vec![
                a,
                Hostile::plain(","),
                r,
                Hostile::plain(","),
                m,
                Hostile::plain(","),
                d,
                Hostile::plain("\n"),
            ])
        });
    (any::<bool>(), prop::collection::vec(row, 1..6))
        .prop_map(|(header, rows)| {
            let mut parts = Vec::new();
            if header {
                parts.push(Hostile::plain("account,reference,amount,due_date\n"));
            }
            parts.extend(rows);
            Hostile::join(parts)
        })
        .boxed()
}

/// Settings that hold secrets, and others.
const SECRET_KEYS: &[&str] = &[
    "AUTOPAY__EMAIL__SMTP__PASSWORD",
    "AUTOPAY__PROCESSOR__STRIPE__SECRET_KEY",
];
const PLAIN_KEYS: &[&str] = &[
    "AUTOPAY__EMAIL__SMTP__HOST",
    "AUTOPAY__EMAIL__SMTP__PORT",
    "AUTOPAY__EMAIL__FROM",
    "AUTOPAY__PAYMENTS__RETRY_DELAYS",
    "AUTOPAY__PAYMENTS__CURRENCY",
    "AUTOPAY__DAEMON__LEASE",
    "AUTOPAY__ORG__NAME",
    "AUTOPAY__EMAIL__SMTP__TLS",
];

/// A setting and a value: (key, value, the secret the value holds, if any).
fn settings_values() -> BoxedStrategy<(String, Hostile, Option<String>)> {
    let secret = "[A-Za-z0-9]{12}".prop_map(|s| format!("pw-{s}"));
    prop_oneof![
        (
            prop::sample::select(SECRET_KEYS),
            secret.clone(),
            hostile_text()
        )
            .prop_map(|(k, s, h)| (
                k.to_string(),
                Hostile {
                    text: format!("{s}{}", h.text),
                    cards: h.cards
                },
                Some(s)
            )),
        secret.prop_map(|s| (
            "AUTOPAY__DATABASE__URL".to_string(),
            Hostile::plain(format!("postgres://autopay:{s}@db.example/autopay")),
            Some(s)
        )),
        (prop::sample::select(PLAIN_KEYS), hostile_text()).prop_map(|(k, h)| (
            k.to_string(),
            h,
            None
        )),
    ]
    .boxed()
}

/// Whether a card number hidden in the input shows up in some text, in any spelling.
fn holds_card(text: &str, cards: &[String]) -> Option<String> {
    let squeezed: String = text.chars().filter(|c| *c != ' ' && *c != '-').collect();
    cards
        .iter()
        .find(|c| squeezed.contains(c.as_str()))
        .cloned()
}

fn has_raw_control(text: &str) -> bool {
    text.chars()
        .any(|c| c != '\n' && is_control_or_invisible(c))
}

/// A refusal's message: says something, shows no raw control character, no hidden card number.
fn assert_clear(message: &str, h: &Hostile) -> Result<(), TestCaseError> {
    prop_assert!(
        message.len() > 15,
        "too short to say what to do: {message:?}"
    );
    prop_assert!(!has_raw_control(message), "{message:?}");
    prop_assert!(holds_card(message, &h.cards).is_none(), "{message:?}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn generated_names_are_refused_clearly_or_kept_exactly(h in names()) {
        match MemberName::parse(&h.text) {
            Ok(name) => {
                prop_assert_eq!(name.as_str(), h.text.trim());
                prop_assert!(!has_raw_control(name.as_str()));
                prop_assert!(holds_card(name.as_str(), &h.cards).is_none());
                prop_assert_eq!(MemberName::parse(name.as_str()), Ok(name.clone()));
            }
            Err(e) => assert_clear(&e.to_string(), &h)?,
        }
    }

    #[test]
    fn generated_emails_are_refused_clearly_or_are_single_header_safe_addresses(h in emails()) {
        match EmailAddress::parse(&h.text) {
            Ok(email) => {
                let e = email.as_str();
                prop_assert!(e.is_ascii() && !e.chars().any(|c| c.is_whitespace() || c.is_control()));
                prop_assert!(holds_card(e, &h.cards).is_none());
                prop_assert_eq!(EmailAddress::parse(e), Ok(email.clone()));
                let mailbox: lettre::message::Mailbox = e.parse().expect("lettre takes it");
                prop_assert!(!mailbox.to_string().contains(['\r', '\n']));
            }
            Err(e) => assert_clear(&e.to_string(), &h)?,
        }
    }

    #[test]
    fn generated_references_are_refused_clearly_or_kept_exactly(h in reference_values()) {
        match Reference::parse(&h.text) {
            Ok(r) => {
                prop_assert_eq!(r.as_str(), h.text.trim());
                prop_assert!(!has_raw_control(r.as_str()));
                prop_assert!(holds_card(r.as_str(), &h.cards).is_none());
                let json = serde_json::to_string(&r).unwrap();
                prop_assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
            }
            Err(e) => assert_clear(&e.to_string(), &h)?,
        }
    }

    #[test]
    fn generated_bill_files_read_into_valid_bills_or_problems_by_line(h in csv_files()) {
        for line in read_import(&h.text, Currency::USD) {
            match line.row() {
                Some(row) => {
                    prop_assert!(row.amount.minor() >= 0);
                    prop_assert!(holds_card(row.reference.as_str(), &h.cards).is_none());
                    prop_assert!(!has_raw_control(row.reference.as_str()));
                    prop_assert_eq!(Reference::parse(row.reference.as_str()), Ok(row.reference.clone()));
                }
                None => {
                    prop_assert!(!line.problems.is_empty());
                    for p in &line.problems {
                        assert_clear(p, &h)?;
                    }
                }
            }
        }
    }

    #[test]
    fn generated_settings_values_are_refused_clearly_or_shown_with_secrets_redacted(
        (key, value, secret) in settings_values()
    ) {
        let loaded = Settings::load(None, [(key.clone(), value.text.clone())]);
        let shown = match &loaded {
            Ok(s) => format!("{s:?}\n{}\n{}", s.redacted_lines().join("\n"), s.redacted_json()),
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.len() > 15, "{message:?}");
                prop_assert!(holds_card(&message, &value.cards).is_none(), "{message:?}");
                message
            }
        };
        if let Some(secret) = secret {
            prop_assert!(!shown.contains(&secret), "{key}: the secret shows in {shown:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn generated_tokens_are_refused_without_repeating_them_unless_the_processor_issued_them(h in tokens()) {
        let p = SimulatedProcessor::in_memory(
            Arc::new(ManualClock::new("2026-12-01T00:00:00Z".parse().unwrap())),
            std::time::Duration::ZERO,
        );
        match p.check_token(&h.text) {
            Ok(()) => {
                prop_assert!(h.cards.is_empty(), "a token holding a card number passed");
                prop_assert!(h.text.starts_with("sim_") || h.text.starts_with("tok_"), "{:?}", h.text);
            }
            Err(e) => {
                assert_clear(&e.to_string(), &h)?;
                prop_assert!(h.text.len() < 8 || !e.to_string().contains(&h.text));
            }
        }
    }
}

/// Draws values from strategies, the same ones every run.
struct Draw(TestRunner);

impl Draw {
    fn one<T: std::fmt::Debug>(&mut self, s: &BoxedStrategy<T>) -> T {
        s.new_tree(&mut self.0).expect("a value").current()
    }
}

/// An argument the operating system can carry (no NUL byte).
fn arg(flag: &str, value: &str) -> String {
    format!("{flag}={}", value.replace('\0', "\u{1}"))
}

/// The checks every run passes: an expected exit code (never a panic), a refusal that says
/// why, no raw control or direction character, no hidden card number.
fn check(what: &str, run: &Run, codes: &[i32], cards: &[String]) {
    assert!(
        codes.contains(&run.code),
        "{what}: exit {} (expected one of {codes:?})\nstdout: {}\nstderr: {}",
        run.code,
        run.stdout,
        run.stderr
    );
    if run.code != 0 {
        let said = run
            .stderr
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or_else(|| panic!("{what}: a refusal says why:\n{}", run.stderr));
        assert!(said.len() > 20, "{what}: {said}");
    }
    for (stream, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        assert!(
            !has_raw_control(text),
            "{what}: {stream} shows a raw control or direction character: {text:?}"
        );
        if let Some(card) = holds_card(text, cards) {
            panic!("{what}: {stream} shows the card number {card}:\n{text}");
        }
    }
}

/// Every byte of every file under `dir`.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read a folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).expect("read a file")));
            }
        }
    }
    out
}

#[tokio::test]
async fn generated_hostile_input_through_the_real_binary_is_refused_or_stored_verbatim() {
    let scale: usize = std::env::var("HOSTILE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db).with_env("AUTOPAY__LOG__FORMAT", "json");
    let mut draw = Draw(TestRunner::deterministic());
    let mut cards: Vec<String> = TEST_CARDS.iter().map(|(n, _)| n.to_string()).collect();
    let usage_or_data = [0, 64, 65];

    bin.run(&["migrate"]).ok();
    crate::helpers::add_member(&bin, "H-000001").ok();
    let bill = bin
        .run(&[
            "bill",
            "add",
            "--account",
            "H-000001",
            "--amount",
            "50.00",
            "--due",
            "2027-01-15",
            "--reference",
            "INV-0",
        ])
        .ok()
        .id();
    let mut references: BTreeSet<String> = BTreeSet::from(["INV-0".to_string()]);

    // Members: names and emails.
    let (names, emails) = (names(), emails());
    let mut members: BTreeMap<String, (String, String)> = BTreeMap::new();
    for i in 0..60 * scale {
        let (name, email) = (draw.one(&names), draw.one(&emails));
        cards.extend(name.cards.iter().chain(&email.cards).cloned());
        let account = format!("H-{:06}", i + 2);
        let run = bin.run(&[
            "member",
            "add",
            &arg("--account", &account),
            &arg("--name", &name.text),
            &arg("--email", &email.text),
            "--type=individual-family",
            "--time-zone=UTC",
        ]);
        check("member add", &run, &usage_or_data, &cards);
        if run.code == 0 {
            let stored_email = EmailAddress::parse(&email.text).expect("accepted");
            members.insert(
                account,
                (name.text.trim().to_string(), stored_email.to_string()),
            );
        }
    }
    assert!(
        members.len() >= 10,
        "too few accepted to go on: {members:?}"
    );
    // Changes to some of them.
    let accounts: Vec<String> = members.keys().cloned().collect();
    for (i, account) in accounts.iter().cycle().take(20 * scale).enumerate() {
        let run = if i % 2 == 0 {
            let name = draw.one(&names);
            cards.extend(name.cards.iter().cloned());
            let run = bin.run(&[
                "member",
                "update",
                &arg("--name", &name.text),
                "--",
                account,
            ]);
            if run.code == 0 {
                members.get_mut(account).expect("known").0 = name.text.trim().to_string();
            }
            run
        } else {
            let email = draw.one(&emails);
            cards.extend(email.cards.iter().cloned());
            let run = bin.run(&[
                "member",
                "update",
                &arg("--email", &email.text),
                "--",
                account,
            ]);
            if run.code == 0 {
                members.get_mut(account).expect("known").1 = EmailAddress::parse(&email.text)
                    .expect("accepted")
                    .to_string();
            }
            run
        };
        check("member update", &run, &usage_or_data, &cards);
    }

    // Bills: references one by one, and whole files.
    let refs = reference_values();
    for _ in 0..60 * scale {
        let r = draw.one(&refs);
        cards.extend(r.cards.iter().cloned());
        let run = bin.run(&[
            "bill",
            "add",
            "--account=H-000001",
            "--amount=12.00",
            "--due=2027-02-01",
            &arg("--reference", &r.text),
        ]);
        check("bill add", &run, &usage_or_data, &cards);
        if run.code == 0 {
            references.insert(r.text.trim().to_string());
        }
    }
    let files = csv_files();
    for i in 0..20 * scale {
        let f = draw.one(&files);
        cards.extend(f.cards.iter().cloned());
        let path = db.path().join(format!("import-{i}.csv"));
        std::fs::write(&path, &f.text).expect("write the file");
        let run = bin.run(&["bill", "import", path.to_str().expect("a UTF-8 path")]);
        check("bill import", &run, &[0, 65], &cards);
        if run.code == 0 {
            for row in read_import(&f.text, Currency::USD)
                .iter()
                .filter_map(|l| l.row())
            {
                references.insert(row.reference.as_str().to_string());
            }
        }
        std::fs::remove_file(&path).expect("remove the file");
    }

    // Reasons and references an operator types.
    let text = hostile_text();
    for i in 0..50 * scale {
        let h = draw.one(&text);
        cards.extend(h.cards.iter().cloned());
        let (what, run, codes): (&str, Run, &[i32]) = match i % 5 {
            0 | 1 => (
                "bill adjust",
                bin.run(&[
                    "bill",
                    "adjust",
                    "--amount=50.00",
                    &arg("--reason", &h.text),
                    "--",
                    &bill,
                ]),
                &usage_or_data,
            ),
            2 => (
                "charging pause",
                bin.run(&["charging", "pause", &arg("--reason", &h.text)]),
                &usage_or_data,
            ),
            3 => (
                "payment resolve",
                bin.run(&[
                    "payment",
                    "resolve",
                    "--as=failed",
                    &arg("--reference", &h.text),
                    &arg("--reason", &h.text),
                    "--",
                    &uuid::Uuid::now_v7().to_string(),
                ]),
                &[64, 65, 66],
            ),
            _ => (
                "bill pay",
                bin.run(&[
                    "bill",
                    "pay",
                    "--amount=0.01",
                    &arg("--external", &h.text),
                    "--",
                    &bill,
                ]),
                &usage_or_data,
            ),
        };
        check(what, &run, codes, &cards);
    }
    bin.run(&["charging", "resume"]).ok();

    // Tokens, and values where an id, an account or a zone belongs.
    let toks = tokens();
    for _ in 0..40 * scale {
        let t = draw.one(&toks);
        cards.extend(t.cards.iter().cloned());
        let run = bin.run(&[
            "card",
            "add",
            "--account=H-000001",
            &arg("--token", &t.text),
        ]);
        check("card add --token", &run, &usage_or_data, &cards);
    }
    for i in 0..20 * scale {
        let h = draw.one(&text);
        cards.extend(h.cards.iter().cloned());
        let (what, run, codes): (&str, Run, &[i32]) = match i % 4 {
            0 => (
                "member show",
                bin.run(&["member", "show", "--", &h.text.replace('\0', "")]),
                &[64, 65, 66],
            ),
            1 => (
                "payment show",
                bin.run(&["payment", "show", "--", &h.text.replace('\0', "")]),
                &[64, 66],
            ),
            2 => (
                "member add --time-zone",
                bin.run(&[
                    "member",
                    "add",
                    "--account=Z-999999",
                    "--name=Zed",
                    "--email=zed@example.org",
                    "--type=individual-family",
                    &arg("--time-zone", &h.text),
                ]),
                &[0, 64, 65],
            ),
            _ => (
                "member add --account",
                bin.run(&[
                    "member",
                    "add",
                    &arg("--account", &h.text),
                    "--name=Zed",
                    "--email=zed@example.org",
                    "--type=individual-family",
                ]),
                &[0, 64, 65],
            ),
        };
        check(what, &run, codes, &cards);
    }

    // Settings from the environment.
    let settings = settings_values();
    for _ in 0..30 * scale {
        let (key, value, secret) = draw.one(&settings);
        cards.extend(value.cards.iter().cloned());
        let run = Bin::new(&db)
            .with_env(&key, &value.text.replace('\0', ""))
            .run(&["check-config"]);
        check(&format!("check-config with {key}"), &run, &[0, 78], &cards);
        if let Some(secret) = secret {
            assert!(
                !run.stdout.contains(&secret) && !run.stderr.contains(&secret),
                "{key}: the secret shows:\n{}\n{}",
                run.stdout,
                run.stderr
            );
        }
    }

    // Arguments that are not even UTF-8.
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"A\xff\xfe\x1b[2J");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_autopay"))
            .args(["member", "show"])
            .arg(bad)
            .current_dir(db.path())
            .env("AUTOPAY__DATABASE__URL", &db.url)
            .output()
            .expect("run autopay");
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        check("non-UTF-8 argument", &run, &[64, 65], &cards);
    }

    // Stored verbatim: every accepted name, email and reference reads back as given, and the
    // table shows it.
    let listed = bin.run(&["member", "list", "--json"]).ok().json();
    let stored: BTreeMap<String, (String, String)> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| {
            (
                m["account_number"].as_str().unwrap_or_default().to_string(),
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["email"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect();
    for (account, expected) in &members {
        assert_eq!(stored.get(account), Some(expected), "{account}");
    }
    let table = bin.run(&["member", "list"]).ok();
    check("member list", &table, &[0], &cards);
    for (name, _) in members.values() {
        assert!(table.stdout.contains(name.as_str()), "{name:?} not shown");
    }
    let bills = bin
        .run(&["bill", "list", "--account", "H-000001", "--json"])
        .ok()
        .json();
    let stored_refs: BTreeSet<String> = bills
        .as_array()
        .expect("a list")
        .iter()
        .map(|b| b["reference"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(stored_refs, references);

    // Mail to the accepted members, with their hostile-but-accepted names: one setup email each,
    // whose headers are exactly the ones autopay writes.
    let mailed: Vec<&String> = members.keys().take(10).collect();
    for account in &mailed {
        let card = crate::helpers::add_card(&bin, account, "4242424242424242")
            .ok()
            .id();
        let run = bin.run(&[
            "schedule",
            "add",
            "--account",
            account,
            "--card",
            &card,
            "--monthly",
            "--day",
            "1",
            "--amount",
            "10.00",
        ]);
        check("schedule add", &run, &[0], &cards);
    }
    let drained = bin.run(&["run", "--drain"]);
    check("run --drain", &drained, &[0], &cards);
    let allowed = [
        "from",
        "to",
        "subject",
        "message-id",
        "date",
        "reply-to",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    ];
    let addresses: BTreeSet<&str> = members.values().map(|(_, e)| e.as_str()).collect();
    let mut sent = 0;
    for (path, raw) in files_under(&db.path().join("mail")) {
        let text = String::from_utf8_lossy(&raw);
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        let names: Vec<String> = head
            .split("\r\n")
            .filter(|l| !l.starts_with([' ', '\t']))
            .filter_map(|l| l.split_once(':').map(|(k, _)| k.to_ascii_lowercase()))
            .collect();
        for n in &names {
            assert!(
                allowed.contains(&n.as_str()),
                "{}: header {n} injected:\n{head}",
                path.display()
            );
        }
        assert_eq!(
            names.iter().filter(|n| *n == "to").count(),
            1,
            "{}",
            path.display()
        );
        let parsed = mail_parser::MessageParser::default()
            .parse(&raw)
            .expect("a message");
        let to: Vec<&str> = parsed
            .to()
            .map(|t| t.iter().filter_map(|a| a.address()).collect())
            .unwrap_or_default();
        assert!(
            to.len() == 1 && addresses.contains(to[0]),
            "{}: {to:?}",
            path.display()
        );
        assert!(parsed.subject().is_some_and(|s| !s.contains(['\r', '\n'])));
        sent += 1;
    }
    assert_eq!(sent, mailed.len(), "one setup email per member");

    // Nothing anywhere holds a card number that was hidden in the input.
    cards.sort();
    cards.dedup();
    for (path, bytes) in files_under(db.path()) {
        let text = String::from_utf8_lossy(&bytes);
        for card in &cards {
            for spelled in spellings(card) {
                assert!(
                    !text.contains(&spelled),
                    "{} holds the card number {card}",
                    path.display()
                );
            }
        }
    }
}
