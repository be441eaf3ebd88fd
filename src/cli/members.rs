//! `autopay member ...` and `autopay card ...`.

use std::io::IsTerminal;

use jiff::tz::TimeZone;
use zeroize::Zeroizing;

use super::args::{CardCommand, MemberCommand};
use super::output::{self, Table, say};
use super::{CliError, Context, parse_id};
use crate::domain::card::{CardNumber, Expiry, SecurityCode};
use crate::domain::ids::MemberId;
use crate::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use crate::processor::{CardOwner, Processor, ProcessorError, Tokenized};
use crate::store::{Card, Consent, Member, MemberChange, NewCard, NewMember};

/// Whose card is saved: the member, with the processor's customer they already have.
pub(super) fn owner(member: &Member) -> CardOwner {
    CardOwner {
        member_id: member.id,
        customer: member.processor_customer_id.clone(),
    }
}

/// The card row for a token the processor issued, saved under `consent`.
pub(super) fn new_card(
    member_id: MemberId,
    processor: &dyn Processor,
    card: Tokenized,
    consent: Consent,
) -> NewCard {
    NewCard {
        member_id,
        processor: processor.name().to_string(),
        processor_token: card.token,
        brand: card.details.brand,
        last4: card.details.last4,
        expiry: card.details.expiry,
        fingerprint: card.fingerprint,
        customer: card.customer,
        processor_mode: processor.mode().map(str::to_string),
        consent,
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
            output::escape(value.trim())
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
        MemberCommand::List { bouncing } => {
            let store = ctx.store().await?;
            let mut members = store.list_members().await?;
            if bouncing {
                members.retain(|m| m.email_bouncing);
            }
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
                            "--reminders: '{}' is not on or off",
                            output::escape(other)
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

/// The most bytes read from standard input for the card number and security code: plenty for
/// 19 digits with separators and a 4-digit code, and fixed, so that the buffer never grows (a
/// buffer that grows leaves an unwiped copy of what it held behind in freed memory).
const CARD_INPUT_MAX: usize = 256;

/// Reads the card number and security code: two lines from standard input, or a no-echo
/// prompt on a terminal. Neither ever becomes an argument, a log line or an error message;
/// every buffer that held them is wiped when dropped, and core dumps are off from here on.
fn read_card_secrets(
    today: jiff::civil::Date,
    expiry: Expiry,
) -> Result<(CardNumber, SecurityCode), CliError> {
    expiry
        .check_not_expired(today)
        .map_err(|e| CliError::data(format!("--exp: {e}")))?;
    forbid_core_dumps();
    if std::io::stdin().is_terminal() {
        let number = Zeroizing::new(
            rpassword::prompt_password("Card number (not shown): ").map_err(|e| {
                CliError::usage(format!(
                    "cannot read the card number from the terminal: {e}"
                ))
            })?,
        );
        let code = Zeroizing::new(
            rpassword::prompt_password("Security code (not shown): ").map_err(|e| {
                CliError::usage(format!(
                    "cannot read the security code from the terminal: {e}"
                ))
            })?,
        );
        return parse_card_secrets(&number, &code);
    }
    let input = read_secret_input(0)?;
    let text = std::str::from_utf8(input.bytes()).map_err(|_| {
        CliError::data("card number: standard input is not text; give two lines, the card number then the security code")
    })?;
    let mut lines = text.lines();
    let number = lines.next().ok_or_else(|| {
        CliError::usage("standard input ended before the card number; give two lines, the card number then the security code")
    })?;
    let code = lines.next().ok_or_else(|| {
        CliError::usage("standard input ended before the security code; give two lines, the card number then the security code")
    })?;
    parse_card_secrets(number, code)
}

fn parse_card_secrets(number: &str, code: &str) -> Result<(CardNumber, SecurityCode), CliError> {
    let number =
        CardNumber::parse(number).map_err(|e| CliError::data(format!("card number: {e}")))?;
    let code = SecurityCode::parse(code.trim(), number.brand())
        .map_err(|e| CliError::data(format!("security code: {e}")))?;
    Ok((number, code))
}

/// What was read for the card: a fixed buffer, wiped when dropped.
struct SecretInput {
    buf: Zeroizing<[u8; CARD_INPUT_MAX]>,
    len: usize,
}

impl SecretInput {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Reads two lines from a file descriptor straight into a fixed buffer, without the
/// standard library's buffered stdin (whose buffer would keep a copy nobody wipes).
fn read_secret_input(fd: std::os::fd::RawFd) -> Result<SecretInput, CliError> {
    let mut input = SecretInput {
        buf: Zeroizing::new([0u8; CARD_INPUT_MAX]),
        len: 0,
    };
    while input.bytes().iter().filter(|b| **b == b'\n').count() < 2 {
        let free = CARD_INPUT_MAX - input.len;
        if free == 0 {
            return Err(CliError::usage(format!(
                "standard input holds more than {CARD_INPUT_MAX} bytes before the security code's line ends; give two lines, the card number then the security code"
            )));
        }
        // One byte at a time, so that nothing past the second line is taken from the input.
        // SAFETY: `read` writes at most one byte into the unused tail of our own buffer, which
        // is `free` (at least one) bytes long.
        let n = unsafe { libc::read(fd, input.buf[input.len..].as_mut_ptr().cast(), 1) };
        match usize::try_from(n) {
            Ok(0) => break,
            Ok(n) => input.len += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(CliError::usage(format!(
                    "cannot read the card from standard input: {e}"
                )));
            }
        }
    }
    Ok(input)
}

/// Turns core dumps off for the rest of this process (a short command): a dump taken while a
/// card number is in memory would write it to disk. Both the core size limit and the dumpable
/// flag, since a core pattern piping to a helper ignores the limit.
fn forbid_core_dumps() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    let limited = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers and only changes this process.
    let undumpable = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if limited != 0 || undumpable != 0 {
        tracing::warn!("could not turn core dumps off while the card is read");
    }
}

/// A processor's refusal of a card: the card or token (65), the processor unreachable (69), or
/// its settings (78).
fn token_error(e: &ProcessorError) -> CliError {
    match e {
        ProcessorError::Rejected(m) => CliError::data(format!("--token: {m}")),
        ProcessorError::Unavailable(m) => CliError::new(super::exit::UNAVAILABLE, m.clone()),
        ProcessorError::Config(m) => CliError::new(super::exit::CONFIG, m.clone()),
    }
}

pub(super) async fn card(ctx: &Context, command: CardCommand) -> Result<(), CliError> {
    match command {
        CardCommand::Add {
            account: acct,
            exp,
            token,
            terms_version,
        } => {
            let acct = account(&acct)?;
            let store = ctx.store().await?;
            let member = store.member(&acct).await?;
            let tz = TimeZone::get(&member.time_zone).unwrap_or(TimeZone::UTC);
            let today = ctx.now().to_zoned_datetime(tz).date();
            let processor = ctx.processor().await?;
            let owner = owner(&member);
            let tokenized = match (exp, token) {
                (_, Some(token)) => {
                    let token = token.trim().to_string();
                    // Before the token is looked up, logged or stored: a card number pasted here
                    // is refused without being repeated, and so is anything of another shape.
                    processor
                        .check_token(&token)
                        .map_err(|e| CliError::data(format!("--token: {e}")))?;
                    let adopted = processor
                        .adopt(&owner, &token)
                        .await
                        .map_err(|e| token_error(&e))?;
                    adopted
                        .details
                        .expiry
                        .check_not_expired(today)
                        .map_err(|e| CliError::data(format!("--token: {e}")))?;
                    adopted
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
                    processor
                        .tokenize(&owner, &number, &code, expiry)
                        .await
                        .map_err(|e| match e {
                            ProcessorError::Rejected(_) => {
                                CliError::data(format!("the processor refused the card: {e}"))
                            }
                            other => token_error(&other),
                        })?
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
                .check(tokenized.details.brand)
                .map_err(|e| CliError::data(e.to_string()))?;
            let consent = Consent {
                at: ctx.now(),
                via: "cli".into(),
                terms_version: terms_version
                    .map(|v| super::billing::free_text(&v, 40))
                    .transpose()
                    .map_err(|e| CliError::data(format!("--terms-version: {e}")))?,
            };
            let new = new_card(member.id, processor.as_ref(), tokenized, consent);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn read_from(input: &[u8]) -> Result<SecretInput, CliError> {
        let (reader, mut writer) = std::io::pipe().unwrap();
        writer.write_all(input).unwrap();
        drop(writer);
        read_secret_input(std::os::fd::AsRawFd::as_raw_fd(&reader))
    }

    #[test]
    fn card_input_is_read_into_a_fixed_buffer_of_two_lines_at_most() {
        let input = read_from(b"4242424242424242\n123\nextra\n").unwrap();
        assert_eq!(input.bytes(), b"4242424242424242\n123\n");
        let input = read_from(b"4242424242424242\r\n123").unwrap();
        let text = std::str::from_utf8(input.bytes()).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            ["4242424242424242", "123"]
        );
        let err = read_from(&[b'4'; CARD_INPUT_MAX + 10]).err().unwrap();
        assert_eq!(err.code, crate::cli::exit::USAGE);
        assert!(!err.message.contains("4444"), "{}", err.message);
    }

    #[test]
    fn reading_a_card_turns_core_dumps_off() {
        forbid_core_dumps();
        let mut limit = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) }, 0);
        assert_eq!((limit.rlim_cur, limit.rlim_max), (0, 0));
        // SAFETY: PR_GET_DUMPABLE takes no pointers.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
}
