//! `autopay bill ...`: bills one at a time or imported from CSV, and the changes that may turn
//! into credits.

use std::collections::HashMap;
use std::path::Path;

use super::args::BillCommand;
use super::members::account;
use super::output::{self, Table, say};
use super::{CliError, Context, exit, parse_id};
use crate::domain::bill;
use crate::domain::ids::MemberId;
use crate::domain::member::AccountNumber;
use crate::domain::money::Money;
use crate::domain::schedule::parse_date;
use crate::domain::text::{self, Reason, Reference, TextError};
use crate::store::{BillChange, NewBill, Store, StoreError};

/// A bill reference, or an outside payment's: what the billing system calls it.
fn reference(value: &str) -> Result<Reference, TextError> {
    Reference::parse(value)
}

/// Text stored in clear (references, reasons, terms versions) under the one free-text rule of
/// [`crate::domain::text`]. `operate.rs` and `schedules.rs` call this with their own limits.
pub(super) fn free_text(value: &str, max: usize) -> Result<String, String> {
    text::check(value, max)
        .map(str::to_owned)
        .map_err(|e| e.to_string())
}

fn money(ctx: &Context, value: &str, flag: &str) -> Result<Money, CliError> {
    bill::parse_amount(value, ctx.settings.payments.currency)
        .map_err(|e| CliError::data(format!("{flag}: {e}")))
}

