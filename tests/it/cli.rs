//! The real binary, every command, on both backends; and each kind of bad input, with its exit
//! code, its message, and nothing stored.

use crate::helpers::{Bin, Kind, TestDb, add_card, add_member, member_with_card};

const VISA: &str = "4242424242424242\n123\n";

async fn ready(kind: Kind) -> (TestDb, Bin) {
    let db = TestDb::new(kind).await;
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    (db, bin)
}

async fn every_management_command_works(kind: Kind) {
    let (db, bin) = ready(kind).await;
    let again = bin.run(&["migrate", "--json"]).ok().json();
    assert_eq!(again["applied"].as_array().unwrap().len(), 0);

    // members
    let member_id = add_member(&bin, "A-100200").ok().id();
    assert!(uuid::Uuid::parse_str(&member_id).is_ok());
    bin.run(&[
        "member",
        "add",
        "--account",
        "EG-5000",
        "--name",
        "Acme Corp",
        "--email",
        "benefits@acme.example",
        "--type",
        "employer-group",
    ])
    .ok();
    let list = bin.run(&["member", "list", "--json"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(
        bin.run(&["member", "list"])
            .ok()
            .stdout
            .contains("employer-group")
    );
    bin.run(&[
        "member",
        "update",
        "A-100200",
        "--email",
        "ana.diaz@example.org",
        "--reminders",
        "off",
    ])
    .ok();
    let shown = bin
        .run(&["member", "show", "A-100200", "--json"])
        .ok()
        .json();
    assert_eq!(shown["member"]["email"], "ana.diaz@example.org");
    assert_eq!(shown["member"]["reminders"], false);

    // cards: from standard input, and from a portal token
    let card = bin
        .run_with_stdin(
            &[
                "card",
                "add",
                "--account",
                "A-100200",
                "--exp",
                "12/2030",
                "--json",
            ],
            Some(VISA),
        )
        .ok()
        .json();
    assert_eq!(
        (
            card["brand"].as_str(),
            card["last4"].as_str(),
            card["exp_month"].as_i64(),
            card["exp_year"].as_i64()
        ),
        (Some("visa"), Some("4242"), Some(12), Some(2030))
    );
    let card_id = card["id"].as_str().unwrap().to_string();
    let token_card = bin
        .run(&[
            "card",
            "add",
            "--account",
            "A-100200",
            "--token",
            "tok_mastercard",
        ])
        .ok()
        .id();
    let cards = bin
        .run(&["card", "list", "--account", "A-100200"])
        .ok()
        .stdout;
    assert!(
        cards.contains("Visa ending 4242") && cards.contains("MasterCard ending 4444"),
        "{cards}"
    );

    // bills
    let bill_id = bin
        .run(&[
            "bill",
            "add",
            "--account",
            "A-100200",
            "--amount",
            "125.00",
            "--due",
            "2026-12-15",
            "--reference",
            "INV-1",
        ])
        .ok()
        .id();
    let csv = db.path().join("bills.csv");
    std::fs::write(&csv, "account,reference,amount,due_date\nA-100200,INV-2,40.00,2027-01-15\nEG-5000,GRP-1,1200.50,2027-01-01\n").unwrap();
    let dry = bin
        .run(&["bill", "import", csv.to_str().unwrap(), "--dry-run"])
        .ok()
        .stdout;
    assert!(dry.contains("2 bill(s), total 1240.50 USD"), "{dry}");
    assert_eq!(
        bin.run(&["bill", "list", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "a dry run stores nothing"
    );
    let imported = bin
        .run(&["bill", "import", csv.to_str().unwrap(), "--json"])
        .ok()
        .json();
    assert_eq!(
        (imported["added"].as_i64(), imported["unchanged"].as_i64()),
        (Some(2), Some(0))
    );
    let twice = bin
        .run(&["bill", "import", csv.to_str().unwrap(), "--json"])
        .ok()
        .json();
    assert_eq!(
        (twice["added"].as_i64(), twice["unchanged"].as_i64()),
        (Some(0), Some(2))
    );
    assert_eq!(
        bin.run(&["bill", "list", "--account", "A-100200", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let paid = bin
        .run(&[
            "bill",
            "pay",
            &bill_id,
            "--amount",
            "25.00",
            "--external",
            "PHONE-77",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(paid["bill"]["amount_paid"], "25.00");
    let adjusted = bin
        .run(&[
            "bill",
            "adjust",
            &bill_id,
            "--amount",
            "20.00",
            "--reason",
            "plan change",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(adjusted["credit"]["amount"], "5.00");
    let voided = bin.run(&["bill", "void", &bill_id, "--json"]).ok().json();
    assert_eq!(voided["bill"]["status"], "void");

    // schedules
    let monthly = bin
        .run(&[
            "schedule",
            "add",
            "--account",
            "A-100200",
            "--card",
            &card_id,
            "--monthly",
            "--day",
            "31",
            "--balance",
            "--first-payment",
            "now",
        ])
        .ok()
        .id();
    let once = bin
        .run(&[
            "schedule",
            "add",
            "--account",
            "A-100200",
            "--card",
            &token_card,
            "--once",
            "--on",
            "2030-06-01",
            "--amount",
            "50.00",
            "--at",
            "10:30",
        ])
        .ok()
        .id();
    let every = bin
        .run(&[
            "schedule",
            "add",
            "--account",
            "A-100200",
            "--card",
            &card_id,
            "--every",
            "2",
            "--unit",
            "weeks",
            "--amount",
            "10.00",
            "--count",
            "3",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(every["kind"], "recurring");
    let shown = bin.run(&["schedule", "show", &once, "--json"]).ok().json();
    assert_eq!(shown["schedule"]["kind"], "one_time");
    assert_eq!(shown["schedule"]["authorized_via"], "cli");
    // The operating-system user, not $USER (the harness sets USER=tester).
    assert_eq!(shown["schedule"]["authorized_by"], autopay::cli::operator());
    let occ = &shown["occurrences"][0];
    assert_eq!(occ["local"], "2030-06-01T10:30:00-04:00");
    assert_eq!(occ["utc"], "2030-06-01T14:30:00Z");
    assert!(
        bin.run(&["schedule", "show", &monthly])
            .ok()
            .stdout
            .contains("first payment")
    );
    let updated = bin
        .run(&[
            "schedule",
            "update",
            &monthly,
            "--card",
            &token_card,
            "--at",
            "08:15",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(updated["version"], 2);
    assert_eq!(updated["card_id"].as_str(), Some(token_card.as_str()));
    bin.run(&["schedule", "pause", &monthly]).ok();
    assert_eq!(
        bin.run(&["schedule", "show", &monthly, "--json"])
            .ok()
            .json()["schedule"]["status"],
        "paused"
    );
    assert!(
        bin.run(&["schedule", "resume", &monthly])
            .ok()
            .stdout
            .contains("next payment")
    );
    bin.run(&["schedule", "cancel", &once]).ok();
    let cancelled = bin.run(&["schedule", "show", &once, "--json"]).ok().json();
    assert_eq!(cancelled["schedule"]["status"], "cancelled");
    assert_eq!(
        cancelled["schedule"]["cancelled_by"],
        autopay::cli::operator()
    );
    assert_eq!(
        bin.run(&["schedule", "list", "--account", "A-100200", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let preview = bin
        .run(&[
            "schedule",
            "preview",
            "--monthly",
            "--day",
            "31",
            "--start",
            "2027-01-01",
            "--time-zone",
            "America/Los_Angeles",
            "--next",
            "3",
            "--json",
        ])
        .ok()
        .json();
    let dates: Vec<&str> = preview
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["local"].as_str().unwrap())
        .collect();
    assert_eq!(
        dates,
        vec![
            "2027-01-31T09:00:00-08:00",
            "2027-02-28T09:00:00-08:00",
            "2027-03-31T09:00:00-07:00"
        ]
    );

    // payments: the engine makes them; a change to a schedule first records the occurrence
    // that was due (the monthly schedule's first payment, planned by its update and cancelled
    // by its pause), so no change drops one.
    let payments = bin.run(&["payment", "list", "--json"]).ok().json();
    let payments = payments.as_array().unwrap();
    assert_eq!(payments.len(), 1, "{payments:?}");
    assert_eq!(payments[0]["schedule_id"].as_str(), Some(monthly.as_str()));
    assert_eq!(payments[0]["state"], "cancelled");
    assert_eq!(payments[0]["reason"], "schedule paused");
    bin.run(&[
        "payment",
        "list",
        "--account",
        "A-100200",
        "--state",
        "failed",
    ])
    .ok();

    // a card in use cannot be removed; a free one can
    let in_use = bin.run(&["card", "remove", &token_card]).fails_with(65);
    assert!(in_use.stderr.contains(&monthly), "{}", in_use.stderr);
    bin.run(&["schedule", "cancel", every["id"].as_str().unwrap()])
        .ok();
    bin.run(&["card", "remove", &card_id]).ok();

    // status, close
    let status = bin.run(&["status", "--json"]).ok().json();
    assert_eq!(status["members"]["active"], 2);
    assert_eq!(status["activity"]["needs_review"], 0);
    assert!(status["activity"]["jobs"].as_object().unwrap().is_empty());
    assert!(
        bin.run(&["status"])
            .ok()
            .stdout
            .contains("charging         running")
    );
    let closed = bin
        .run(&["member", "close", "A-100200", "--json"])
        .ok()
        .json();
    assert_eq!(closed["cancelled_schedules"].as_array().unwrap().len(), 1);
    assert!(
        bin.run(&["check-config"])
            .ok()
            .stdout
            .contains("settings are valid")
    );
}

#[tokio::test]
async fn every_management_command_works_on_sqlite() {
    every_management_command_works(Kind::Sqlite).await;
}

#[tokio::test]
async fn every_management_command_works_on_postgres() {
    every_management_command_works(Kind::Postgres).await;
}

#[tokio::test]
async fn bad_member_input_is_refused_with_its_exit_code_and_nothing_stored() {
    let (_db, bin) = ready(Kind::Sqlite).await;
    let add = |account: &str, email: &str, kind: &str| {
        bin.run(&[
            "member",
            "add",
            "--account",
            account,
            "--name",
            "Ana",
            "--email",
            email,
            "--type",
            kind,
        ])
    };
    assert!(
        add("A-100200", "not-an-email", "individual-family")
            .fails_with(65)
            .stderr
            .contains("--email")
    );
    assert!(
        add("A-100200", "a@example.org", "family")
            .fails_with(65)
            .stderr
            .contains("individual-family")
    );
    assert!(
        add("A!", "a@example.org", "individual-family")
            .fails_with(65)
            .stderr
            .contains("--account")
    );
    bin.run(&["member", "add", "--account", "A-100200", "--name", "Ana"])
        .fails_with(64);
    bin.run(&[
        "member",
        "add",
        "--account",
        "A-100200",
        "--name",
        "Ana\u{7}",
        "--email",
        "a@example.org",
        "--type",
        "individual-family",
    ])
    .fails_with(65);
    bin.run(&[
        "member",
        "add",
        "--account",
        "A-100200",
        "--name",
        "Ana",
        "--email",
        "a@example.org",
        "--type",
        "individual-family",
        "--time-zone",
        "Mars/Olympus",
    ])
    .fails_with(65);
    assert_eq!(
        bin.run(&["member", "list", "--json"]).ok().json(),
        serde_json::json!([])
    );
    add("A-100200", "a@example.org", "individual-family").ok();
    assert!(
        add("A-100200", "b@example.org", "individual-family")
            .fails_with(65)
            .stderr
            .contains("already exists")
    );
    assert!(
        bin.run(&["member", "show", "Z-999999"])
            .fails_with(66)
            .stderr
            .contains("member list")
    );
    bin.run(&["member", "update", "A-100200"]).fails_with(64);
    bin.run(&["member", "update", "A-100200", "--reminders", "maybe"])
        .fails_with(64);
    bin.run(&["nonsense"]).fails_with(64);
    assert_eq!(bin.run(&["--help"]).ok().code, 0);
}

#[tokio::test]
async fn bad_cards_are_refused_and_say_what_we_accept() {
    let (_db, bin) = ready(Kind::Sqlite).await;
    member_with_card(&bin);
    let add = |exp: &str, stdin: &str| {
        bin.run_with_stdin(
            &["card", "add", "--account", "A-100200", "--exp", exp],
            Some(stdin),
        )
    };
    assert!(
        add("12/2030", "4242424242424241\n123\n")
            .fails_with(65)
            .stderr
            .contains("check digit")
    );
    assert!(
        add("12/2030", "378282246310005\n1234\n")
            .fails_with(65)
            .stderr
            .contains("Visa, MasterCard and Discover")
    );
    assert!(add("01/2020", VISA).fails_with(65).stderr.contains("--exp"));
    assert!(
        add("13/2030", VISA)
            .fails_with(65)
            .stderr
            .contains("MM/YYYY")
    );
    assert!(
        add("12/2030", "4242424242424242\n")
            .fails_with(64)
            .stderr
            .contains("security code")
    );
    add("12/2030", "4242424242424242\n12\n").fails_with(65);
    bin.run_with_stdin(
        &["card", "add", "--account", "Z-999999", "--exp", "12/2030"],
        Some(VISA),
    )
    .fails_with(66);
    bin.run(&[
        "card",
        "add",
        "--account",
        "A-100200",
        "--token",
        "tok_unknown",
    ])
    .fails_with(65);
    bin.run(&["card", "add", "--account", "A-100200"])
        .fails_with(64);
    bin.run(&["card", "remove", "not-an-id"]).fails_with(64);
    bin.run(&["card", "remove", &uuid::Uuid::now_v7().to_string()])
        .fails_with(66);
    assert_eq!(
        bin.run(&["card", "list", "--account", "A-100200", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_bad_bill_file_reports_every_bad_line_and_imports_nothing() {
    let (db, bin) = ready(Kind::Sqlite).await;
    member_with_card(&bin);
    let csv = db.path().join("bad.csv");
    std::fs::write(
        &csv,
        "account,reference,amount,due_date\nA-100200,INV-1,10.00,2027-01-01\nZ-999999,INV-2,10.00,2027-01-01\nA-100200,INV-3,12.345,2027-01-01\nA-100200,INV-4,10.00,2027-02-30\nA-100200,INV-5\nA-100200,INV-1,10.00,2027-01-01\n",
    )
    .unwrap();
    let run = bin
        .run(&["bill", "import", csv.to_str().unwrap()])
        .fails_with(65);
    for line in ["line 3", "line 4", "line 5", "line 6", "line 7"] {
        assert!(
            run.stderr.contains(line),
            "{line} missing from: {}",
            run.stderr
        );
    }
    assert!(!run.stderr.contains("line 2:"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("Z-999999"),
        "account numbers are masked: {}",
        run.stderr
    );
    assert_eq!(
        bin.run(&["bill", "list", "--json"]).ok().json(),
        serde_json::json!([])
    );
    bin.run(&["bill", "import", "/no/such/file.csv"])
        .fails_with(66);
    bin.run(&[
        "bill",
        "add",
        "--account",
        "A-100200",
        "--amount",
        "-5.00",
        "--due",
        "2027-01-01",
        "--reference",
        "X",
    ])
    .fails_with(65);
    bin.run(&[
        "bill",
        "add",
        "--account",
        "A-100200",
        "--amount",
        "5.00",
        "--due",
        "01/02/2027",
        "--reference",
        "X",
    ])
    .fails_with(65);
    bin.run(&[
        "bill",
        "add",
        "--account",
        "A-100200",
        "--amount",
        "5.00",
        "--due",
        "2027-01-02",
        "--reference",
        "X",
    ])
    .ok();
    bin.run(&[
        "bill",
        "add",
        "--account",
        "A-100200",
        "--amount",
        "5.00",
        "--due",
        "2027-01-02",
        "--reference",
        "X",
    ])
    .fails_with(65);
    bin.run(&["bill", "void", &uuid::Uuid::now_v7().to_string()])
        .fails_with(66);
    bin.run(&[
        "bill",
        "adjust",
        &uuid::Uuid::now_v7().to_string(),
        "--amount",
        "1.00",
    ])
    .fails_with(64);
}

#[tokio::test]
async fn bad_schedules_are_refused_with_the_fix() {
    let (_db, bin) = ready(Kind::Sqlite).await;
    let card = member_with_card(&bin);
    let add = |extra: &[&str]| {
        let mut args = vec![
            "schedule",
            "add",
            "--account",
            "A-100200",
            "--card",
            card.as_str(),
        ];
        args.extend_from_slice(extra);
        bin.run(&args)
    };
    assert!(
        add(&["--monthly", "--day", "32", "--balance"])
            .fails_with(65)
            .stderr
            .contains("1 to 31")
    );
    add(&["--monthly", "--day", "1"]).fails_with(64);
    add(&["--monthly", "--day", "1", "--amount", "5.00", "--balance"]).fails_with(64);
    add(&[
        "--monthly",
        "--once",
        "--on",
        "now",
        "--day",
        "1",
        "--balance",
    ])
    .fails_with(64);
    assert!(
        add(&["--monthly", "--day", "1", "--amount", "5000.01"])
            .fails_with(65)
            .stderr
            .contains("max_amount")
    );
    add(&["--monthly", "--day", "1", "--amount", "0.00"]).fails_with(65);
    add(&["--once", "--on", "2020-01-01", "--balance"]).fails_with(65);
    add(&[
        "--monthly",
        "--day",
        "1",
        "--balance",
        "--time-zone",
        "Nowhere/City",
    ])
    .fails_with(65);
    add(&["--every", "2", "--unit", "fortnights", "--balance"]).fails_with(65);
    add(&[
        "--every",
        "1",
        "--unit",
        "weeks",
        "--balance",
        "--business-days",
    ])
    .fails_with(65);
    add(&["--monthly", "--day", "1", "--balance", "--at", "25:00"]).fails_with(65);
    assert_eq!(
        bin.run(&["schedule", "list", "--json"]).ok().json(),
        serde_json::json!([])
    );
    let id = add(&["--monthly", "--day", "1", "--balance"]).ok().id();
    bin.run(&["schedule", "update", &id]).fails_with(64);
    bin.run(&["schedule", "resume", &id]).fails_with(65);
    bin.run(&["schedule", "show", &uuid::Uuid::now_v7().to_string()])
        .fails_with(66);
    bin.run(&["payment", "show", &uuid::Uuid::now_v7().to_string()])
        .fails_with(66);
    bin.run(&["payment", "list", "--state", "done"])
        .fails_with(64);
}

#[tokio::test]
async fn bad_settings_exit_78_listing_every_problem() {
    let (db, bin) = ready(Kind::Sqlite).await;
    let bad = Bin::new(&db)
        .with_env("AUTOPAY__PAYMENTS__MISFIRE", "sometimes")
        .with_env("AUTOPAY__DAEMON__LEASE", "10s")
        .with_env("AUTOPAY__EMAIL__SMTP__PASSWORD", "hunter2-secret");
    let run = bad.run(&["check-config"]).fails_with(78);
    assert!(
        run.stderr.contains("payments.misfire") && run.stderr.contains("daemon.lease"),
        "{}",
        run.stderr
    );
    let json = bad.run(&["check-config", "--json"]).fails_with(78).json();
    assert_eq!(json["ok"], false);
    assert_eq!(json["problems"].as_array().unwrap().len(), 2);
    bad.run(&["member", "list"]).fails_with(78);
    let good = Bin::new(&db).with_env("AUTOPAY__EMAIL__SMTP__PASSWORD", "hunter2-secret");
    let shown = good.run(&["check-config", "--json"]).ok();
    assert!(!shown.stdout.contains("hunter2"), "secrets are redacted");
    assert_eq!(
        shown.json()["settings"]["email"]["smtp"]["password"],
        "[redacted]"
    );
    let file = db.path().join("bad.toml");
    std::fs::write(&file, "[payments]\ncurency = \"USD\"\n").unwrap();
    assert!(
        bin.run(&["--config", file.to_str().unwrap(), "status"])
            .fails_with(78)
            .stderr
            .contains("curency")
    );
    bin.run(&["--config", "/no/such.toml", "status"])
        .fails_with(78);
}

#[tokio::test]
async fn settings_errors_never_show_a_password_or_a_card_number() {
    let (db, bin) = ready(Kind::Sqlite).await;
    let clean = |run: &crate::helpers::Run| {
        let all = format!("{}\n{}", run.stdout, run.stderr);
        for secret in ["hunter2", "4242424242424242", "4242 4242 4242 4242"] {
            assert!(!all.contains(secret), "{secret} shown:\n{all}");
        }
    };
    // A syntax error on the password's line, and inside a multi-line password.
    for (text, line) in [
        ("[email.smtp]\npassword = \"hunter2\n", "line 2"),
        ("[email.smtp]\npassword = \"\"\"\nhunter2\n", "line 3"),
        (
            "[database]\nurl = \"postgres://u:hunter2@h/db\" x\n",
            "line 2",
        ),
        ("[email.smtp]\nhost = \"4242 4242 4242 4242\n", "line 2"),
    ] {
        let file = db.path().join("broken.toml");
        std::fs::write(&file, text).unwrap();
        let run = bin
            .run(&["--config", file.to_str().unwrap(), "check-config"])
            .fails_with(78);
        assert!(run.stderr.contains(line), "{}", run.stderr);
        clean(&run);
    }
    // A card number given as the settings file's path, or as a setting's value.
    let run = bin
        .run(&["--config", "4242424242424242", "status"])
        .fails_with(78);
    assert!(run.stderr.contains("--config"), "{}", run.stderr);
    clean(&run);
    let bad = Bin::new(&db)
        .with_env("AUTOPAY__DATABASE__MAX_CONNECTIONS", "4242424242424242")
        .with_env("AUTOPAY__EMAIL__SMTP__HOST", "x 4242 4242 4242 4242")
        .with_env(
            "AUTOPAY__PROCESSOR__SIMULATED__LEDGER",
            "postgresx://u:hunter2@h/db",
        );
    let run = bad.run(&["check-config"]).fails_with(78);
    assert!(
        run.stderr.contains("database.max_connections"),
        "{}",
        run.stderr
    );
    clean(&run);
    let run = bad.run(&["check-config", "--json"]).fails_with(78);
    assert_eq!(run.json()["ok"], false);
    clean(&run);
}

#[tokio::test]
async fn an_unmigrated_or_unreachable_database_says_what_to_do() {
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db);
    assert!(
        bin.run(&["member", "list"])
            .fails_with(78)
            .stderr
            .contains("autopay migrate")
    );
    let down = Bin::new(&db).with_env(
        "AUTOPAY__DATABASE__URL",
        "postgres://postgres@127.0.0.1:1/none",
    );
    down.run(&["status"]).fails_with(69);
}

async fn run_drain_charges_once_and_a_second_drain_changes_nothing(kind: Kind) {
    let (_db, bin) = ready(kind).await;
    let card = member_with_card(&bin);
    bin.run(&[
        "bill",
        "add",
        "--account",
        "A-100200",
        "--amount",
        "125.00",
        "--due",
        "2026-12-15",
        "--reference",
        "INV-1",
    ])
    .ok();
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
        "--balance",
        "--first-payment",
        "now",
    ])
    .ok();
    let dry = bin
        .run(&["run", "--drain", "--dry-run", "--json"])
        .ok()
        .json();
    assert_eq!(
        (dry["count"].as_i64(), dry["total"].as_str()),
        (Some(1), Some("125.00"))
    );
    assert_eq!(
        bin.run(&["payment", "list", "--json"]).ok().json(),
        serde_json::json!([]),
        "a dry run writes nothing"
    );
    let first = bin.run(&["run", "--drain", "--json"]).ok().json();
    assert_eq!(first["charge"]["succeeded"], 1);
    let again = bin.run(&["run", "--drain", "--json"]).ok().json();
    assert_eq!(again["charge"]["claimed"], 0);
    let paid = bin
        .run(&["payment", "list", "--state", "succeeded", "--json"])
        .ok()
        .json();
    assert_eq!(paid.as_array().unwrap().len(), 1);
    assert_eq!(paid[0]["amount"], "125.00");
    let shown = bin
        .run(&["payment", "show", paid[0]["id"].as_str().unwrap()])
        .ok()
        .stdout;
    assert!(
        shown.contains("succeeded") && shown.contains("attempt_started"),
        "{shown}"
    );
    assert_eq!(
        bin.run(&["bill", "list", "--json"]).ok().json()[0]["status"],
        "paid"
    );
    // About three months ahead: three or four 1sts, each at the (now paid) balance.
    let until = jiff::ZonedDateTime::now()
        .date()
        .checked_add(jiff::Span::new().days(100))
        .unwrap()
        .to_string();
    let forecast = bin
        .run(&["payment", "forecast", "--until", &until, "--json"])
        .ok()
        .json();
    assert!(
        (3..=4).contains(&forecast["count"].as_i64().unwrap()),
        "{forecast}"
    );
    assert_eq!(forecast["total"], "0.00", "{forecast}");
}

#[tokio::test]
async fn run_drain_charges_once_and_a_second_drain_changes_nothing_on_sqlite() {
    run_drain_charges_once_and_a_second_drain_changes_nothing(Kind::Sqlite).await;
}

#[tokio::test]
async fn run_drain_charges_once_and_a_second_drain_changes_nothing_on_postgres() {
    run_drain_charges_once_and_a_second_drain_changes_nothing(Kind::Postgres).await;
}

#[tokio::test]
async fn the_demo_seeds_a_fresh_default_database_and_charges_at_once() {
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db);
    let run = bin.run(&["run", "--demo", "--drain"]).ok();
    assert!(
        run.stdout.contains("seeded 6 demo members"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("charged 3 ok, 1 declined (will retry), 1 failed"),
        "{}",
        run.stdout
    );
    let again = bin.run(&["run", "--demo", "--drain"]).ok();
    assert!(
        again.stdout.contains("demo data already present"),
        "{}",
        again.stdout
    );
    assert!(
        db.path().join("simulated-processor.db").exists(),
        "the processor's ledger lives beside autopay's database"
    );
}

#[tokio::test]
async fn the_emergency_stop_holds_every_charge_until_resumed() {
    let (_db, bin) = ready(Kind::Sqlite).await;
    let card = member_with_card(&bin);
    bin.run(&[
        "schedule",
        "add",
        "--account",
        "A-100200",
        "--card",
        &card,
        "--once",
        "--on",
        "now",
        "--amount",
        "20.00",
    ])
    .ok();
    assert!(
        bin.run(&["charging", "pause", "--reason", "processor incident"])
            .ok()
            .stdout
            .contains("PAUSED")
    );
    assert!(
        bin.run(&["status"])
            .ok()
            .stdout
            .contains("processor incident")
    );
    assert_eq!(
        bin.run(&["run", "--drain", "--json"]).ok().json()["charge"]["claimed"],
        0
    );
    bin.run(&["charging", "resume"]).ok();
    assert_eq!(
        bin.run(&["run", "--drain", "--json"]).ok().json()["charge"]["succeeded"],
        1
    );
}

#[tokio::test]
async fn operator_payment_commands_refuse_what_the_state_machine_forbids() {
    let (_db, bin) = ready(Kind::Sqlite).await;
    add_member(&bin, "A-100200").ok();
    let lost = add_card(&bin, "A-100200", "4000000000009987").ok().id();
    bin.run(&[
        "schedule",
        "add",
        "--account",
        "A-100200",
        "--card",
        &lost,
        "--once",
        "--on",
        "now",
        "--amount",
        "20.00",
    ])
    .ok();
    bin.run(&["run", "--drain"]).ok();
    let failed = bin
        .run(&["payment", "list", "--state", "failed", "--json"])
        .ok()
        .json();
    let id = failed[0]["id"].as_str().unwrap().to_string();
    assert!(
        bin.run(&["payment", "retry", &id])
            .fails_with(65)
            .stderr
            .contains("--force")
    );
    assert!(
        bin.run(&["payment", "retry", &id, "--force"])
            .fails_with(65)
            .stderr
            .contains("disabled")
    );
    bin.run(&[
        "payment",
        "resolve",
        &id,
        "--as",
        "succeeded",
        "--reference",
        "x",
        "--reason",
        "y",
    ])
    .fails_with(65);
    bin.run(&[
        "payment",
        "resolve",
        &id,
        "--as",
        "maybe",
        "--reference",
        "x",
        "--reason",
        "y",
    ])
    .fails_with(64);
    bin.run(&["payment", "retry", &uuid::Uuid::now_v7().to_string()])
        .fails_with(66);
    bin.run(&["payment", "forecast", "--until", "2020-01-01"])
        .fails_with(65);
    bin.run(&["run", "--dry-run"]).fails_with(64);
    let pg = Bin::new(&_db).with_env(
        "AUTOPAY__DATABASE__URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    pg.run(&["run", "--demo"]).fails_with(64);
}

/// The slow processor: 300 ms, then a heavy tail, at a concurrency of 256 and a limit of 500
/// requests a second; no second ever holds more than the limit.
#[tokio::test]
async fn bench_with_a_slow_processor_keeps_the_rate_limit() {
    let db = TestDb::new(Kind::Sqlite).await;
    let run = Bin::new(&db)
        .run(&[
            "bench",
            "--scenario",
            "slow",
            "--payments",
            "600",
            "--backend",
            "sqlite",
            "--json",
        ])
        .ok();
    let results = run.json();
    let results = results.as_array().expect("an array of results");
    let latencies: Vec<&str> = results
        .iter()
        .map(|r| r["latency"].as_str().unwrap())
        .collect();
    assert_eq!(latencies, ["300ms", "300ms p99 2s"], "{}", run.stdout);
    for r in results {
        assert_eq!(r["scenario"], "slow", "{r}");
        assert_eq!(r["concurrency"], 256, "{r}");
        assert_eq!(r["rate_limit"], 500, "{r}");
        assert_eq!(r["target_per_second"], 450.0, "{r}");
        let most = r["most_requests_in_one_second"].as_u64().unwrap();
        assert!(most > 0 && most <= 500, "{r}");
        assert!(r["ceiling_per_second"].is_null(), "{r}");
    }
}

/// The names of the benchmark's throwaway databases on the test PostgreSQL.
async fn bench_databases(admin: &str) -> Vec<String> {
    let mut conn = crate::helpers::connect_admin(admin).await;
    sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE 'autopay_bench_%'")
        .fetch_all(&mut conn)
        .await
        .expect("list databases")
}

/// The throwaway database this run's progress named is gone (other benchmarks may run
/// meanwhile, so the check is by name).
async fn assert_dropped(stderr: &str, admin: &str) {
    let made = stderr
        .split_whitespace()
        .find(|w| w.starts_with("autopay_bench_"))
        .expect("the progress names the throwaway database");
    assert!(!bench_databases(admin).await.iter().any(|d| d == made));
}

#[tokio::test]
async fn bench_charges_on_throwaway_databases_and_leaves_none_behind() {
    // The configured database is a SQLite file in the test's folder; bench must never create it.
    let db = TestDb::new(Kind::Sqlite).await;
    let configured = db.path().join("autopay.db");
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| crate::helpers::DEFAULT_PG.to_string());

    let run = Bin::new(&db)
        .run(&[
            "bench",
            "--payments",
            "200",
            "--backend",
            "both",
            "--postgres-url",
            &admin,
            "--ceiling-seconds",
            "2",
            "--json",
        ])
        .ok();
    let results = run.json();
    let results = results.as_array().expect("an array of results");
    let backends: Vec<&str> = results
        .iter()
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    assert_eq!(backends, ["sqlite", "postgres"], "{}", run.stdout);
    for r in results {
        assert_eq!(r["payments"], 200, "{r}");
        assert!(r["charges_per_second"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["charge_seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["load_seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_rss_mib"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["scenario"], "charge", "{r}");
        assert_eq!(r["ledger"], "memory", "{r}");
        assert_eq!(r["latency"], "0s", "{r}");
        assert!(r["rate_limit"].is_null(), "{r}");
        assert!(
            r["most_requests_in_one_second"].as_u64().unwrap() > 0,
            "{r}"
        );
    }
    // PostgreSQL's ceiling, measured by pgbench on the same database after the run.
    assert!(results[0]["ceiling_per_second"].is_null());
    let ceiling = results[1]["ceiling_per_second"].as_f64().unwrap();
    assert!(ceiling > 0.0, "{}", results[1]);
    let share = results[1]["share_of_ceiling"].as_f64().unwrap();
    let expected = results[1]["charges_per_second"].as_f64().unwrap() / ceiling;
    assert!((share - expected).abs() < 0.01, "{}", results[1]);
    assert!(
        run.stderr.contains("measuring the ceiling: pgbench"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("sqlite: a throwaway database in")
            && run.stderr.contains("loading 200 schedules"),
        "{}",
        run.stderr
    );

    // Nothing left behind: not its throwaway database (other benchmarks may run meanwhile), no
    // configured file, no processor ledger.
    assert_dropped(&run.stderr, &admin).await;
    assert!(
        !configured.exists(),
        "bench created the configured database"
    );
    assert!(!db.path().join("simulated-processor.db").exists());
}

/// The month start: schedules loaded in bulk (member 0 through the store, the rest copied),
/// all planned and charged, every receipt in the outbox, the ledger in a database of its own.
#[tokio::test]
async fn bench_month_start_charges_bulk_loaded_schedules_and_queues_every_receipt() {
    let db = TestDb::new(Kind::Sqlite).await;
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| crate::helpers::DEFAULT_PG.to_string());
    let run = Bin::new(&db)
        .run(&[
            "bench",
            "--scenario",
            "month-start",
            "--payments",
            "2345",
            "--postgres-url",
            &admin,
            "--ceiling-seconds",
            "0",
            "--json",
        ])
        .ok();
    let results = run.json();
    let results = results.as_array().expect("an array of results");
    assert_eq!(results.len(), 2, "{}", run.stdout);
    for r in results {
        assert_eq!(r["scenario"], "month-start", "{r}");
        assert_eq!(r["payments"], 2345, "{r}");
        assert_eq!(r["receipts_queued"], 2345, "{r}");
        assert_eq!(
            r["ledger"], "database",
            "the memory figure is autopay's: {r}"
        );
        assert!(
            r["ceiling_per_second"].is_null(),
            "--ceiling-seconds 0: {r}"
        );
        assert!(r["peak_rss_mib"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(
        run.stderr.contains("235 members, cards and bills loaded"),
        "{}",
        run.stderr
    );
}

/// The table says where the ledger was: it said "in memory" for every run, also for a ledger
/// in a database.
#[tokio::test]
async fn bench_table_names_where_the_ledger_was() {
    let db = TestDb::new(Kind::Sqlite).await;
    let run = Bin::new(&db)
        .run(&[
            "bench",
            "--payments",
            "20",
            "--backend",
            "sqlite",
            "--ledger",
            "database",
        ])
        .ok();
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("sqlite"))
        .expect("a row for sqlite");
    assert!(
        row.split_whitespace().any(|c| c == "database"),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("ledger is in memory"),
        "{}",
        run.stdout
    );
}

/// The mail scenario: receipts delivered to a local SMTP server by the dispatcher, beside a
/// plain one-connection client's rate to the same server, on both backends.
#[tokio::test]
async fn bench_mail_delivers_every_receipt_and_prints_the_plain_clients_rate_beside_it() {
    let db = TestDb::new(Kind::Sqlite).await;
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| crate::helpers::DEFAULT_PG.to_string());
    let run = Bin::new(&db)
        .run(&[
            "bench",
            "--scenario",
            "mail",
            "--payments",
            "45",
            "--postgres-url",
            &admin,
            "--json",
        ])
        .ok();
    let results = run.json();
    let results = results.as_array().expect("an array of results");
    let backends: Vec<&str> = results
        .iter()
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    assert_eq!(backends, ["sqlite", "postgres"], "{}", run.stdout);
    for r in results {
        assert_eq!(r["receipts"], 45, "{r}");
        assert_eq!(r["pool_size"], 4, "the default email.smtp.pool_size: {r}");
        assert!(r["message_bytes"].as_u64().unwrap() > 1000, "{r}");
        let rate = r["receipts_per_second"].as_f64().unwrap();
        let plain = r["plain_client_per_second"].as_f64().unwrap();
        assert!(rate > 0.0 && plain > 0.0, "{r}");
        let share = r["share_of_plain_client"].as_f64().unwrap();
        assert!((share - rate / plain).abs() < 0.01, "{r}");
    }
    // Its own throwaway database is gone (others' benchmarks may run meanwhile).
    assert_dropped(&run.stderr, &admin).await;
}

#[tokio::test]
async fn bench_without_postgres_exits_69_naming_the_url_and_the_fix() {
    let db = TestDb::new(Kind::Sqlite).await;
    let run = Bin::new(&db)
        .run(&[
            "bench",
            "--payments",
            "10",
            "--backend",
            "postgres",
            "--postgres-url",
            "postgres://bench:s3cret-pw@127.0.0.1:1/none",
        ])
        .fails_with(69);
    assert!(run.stderr.contains("127.0.0.1:1"), "{}", run.stderr);
    assert!(run.stderr.contains("--backend sqlite"), "{}", run.stderr);
    assert!(!run.stderr.contains("s3cret-pw"), "{}", run.stderr);
    assert!(!db.path().join("autopay.db").exists());
}

#[tokio::test]
async fn every_free_text_field_refuses_direction_overrides_and_line_separators() {
    let (_db, bin) = ready(Kind::Sqlite).await;
    let card = member_with_card(&bin);
    let bill = bin
        .run(&[
            "bill",
            "add",
            "--account",
            "A-100200",
            "--amount",
            "10.00",
            "--due",
            "2026-12-15",
            "--reference",
            "INV-1",
        ])
        .ok()
        .id();
    let payment = uuid::Uuid::now_v7().to_string();
    for bad in [
        "INV\u{202E}1001",
        "INV\u{2028}1001",
        "INV\u{2029}1001",
        "INV\u{2066}1001\u{2069}",
        "INV\u{200B}1001",
    ] {
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec![
                    "bill",
                    "add",
                    "--account",
                    "A-100200",
                    "--amount",
                    "10.00",
                    "--due",
                    "2026-12-15",
                    "--reference",
                    bad,
                ],
                "--reference",
            ),
            (vec!["bill", "void", &bill, "--reason", bad], "--reason"),
            (
                vec!["bill", "adjust", &bill, "--amount", "5.00", "--reason", bad],
                "--reason",
            ),
            (
                vec!["bill", "pay", &bill, "--amount", "1.00", "--external", bad],
                "--external",
            ),
            (vec!["charging", "pause", "--reason", bad], "--reason"),
            (
                vec![
                    "payment",
                    "resolve",
                    &payment,
                    "--as",
                    "failed",
                    "--reference",
                    bad,
                    "--reason",
                    "checked with the processor",
                ],
                "--reference",
            ),
            (
                vec![
                    "payment",
                    "resolve",
                    &payment,
                    "--as",
                    "failed",
                    "--reference",
                    "ticket 12",
                    "--reason",
                    bad,
                ],
                "--reason",
            ),
            (
                vec![
                    "schedule",
                    "add",
                    "--account",
                    "A-100200",
                    "--card",
                    &card,
                    "--monthly",
                    "--day",
                    "1",
                    "--balance",
                    "--terms-version",
                    bad,
                ],
                "--terms-version",
            ),
            (
                vec!["member", "update", "A-100200", "--name", bad],
                "--name",
            ),
        ];
        for (args, flag) in cases {
            let run = bin.run(&args).fails_with(65);
            assert!(
                run.stderr.contains(flag) && run.stderr.contains("U+"),
                "{args:?}: {}",
                run.stderr
            );
            assert!(!run.stderr.contains(bad), "{}", run.stderr);
        }
    }
    // Nothing was stored: one bill, untouched; charging runs; no schedule.
    let bills = bin.run(&["bill", "list", "--json"]).ok().json();
    assert_eq!(bills.as_array().unwrap().len(), 1);
    assert_eq!(bills[0]["amount_due"], "10.00");
    assert_eq!(bills[0]["status"], "open");
    assert!(bin.run(&["status"]).ok().stdout.contains("running"));
    assert_eq!(
        bin.run(&["schedule", "list", "--json"]).ok().json(),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn files_holding_member_data_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db).with_umask("022");
    bin.run(&["migrate"]).ok();
    member_with_card(&bin);
    bin.run(&[
        "bill",
        "add",
        "--account",
        "A-100200",
        "--amount",
        "25.00",
        "--due",
        "2026-12-15",
        "--reference",
        "INV-1",
    ])
    .ok();
    let card = bin
        .run(&["card", "list", "--account", "A-100200", "--json"])
        .ok()
        .json()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    bin.run(&[
        "schedule",
        "add",
        "--account",
        "A-100200",
        "--card",
        &card,
        "--once",
        "--on",
        "now",
        "--balance",
    ])
    .ok();
    bin.run(&["run", "--drain"]).ok();

    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let mut files = vec![
        db.path().join("autopay.db"),
        db.path().join("simulated-processor.db"),
    ];
    for extra in [
        "autopay.db-wal",
        "autopay.db-shm",
        "simulated-processor.db-wal",
        "simulated-processor.db-shm",
    ] {
        if db.path().join(extra).exists() {
            files.push(db.path().join(extra));
        }
    }
    let mail = db.path().join("mail");
    assert_eq!(mode(&mail), 0o700, "{}", mail.display());
    let emails: Vec<_> = std::fs::read_dir(&mail)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(emails.len() >= 2, "setup and receipt: {emails:?}");
    files.extend(emails);
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[tokio::test]
async fn the_audit_names_the_real_user_and_hostile_stored_text_is_shown_escaped() {
    let (db, bin) = ready(Kind::Sqlite).await;
    let me = autopay::cli::operator();
    assert!(!me.contains("tester"), "{me}");

    // $USER and $LOGNAME are the caller's to set: they name nobody.
    let liar = Bin::new(&db)
        .with_env("USER", "mallory (approved)\u{1b}[2J\u{202e}")
        .with_env("LOGNAME", "mallory");
    liar.run(&["charging", "pause", "--reason", "maintenance"])
        .ok();
    let status = bin.run(&["status"]).ok().stdout;
    assert!(!status.contains("mallory"), "{status}");
    assert!(
        status.contains(&format!("by {me}: maintenance")),
        "{status}"
    );
    let json = bin.run(&["status", "--json"]).ok().json();
    assert_eq!(json["control"]["charging_paused"]["by"], me.as_str());
    bin.run(&["charging", "resume"]).ok();

    // Text stored by an older version (or by hand) is shown escaped: it can neither drive the
    // terminal, forge a line, nor reorder what is read.
    let card = member_with_card(&bin);
    bin.run(&[
        "schedule",
        "add",
        "--account",
        "A-100200",
        "--card",
        &card,
        "--once",
        "--on",
        "now",
        "--amount",
        "5.00",
    ])
    .ok();
    bin.run(&["run", "--drain"]).ok();
    let payment = bin.run(&["payment", "list", "--json"]).ok().json()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let hostile = "cli:evil\u{1b}]0;owned\u{7}\u{202e}lanigiro\nforged line\u{2028}x";
    let store = db.store().await;
    store
        .set_charging_pause(
            Some("red\u{1b}[31m\u{202e}txet\rforged"),
            &autopay::store::Audit {
                actor: hostile.into(),
                at: jiff::Timestamp::now(),
            },
        )
        .await
        .unwrap();
    let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE events SET actor = $1 WHERE entity_id = $2")
        .bind(hostile)
        .bind(&payment)
        .execute(&pool)
        .await
        .unwrap();
    for args in [
        vec!["status"],
        vec!["payment", "show", &payment],
        vec!["status", "--json"],
        vec!["payment", "show", &payment, "--json"],
    ] {
        let out = bin.run(&args).ok().stdout;
        for c in ['\u{1b}', '\u{7}', '\u{202e}', '\u{2028}', '\r'] {
            assert!(!out.contains(c), "{args:?} shows {c:?}:\n{out}");
        }
        assert!(
            !out.lines().any(|l| l.trim_start().starts_with("forged")),
            "{args:?} forged a line:\n{out}"
        );
    }
    let shown = bin.run(&["payment", "show", &payment]).ok().stdout;
    assert!(shown.contains("cli:evil\\u{1b}]0;owned"), "{shown}");
    // JSON keeps the exact value for scripts.
    let json = bin.run(&["status", "--json"]).ok().json();
    assert_eq!(json["control"]["charging_paused"]["by"], hostile);
}
