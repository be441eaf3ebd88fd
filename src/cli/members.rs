//! `autopay member ...` and `autopay card ...`.

use std::io::{BufRead, IsTerminal};

use jiff::tz::TimeZone;

use super::args::{CardCommand, MemberCommand};
use super::output::{self, Table, say};
use super::{CliError, Context, parse_id};
use crate::domain::card::{CardNumber, Expiry, SecurityCode};
use crate::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use crate::processor::CardDetails;
use crate::store::{Card, MemberChange, NewCard, NewMember};

/// The card row for a token the processor issued.
pub(super) fn new_card(
    member_id: uuid::Uuid,
    processor: &str,
    token: String,
    details: CardDetails,
) -> NewCard {
    NewCard {
        member_id,
        processor: processor.to_string(),
        processor_token: token,
        brand: details.brand,
        last4: details.last4,
        expiry: details.expiry,
    }
}

pub(super) fn account(value: &str) -> Result<AccountNumber, CliError> {
    AccountNumber::parse(value).map_err(|e| CliError::data(format!("--account: {e}")))
}

/// Checks an IANA zone name and returns its canonical spelling.
pub(super) fn time_zone(value: &str) -> Result<String, CliError> {
    let tz = TimeZone::get(value.trim()).map_err(|_| {
        CliError::data(format!(
            "--time-zone: unknown time zone '{}'; use an IANA name such as America/New_York",
            value.trim()
        ))
    })?;
    Ok(tz.iana_name().unwrap_or(value.trim()).to_string())
}

fn host_time_zone() -> String {
    TimeZone::system()
        .iana_name()
        .map(str::to_string)
        .unwrap_or_else(|| "UTC".to_string())
}