/// Reads and checks every row of a CSV file (domain::bill), then the members it names,
/// collecting every problem by line.
async fn read_csv(ctx: &Context, store: &dyn Store, path: &Path) -> Result<Vec<NewBill>, CliError> {
    let bytes = std::fs::read(path).map_err(|e| {
        CliError::new(
            exit::NO_INPUT,
            format!("cannot read {}: {e}; check the path", path.display()),
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        CliError::data(format!(
            "{} is not UTF-8 text (a bad byte at offset {}); save it as UTF-8 CSV and import it again",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    let mut members: HashMap<AccountNumber, Option<MemberId>> = HashMap::new();
    let mut bills = Vec::new();
    let mut problems = Vec::new();
    let mut seen: HashMap<(MemberId, Reference), usize> = HashMap::new();
    for parsed in bill::read_import(&text, ctx.settings.payments.currency) {
        let line = parsed.line;
        let mut row_problems = parsed.problems.clone();
        let member_id = match &parsed.account {
            Some(a) => {
                if !members.contains_key(a) {
                    let found = match store.member(a).await {
                        Ok(m) => Some(m.id),
                        Err(StoreError::NotFound(_)) => None,
                        Err(e) => return Err(e.into()),
                    };
                    members.insert(a.clone(), found);
                }
                let found = members.get(a).copied().flatten();
                if found.is_none() {
                    row_problems.push(format!(
                        "account: no member has account number {}",
                        a.masked()
                    ));
                }
                found
            }
            None => None,
        };
        if let (Some(member_id), Some(reference)) = (member_id, &parsed.reference)
            && let Some(first) = seen.insert((member_id, reference.clone()), line)
        {
            row_problems.push(format!(
                "reference '{reference}' repeats line {first} for the same account"
            ));
        }
        if !row_problems.is_empty() {
            problems.push(format!("line {line}: {}", row_problems.join("; ")));
            continue;
        }
        if let (Some(member_id), Some(row)) = (member_id, parsed.row()) {
            bills.push(NewBill {
                member_id,
                reference: row.reference.into(),
                amount_due: row.amount,
                due_date: row.due_date,
                origin: format!("line {line}"),
            });
        }
    }
    if !problems.is_empty() {
        return Err(CliError::data(format!(
            "{} has {} bad line(s); nothing was imported. Fix them and import the file again:\n  {}",
            path.display(),
            problems.len(),
            problems.join("\n  ")
        )));
    }
    Ok(bills)
}

fn print_change(ctx: &Context, change: &BillChange, what: &str) -> Result<(), CliError> {
    if ctx.json {
        return output::json(change);
    }
    say(format!(
        "{what} bill {}: due {}, paid {}, {}",
        change.bill.id,
        change.bill.amount_due.display_with_code(),
        change.bill.amount_paid.display_with_code(),
        change.bill.status
    ));
    if let Some(credit) = &change.credit {
        say(format!(
            "credit {} of {} recorded for the member",
            credit.id,
            credit.amount.display_with_code()
        ));
    }
    Ok(())
}

pub(super) async fn bill(ctx: &Context, command: BillCommand) -> Result<(), CliError> {
    match command {
        BillCommand::Add {
            account: acct,
            amount,
            due,
            reference: r,
        } => {
            let acct = account(&acct)?;
            let amount_due = money(ctx, &amount, "--amount")?;
            if amount_due.minor() < 0 {
                return Err(CliError::data("--amount: a bill's amount is 0.00 or more"));
            }
            let due_date = parse_date(&due).map_err(|e| CliError::data(format!("--due: {e}")))?;
            let r = reference(&r).map_err(|e| CliError::data(format!("--reference: {e}")))?;
            let store = ctx.store().await?;
            let member = store.member(&acct).await?;
            let bill = NewBill {
                member_id: member.id,
                reference: r.to_string(),
                amount_due,
                due_date,
                origin: "--reference".into(),
            };
            let import = store.add_bills(&[bill], &ctx.audit()).await?;
            let Some(added) = import.added.first() else {
                return Err(CliError::data(format!(
                    "bill '{r}' already exists for this member with the same amount and due date; nothing was added"
                )));
            };
            tracing::info!(bill_id = %added.id, member_id = %member.id, "bill added");
            if ctx.json {
                return output::json(added);
            }
            say(added.id.to_string());
            Ok(())
        }
        BillCommand::Import { file, dry_run } => {
            let store = ctx.store().await?;
            let bills = read_csv(ctx, store.as_ref(), &file).await?;
            let total = Money::checked_sum(
                ctx.settings.payments.currency,
                bills.iter().map(|b| b.amount_due),
            )
            .map_err(|e| CliError::data(format!("{}: the bills' total: {e}", file.display())))?;
            if dry_run {
                if ctx.json {
                    return output::json(&serde_json::json!({
                        "dry_run": true, "bills": bills.len(), "total": total.amount_string(), "currency": total.currency(),
                    }));
                }
                say(format!(
                    "{} bill(s), total {}; nothing stored (dry run)",
                    bills.len(),
                    total.display_with_code()
                ));
                return Ok(());
            }
            let import = store.add_bills(&bills, &ctx.audit()).await?;
            tracing::info!(
                added = import.added.len(),
                unchanged = import.unchanged,
                "bills imported"
            );
            if ctx.json {
                return output::json(&serde_json::json!({
                    "added": import.added.len(), "unchanged": import.unchanged, "total": total.amount_string(), "currency": total.currency(),
                }));
            }
            say(format!(
                "imported {} bill(s), {} already present; file total {}",
                import.added.len(),
                import.unchanged,
                total.display_with_code()
            ));
            Ok(())
        }
        BillCommand::List { account: acct } => {
            let store = ctx.store().await?;
            let member_id = match acct {
                Some(a) => Some(store.member(&account(&a)?).await?.id),
                None => None,
            };
            let bills = store.list_bills(member_id).await?;
            if ctx.json {
                return output::json(&bills);
            }
            let mut t = Table::new(vec!["ID", "REFERENCE", "DUE", "AMOUNT", "PAID", "STATUS"]);
            for b in &bills {
                t.row(vec![
                    b.id.to_string(),
                    b.reference.clone(),
                    b.due_date.to_string(),
                    b.amount_due.display_with_code(),
                    b.amount_paid.amount_string(),
                    b.status.to_string(),
                ]);
            }
            say(t.render());
            Ok(())
        }
        BillCommand::Void { bill, reason } => {
            let id = parse_id(&bill, "bill")?;
            let reason =
                Reason::parse(&reason).map_err(|e| CliError::data(format!("--reason: {e}")))?;
            let store = ctx.store().await?;
            let change = store.void_bill(id, reason.as_str(), &ctx.audit()).await?;
            tracing::info!(bill_id = %id, "bill voided");
            print_change(ctx, &change, "voided")
        }
        BillCommand::Adjust {
            bill,
            amount,
            reason,
        } => {
            let id = parse_id(&bill, "bill")?;
            let amount = money(ctx, &amount, "--amount")?;
            if amount.minor() < 0 {
                return Err(CliError::data("--amount: a bill's amount is 0.00 or more"));
            }
            let reason = Reason::parse(&reason).map_err(|e| {
                CliError::data(format!("--reason: say why the amount changes; {e}"))
            })?;
            let store = ctx.store().await?;
            let change = store
                .adjust_bill(id, amount, reason.as_str(), &ctx.audit())
                .await?;
            tracing::info!(bill_id = %id, "bill adjusted");
            print_change(ctx, &change, "adjusted")
        }
        BillCommand::Pay {
            bill,
            amount,
            external,
        } => {
            let id = parse_id(&bill, "bill")?;
            let amount = money(ctx, &amount, "--amount")?;
            if !amount.is_positive() {
                return Err(CliError::data("--amount: a payment is more than 0.00"));
            }
            let external =
                reference(&external).map_err(|e| CliError::data(format!("--external: {e}")))?;
            let store = ctx.store().await?;
            let change = store
                .pay_bill_external(id, amount, external.as_str(), &ctx.audit())
                .await?;
            tracing::info!(bill_id = %id, "external payment recorded");
            print_change(ctx, &change, "recorded a payment on")
        }
    }
}
