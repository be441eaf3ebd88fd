//! Bills as the billing system sends them: the rows of a `bill import` file
//! (`account,reference,amount,due_date`, a header row optional) and the amounts a person types.
//!
//! Every field is parsed on its own, so that every problem on a line is reported at once, and no
//! problem repeats a cell that could be a card number or hold a control character: the file may
//! have been pasted together by hand.

use jiff::civil::Date;

use super::card::contains_card_number;
use super::member::AccountNumber;
use super::money::{Currency, Money};
use super::schedule::parse_date;
use super::text::Reference;

/// An amount typed by a person or read from a file: a card number pasted here is refused
/// rather than read as a sum of money.
pub fn parse_amount(value: &str, currency: Currency) -> Result<Money, String> {
    if contains_card_number(value) {
        return Err(
            "this looks like a card number, not an amount; write an amount such as 125.00".into(),
        );
    }
    Money::parse(value, currency).map_err(|e| e.to_string())
}

/// One line of an import file that holds a bill, each field parsed on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportLine {
    /// The line's number in the file, from 1 (a CSV record with a quoted line break counts as
    /// the line it starts on).
    pub line: usize,
    pub account: Option<AccountNumber>,
    pub reference: Option<Reference>,
    pub amount: Option<Money>,
    pub due_date: Option<Date>,
    /// What is wrong with the line, field by field ("amount: ..."); empty when it is a bill.
    pub problems: Vec<String>,
}

/// A line that is a bill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillRow {
    pub line: usize,
    pub account: AccountNumber,
    pub reference: Reference,
    pub amount: Money,
    pub due_date: Date,
}

impl ImportLine {
    /// The bill, when the line has no problem.
    pub fn row(&self) -> Option<BillRow> {
        match (&self.account, &self.reference, self.amount, self.due_date) {
            (Some(account), Some(reference), Some(amount), Some(due_date))
                if self.problems.is_empty() =>
            {
                Some(BillRow {
                    line: self.line,
                    account: account.clone(),
                    reference: reference.clone(),
                    amount,
                    due_date,
                })
            }
            _ => None,
        }
    }
}

/// Reads an import file's text into its lines, in order: a header row (first cell `account`)
/// and blank lines are skipped; a record that is not valid CSV or has other than four fields
/// comes back with that problem alone.
pub fn read_import(text: &str, currency: Currency) -> Vec<ImportLine> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text.as_bytes());
    // The physical line a record starts on: the csv crate's own line count skips blank lines,
    // and its byte position is where the blank lines before the record begin.
    let line_at = |byte: u64| {
        let bytes = text.as_bytes();
        let mut start = usize::try_from(byte).map_or(bytes.len(), |b| b.min(bytes.len()));
        while bytes.get(start).is_some_and(|b| *b == b'\n' || *b == b'\r') {
            start += 1;
        }
        bytes[..start].iter().filter(|b| **b == b'\n').count() + 1
    };
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let fallback = i + 1;
        let blank = |line: usize, problem: String| ImportLine {
            line,
            account: None,
            reference: None,
            amount: None,
            due_date: None,
            problems: vec![problem],
        };
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(fallback, |p| line_at(p.byte()));
                out.push(blank(line, "not valid CSV".into()));
                continue;
            }
        };
        let line = record.position().map_or(fallback, |p| line_at(p.byte()));
        let cells: Vec<&str> = record.iter().collect();
        if i == 0
            && cells
                .first()
                .is_some_and(|c| c.eq_ignore_ascii_case("account"))
        {
            continue;
        }
        if cells.iter().all(|c| c.is_empty()) {
            continue;
        }
        let [account, reference, amount, due] = cells.as_slice() else {
            out.push(blank(
                line,
                format!(
                    "{} fields; expected 4: account,reference,amount,due_date",
                    cells.len()
                ),
            ));
            continue;
        };
        let mut problems = Vec::new();
        let account = AccountNumber::parse(account)
            .map_err(|e| problems.push(format!("account: {e}")))
            .ok();
        let reference = Reference::parse(reference)
            .map_err(|e| problems.push(format!("reference: {e}")))
            .ok();
        let amount = parse_amount(amount, currency)
            .map_err(|e| problems.push(format!("amount: {e}")))
            .ok()
            .and_then(|m| {
                if m.minor() < 0 {
                    problems.push("amount: a bill's amount is 0.00 or more".into());
                    None
                } else {
                    Some(m)
                }
            });
        // parse_date's error repeats the cell, which may be anything: say what is expected.
        let due_date = parse_date(due)
            .map_err(|_| {
                problems
                    .push("due_date: not a date; write it as YYYY-MM-DD, such as 2026-12-01".into())
            })
            .ok();
        out.push(ImportLine {
            line,
            account,
            reference,
            amount,
            due_date,
            problems,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_file_with_a_header_and_good_rows_reads_as_bills() {
        let lines = read_import(
            "account,reference,amount,due_date\nA-100200,INV-1,125.00,2026-12-15\n\n\"B-100300\",\"INV, 2\",0.00,2027-01-01\n",
            Currency::USD,
        );
        let rows: Vec<BillRow> = lines.iter().filter_map(ImportLine::row).collect();
        assert_eq!(rows.len(), 2, "{lines:?}");
        assert_eq!((rows[0].line, rows[0].reference.as_str()), (2, "INV-1"));
        assert_eq!((rows[1].line, rows[1].reference.as_str()), (4, "INV, 2"));
        assert_eq!(rows[1].amount.minor(), 0);
    }

    #[test]
    fn every_problem_on_a_line_is_named_without_repeating_the_cell() {
        let lines = read_import(
            "A!,INV\u{202E}1,4242424242424242,4242 4242 4242 4242\nA-100200,x\nA-100200,R,-1.00,2026-02-30\n",
            Currency::USD,
        );
        assert_eq!(lines.len(), 3);
        let first = lines[0].problems.join("; ");
        for field in ["account:", "reference:", "amount:", "due_date:"] {
            assert!(first.contains(field), "{first}");
        }
        assert!(!first.contains("4242"), "{first}");
        assert!(lines[1].problems[0].contains("2 fields"));
        assert!(lines[2].problems.iter().any(|p| p.contains("0.00 or more")));
        assert!(lines[2].problems.iter().any(|p| p.starts_with("due_date")));
        assert!(lines.iter().all(|l| l.row().is_none()));
    }

    proptest! {
        #[test]
        fn any_text_reads_without_panicking_and_every_bill_is_valid(text in "(\\PC|[\",\\n\\r])*") {
            for l in read_import(&text, Currency::USD) {
                match l.row() {
                    Some(row) => {
                        prop_assert!(row.amount.minor() >= 0);
                        prop_assert_eq!(Reference::parse(row.reference.as_str()), Ok(row.reference.clone()));
                    }
                    None => prop_assert!(!l.problems.is_empty()),
                }
                for p in &l.problems {
                    prop_assert!(!p.chars().any(crate::domain::text::is_control_or_invisible), "{:?}", p);
                }
            }
        }
    }
}