pub(super) async fn member(ctx: &Context, command: MemberCommand) -> Result<(), CliError> {
    match command {
        MemberCommand::Add {
            account: acct,
            name,
            email,
            account_type,
            time_zone: tz,
        } => {
            let new = NewMember {
                account_number: account(&acct)?,
                account_type: account_type
                    .parse::<AccountType>()
                    .map_err(|e| CliError::data(format!("--type: {e}")))?,
                name: MemberName::parse(&name)
                    .map_err(|e| CliError::data(format!("--name: {e}")))?,
                email: EmailAddress::parse(&email)
                    .map_err(|e| CliError::data(format!("--email: {e}")))?,
                time_zone: match tz {
                    Some(tz) => time_zone(&tz)?,
                    None => host_time_zone(),
                },
            };
            let store = ctx.store().await?;
            let member = store.add_member(&new, &ctx.audit()).await?;
            tracing::info!(member_id = %member.id, "member added");
            if ctx.json {
                return output::json(&member);
            }
            say(member.id.to_string());
            Ok(())
        }
        MemberCommand::List => {
            let store = ctx.store().await?;
            let members = store.list_members().await?;
            if ctx.json {
                return output::json(&members);
            }
            let mut t = Table::new(vec!["ACCOUNT", "TYPE", "NAME", "EMAIL", "ZONE", "STATUS"]);
            for m in &members {
                t.row(vec![
                    m.account_number.to_string(),
                    m.account_type.to_string(),
                    m.name.to_string(),
                    format!(
                        "{}{}",
                        m.email,
                        if m.email_bouncing { " (bouncing)" } else { "" }
                    ),
                    m.time_zone.clone(),
                    m.status.to_string(),
                ]);
            }
            say(t.render());
            Ok(())
        }
        MemberCommand::Show { account: acct } => {
            let store = ctx.store().await?;
            let member = store.member(&account(&acct)?).await?;
            let cards = store.list_cards(member.id).await?;
            let schedules = store.list_schedules(Some(member.id)).await?;
            let credits = store.list_credits(member.id).await?;
            if ctx.json {
                return output::json(&serde_json::json!({
                    "member": member, "cards": cards, "schedules": schedules, "credits": credits,
                }));
            }
            let credit: i64 = credits.iter().map(|c| c.remaining.minor()).sum();
            say(output::fields(&[
                ("id", member.id.to_string()),
                ("account", member.account_number.to_string()),
                ("type", member.account_type.to_string()),
                ("name", member.name.to_string()),
                ("email", member.email.to_string()),
                (
                    "email bouncing",
                    if member.email_bouncing {
                        "YES: update the address".into()
                    } else {
                        "no".into()
                    },
                ),
                ("time zone", member.time_zone.clone()),
                (
                    "reminders",
                    if member.reminders {
                        "on".into()
                    } else {
                        "off".into()
                    },
                ),
                ("status", member.status.to_string()),
                (
                    "cards",
                    cards
                        .iter()
                        .filter(|c| c.status.as_str() == "active")
                        .map(Card::label)
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                (
                    "schedules",
                    schedules
                        .iter()
                        .map(|s| format!("{} ({})", s.id, s.status))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                (
                    "credit",
                    crate::domain::money::Money::from_minor(credit, ctx.settings.payments.currency)
                        .display_with_code(),
                ),
                ("since", member.created_at.to_string()),
            ]));
            Ok(())
        }
        MemberCommand::Update {
            account: acct,
            email,
            name,
            time_zone: tz,
            reminders,
        } => {
            let change = MemberChange {
                name: name
                    .map(|n| {
                        MemberName::parse(&n).map_err(|e| CliError::data(format!("--name: {e}")))
                    })
                    .transpose()?,
                email: email
                    .map(|e| {
                        EmailAddress::parse(&e).map_err(|e| CliError::data(format!("--email: {e}")))
                    })
                    .transpose()?,
                time_zone: tz.map(|tz| time_zone(&tz)).transpose()?,
                reminders: reminders
                    .map(|r| match r.trim() {
                        "on" => Ok(true),
                        "off" => Ok(false),
                        other => Err(CliError::usage(format!(
                            "--reminders: '{other}' is not on or off"
                        ))),
                    })
                    .transpose()?,
            };
            if change.name.is_none()
                && change.email.is_none()
                && change.time_zone.is_none()
                && change.reminders.is_none()
            {
                return Err(CliError::usage(
                    "nothing to change; give --email, --name, --time-zone or --reminders",
                ));
            }
            let store = ctx.store().await?;
            let member = store
                .update_member(&account(&acct)?, &change, &ctx.audit())
                .await?;
            tracing::info!(member_id = %member.id, "member updated");
            if ctx.json {
                return output::json(&member);
            }
            say(format!("updated member {}", member.id));
            if change.time_zone.is_some() {
                say(
                    "existing schedules keep their own zone; change one with `autopay schedule update ID --time-zone TZ`",
                );
            }
            Ok(())
        }
        MemberCommand::Close { account: acct } => {
            let store = ctx.store().await?;
            let closed = store.close_member(&account(&acct)?, &ctx.audit()).await?;
            tracing::info!(member_id = %closed.member.id, schedules = closed.cancelled_schedules.len(), "member closed");
            if ctx.json {
                return output::json(&closed);
            }
            say(format!(
                "closed member {}; cancelled {} schedule(s) and {} pending payment(s)",
                closed.member.id,
                closed.cancelled_schedules.len(),
                closed.cancelled_payments
            ));
            Ok(())
        }
    }
}

/// Reads the card number and security code: two lines from standard input, or a no-echo
/// prompt on a terminal. Neither ever becomes an argument, a log line or an error message.
fn read_card_secrets(
    today: jiff::civil::Date,
    expiry: Expiry,
) -> Result<(CardNumber, SecurityCode), CliError> {
    expiry
        .check_not_expired(today)
        .map_err(|e| CliError::data(format!("--exp: {e}")))?;
    let stdin = std::io::stdin();
    let (number, code) = if stdin.is_terminal() {
        let number = rpassword::prompt_password("Card number (not shown): ").map_err(|e| {
            CliError::usage(format!(
                "cannot read the card number from the terminal: {e}"
            ))
        })?;
        let code = rpassword::prompt_password("Security code (not shown): ").map_err(|e| {
            CliError::usage(format!(
                "cannot read the security code from the terminal: {e}"
            ))
        })?;
        (number, code)
    } else {
        let mut lines = stdin.lock().lines();
        let mut next = |what: &str| -> Result<String, CliError> {
            match lines.next() {
                Some(Ok(line)) => Ok(line),
                Some(Err(e)) => Err(CliError::usage(format!(
                    "cannot read the {what} from standard input: {e}"
                ))),
                None => Err(CliError::usage(format!(
                    "standard input ended before the {what}; give two lines, the card number then the security code"
                ))),
            }
        };
        let number = next("card number")?;
        let code = next("security code")?;
        (number, code)
    };
    let number =
        CardNumber::parse(&number).map_err(|e| CliError::data(format!("card number: {e}")))?;
    let code = SecurityCode::parse(code.trim(), number.brand())
        .map_err(|e| CliError::data(format!("security code: {e}")))?;
    Ok((number, code))
}

pub(super) async fn card(ctx: &Context, command: CardCommand) -> Result<(), CliError> {
    match command {
        CardCommand::Add {
            account: acct,
            exp,
            token,
        } => {
            let acct = account(&acct)?;
            let store = ctx.store().await?;
            let member = store.member(&acct).await?;
            let tz = TimeZone::get(&member.time_zone).unwrap_or(TimeZone::UTC);
            let today = ctx.now().to_zoned_datetime(tz).date();
            let processor = ctx.processor().await?;
            let (token, details) = match (exp, token) {
                (_, Some(token)) => {
                    let token = token.trim().to_string();
                    // Before the token is looked up, logged or stored: a card number pasted here
                    // is refused without being repeated, and so is anything of another shape.
                    processor
                        .check_token(&token)
                        .map_err(|e| CliError::data(format!("--token: {e}")))?;
                    let details = processor
                        .card_details(&token)
                        .await
                        .map_err(|e| CliError::data(format!("--token: {e}")))?;
                    details
                        .expiry
                        .check_not_expired(today)
                        .map_err(|e| CliError::data(format!("--token: {e}")))?;
                    (token, details)
                }
                (Some(exp), None) => {
                    let expiry =
                        Expiry::parse(&exp).map_err(|e| CliError::data(format!("--exp: {e}")))?;
                    let (number, code) = read_card_secrets(today, expiry)?;
                    ctx.settings
                        .payments
                        .accepted_brands
                        .check(number.brand())
                        .map_err(|e| CliError::data(e.to_string()))?;
                    let tokenized =
                        processor
                            .tokenize(&number, &code, expiry)
                            .await
                            .map_err(|e| {
                                CliError::data(format!("the processor refused the card: {e}"))
                            })?;
                    (tokenized.token, tokenized.details)
                }
                (None, None) => {
                    return Err(CliError::usage(
                        "give --exp MM/YYYY (number and code on standard input) or --token TOKEN",
                    ));
                }
            };
            ctx.settings
                .payments
                .accepted_brands
                .check(details.brand)
                .map_err(|e| CliError::data(e.to_string()))?;
            let new = new_card(member.id, processor.name(), token, details);
            let card = store.add_card(&new, &ctx.audit()).await?;
            tracing::info!(member_id = %member.id, card_id = %card.id, "card added");
            if ctx.json {
                return output::json(&serde_json::json!({
                    "id": card.id, "brand": card.brand, "last4": card.last4,
                    "exp_month": card.exp_month, "exp_year": card.exp_year,
                }));
            }
            say(card.id.to_string());
            Ok(())
        }
        CardCommand::List { account: acct } => {
            let store = ctx.store().await?;
            let member = store.member(&account(&acct)?).await?;
            let cards = store.list_cards(member.id).await?;
            if ctx.json {
                return output::json(&cards);
            }
            let mut t = Table::new(vec!["ID", "CARD", "EXPIRES", "STATUS"]);
            for c in &cards {
                t.row(vec![
                    c.id.to_string(),
                    c.label(),
                    format!("{:02}/{}", c.exp_month, c.exp_year),
                    match &c.status_reason {
                        Some(r) if c.status.as_str() != "active" => format!("{} ({r})", c.status),
                        _ => c.status.to_string(),
                    },
                ]);
            }
            say(t.render());
            Ok(())
        }
        CardCommand::Remove { card } => {
            let id = parse_id(&card, "card")?;
            let store = ctx.store().await?;
            let removed = store.remove_card(id, &ctx.audit()).await?;
            tracing::info!(card_id = %removed.id, "card removed");
            if ctx.json {
                return output::json(&removed);
            }
            say(format!("removed card {} ({})", removed.id, removed.label()));
            Ok(())
        }
    }
}
