//! No card number or security code can be found in the database files, the logs, or any
//! output, whatever a user types and wherever they type it.

use autopay::processor::simulated::TEST_CARDS;

use crate::helpers::{Bin, Kind, Run, TestDb, add_card, add_member};

/// The public test numbers the simulated processor knows.
fn numbers() -> impl Iterator<Item = &'static str> {
    TEST_CARDS.iter().map(|(n, _)| *n)
}

fn assert_clean(what: &str, text: &str) {
    // Also without separators, so "4242 4242 4242 4242" cannot slip by.
    let squeezed: String = text.chars().filter(|c| *c != ' ' && *c != '-').collect();
    for n in numbers() {
        assert!(
            !squeezed.contains(n),
            "{what} contains the card number {n}:\n{text}"
        );
    }
}

fn check(run: &Run, outputs: &mut Vec<String>) {
    outputs.push(format!("{}\n{}", run.stdout, run.stderr));
}

#[tokio::test]
async fn no_card_number_reaches_the_database_the_logs_or_any_output() {
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db)
        .with_env("AUTOPAY__LOG__LEVEL", "debug")
        .with_env("AUTOPAY__LOG__FORMAT", "json");
    let mut outputs = Vec::new();
    check(&bin.run(&["migrate"]).ok(), &mut outputs);
    check(&add_member(&bin, "A-100200"), &mut outputs);

    // Every test number through standard input, the way cards are meant to arrive.
    let mut cards = Vec::new();
    for n in numbers() {
        let run = bin
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
                Some(&format!("{n}\n123\n")),
            )
            .ok();
        cards.push(run.json()["id"].as_str().unwrap().to_string());
        check(&run, &mut outputs);
    }
    check(
        &bin.run(&["card", "list", "--account", "A-100200", "--json"])
            .ok(),
        &mut outputs,
    );
    check(
        &bin.run(&["card", "list", "--account", "A-100200"]).ok(),
        &mut outputs,
    );
    check(
        &bin.run(&["member", "show", "A-100200", "--json"]).ok(),
        &mut outputs,
    );
    check(
        &bin.run(&[
            "schedule",
            "add",
            "--account",
            "A-100200",
            "--card",
            &cards[0],
            "--monthly",
            "--day",
            "1",
            "--balance",
        ])
        .ok(),
        &mut outputs,
    );

    // A card number typed where it does not belong: refused, and never echoed.
    let spaced = "4242 4242 4242 4242";
    let misplaced: Vec<Vec<&str>> = vec![
        vec!["card", "add", "--account", "A-100200", "4242424242424242"],
        vec![
            "card",
            "add",
            "--account",
            "A-100200",
            "--exp",
            "4242424242424242",
        ],
        vec![
            "card",
            "add",
            "--account",
            "4242424242424242",
            "--exp",
            "12/2030",
        ],
        vec![
            "card",
            "add",
            "--account",
            "A-100200",
            "--token",
            "4242424242424242",
        ],
        vec![
            "card",
            "add",
            "--account",
            "A-100200",
            "--number",
            "4242424242424242",
        ],
        vec!["card", "remove", "4242424242424242"],
        vec![
            "member",
            "add",
            "--account",
            "4242424242424242",
            "--name",
            "x",
            "--email",
            "x@example.org",
            "--type",
            "individual-family",
        ],
        vec![
            "member",
            "add",
            "--account",
            "B-100300",
            "--name",
            "4242424242424242",
            "--email",
            "x@example.org",
            "--type",
            "individual-family",
        ],
        vec![
            "member",
            "add",
            "--account",
            "B-100300",
            "--name",
            "x",
            "--email",
            "4242424242424242@example.org",
            "--type",
            "individual-family",
        ],
        vec![
            "member",
            "add",
            "--account",
            "B-100300",
            "--name",
            "x",
            "--email",
            "x@example.org",
            "--type",
            "individual-family",
            "--time-zone",
            "4242424242424242",
        ],
        vec!["member", "show", "4242424242424242"],
        vec![
            "bill",
            "add",
            "--account",
            "A-100200",
            "--amount",
            "4242424242424242",
            "--due",
            "2027-01-01",
            "--reference",
            "R1",
        ],
        vec![
            "bill",
            "add",
            "--account",
            "A-100200",
            "--amount",
            "1.00",
            "--due",
            "4242424242424242",
            "--reference",
            "R1",
        ],
        vec![
            "bill",
            "add",
            "--account",
            "A-100200",
            "--amount",
            "1.00",
            "--due",
            "2027-01-01",
            "--reference",
            spaced,
        ],
        vec![
            "bill",
            "pay",
            "4242424242424242",
            "--amount",
            "1.00",
            "--external",
            "X",
        ],
        vec![
            "schedule",
            "add",
            "--account",
            "A-100200",
            "--card",
            "4242424242424242",
            "--monthly",
            "--day",
            "1",
            "--balance",
        ],
        vec![
            "schedule",
            "add",
            "--account",
            "A-100200",
            "--card",
            &cards[1],
            "--monthly",
            "--day",
            "1",
            "--amount",
            "4242424242424242",
        ],
        vec![
            "schedule",
            "preview",
            "--monthly",
            "--day",
            "1",
            "--at",
            "4242424242424242",
        ],
        vec!["payment", "list", "--state", "4242424242424242"],
        vec!["4242424242424242"],
        vec!["member", "list", "--json", spaced],
    ];
    for args in &misplaced {
        let run = bin.run(args);
        assert_ne!(run.code, 0, "{args:?} must be refused");
        check(&run, &mut outputs);
    }

    // A security code that is refused is not echoed either.
    let bad_code = bin.run_with_stdin(
        &["card", "add", "--account", "A-100200", "--exp", "12/2030"],
        Some("4242424242424242\n98x\n"),
    );
    assert_eq!(bad_code.code, 65);
    assert!(!bad_code.stderr.contains("98x"), "{}", bad_code.stderr);
    check(&bad_code, &mut outputs);

    for (i, out) in outputs.iter().enumerate() {
        assert_clean(&format!("output #{i}"), out);
    }
    // The database, its WAL and anything else in the folder.
    for entry in std::fs::read_dir(db.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for n in numbers() {
            assert!(
                !text.contains(n),
                "{} contains the card number {n}",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn no_card_number_reaches_postgres() {
    let db = TestDb::new(Kind::Postgres).await;
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    add_member(&bin, "A-100200");
    for n in numbers() {
        add_card(&bin, "A-100200", n).ok();
    }
    // Every text column of every table, dumped as JSON.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(tables.len() >= 10, "{tables:?}");
    for table in tables {
        let dump: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT json_agg(t)::text FROM {table} t"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_clean(&format!("table {table}"), &dump.unwrap_or_default());
    }
}

/// Every byte of every file in the test's folder (the database, its WAL, the ledger, mail).
fn folder_bytes(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_token_holding_a_card_number_is_refused_without_echoing_or_storing_it() {
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    add_member(&bin, "A-100200").ok();
    let add = |token: &str| bin.run(&["card", "add", "--account", "A-100200", "--token", token]);

    // A card number dressed as a token, in the simulated processor's own shape or another.
    for token in [
        "sim_approve_visa_4242_122030_4242424242424242",
        "pm_4242424242424242",
        "tok_6011111111111117",
        "sim_approve_visa_4242_122030_5555-5555-5555-4444",
    ] {
        let run = add(token).fails_with(65);
        assert!(run.stderr.contains("--token"), "{}", run.stderr);
        assert!(run.stderr.contains("card number"), "{}", run.stderr);
        assert_clean(
            "card add --token",
            &format!("{}\n{}", run.stdout, run.stderr),
        );
    }
    // Not a token of the simulated processor's shape: refused before it is looked up.
    for token in [
        "sim_approve_visa_4242_122030_short",
        "sim_approve_visa_4242_122030_0123456789ab;x",
        "tok_visa\u{202E}",
        "tok_visa' OR '1'='1",
        "pm_1NqXyz2eZvKYlo2C",
    ] {
        let run = add(token).fails_with(65);
        assert!(run.stderr.contains("--token"), "{}", run.stderr);
    }
    // Its own tokens and the portal's test tokens still go in.
    add("tok_visa").ok();
    let cards = bin
        .run(&["card", "list", "--account", "A-100200", "--json"])
        .ok()
        .json();
    assert_eq!(cards.as_array().unwrap().len(), 1, "{cards}");

    for (path, bytes) in folder_bytes(db.path()) {
        let text = String::from_utf8_lossy(&bytes);
        for n in numbers() {
            assert!(!text.contains(n), "{} holds {n}", path.display());
        }
    }
}
