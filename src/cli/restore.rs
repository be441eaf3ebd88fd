//! `autopay backup`, `restore-mark` and `reconcile`: backups, and teaching a restored database
//! what the processor did after its backup was taken.

use std::path::Path;

use jiff::Timestamp;

use super::args::ReconcileArgs;
use super::output::{self, Table, say};
use super::{CliError, Context, exit, parse_id};
use crate::config::Backend;
use crate::daemon::{engine_config, outcome_policy};
use crate::domain::schedule::parse_date;
use crate::engine::{Engine, ReconcileError};

impl From<ReconcileError> for CliError {
    fn from(e: ReconcileError) -> CliError {
        match e {
            ReconcileError::Store(s) => s.into(),
            ReconcileError::Processor(_) => CliError::new(exit::UNAVAILABLE, e.to_string()),
            ReconcileError::Since(_) => CliError::usage(e.to_string()),
        }
    }
}

pub(super) async fn backup(ctx: &Context, file: &Path) -> Result<(), CliError> {
    if ctx.settings.database.url.backend() != Backend::Sqlite {
        return Err(CliError::usage(
            "autopay backup copies SQLite databases; back up PostgreSQL with pg_dump and, after restoring, run `autopay restore-mark` (docs/operations.md, Backups and restores)",
        ));
    }
    if file
        .parent()
        .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir())
    {
        return Err(CliError::new(
            exit::CANT_CREATE,
            format!(
                "the folder of {} does not exist; create it, or name a file in an existing folder",
                file.display()
            ),
        ));
    }
    if file.exists() {
        return Err(CliError::new(
            exit::CANT_CREATE,
            format!(
                "{} exists; name a new file (a backup never overwrites one)",
                file.display()
            ),
        ));
    }
    let store = ctx.store().await?;
    let at = ctx.now();
    store.backup_into(file, at).await?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    tracing::info!(bytes = size, "backup written");
    if ctx.json {
        return output::json(&serde_json::json!({
            "file": file.display().to_string(), "bytes": size, "reconcile_required_since": at,
        }));
    }
    say(format!(
        "backed up to {} ({size} bytes), marked \"reconcile required\" as of {at}: after restoring it, run `autopay reconcile` before `autopay run`",
        file.display()
    ));
    Ok(())
}

pub(super) async fn restore_mark(ctx: &Context) -> Result<(), CliError> {
    let store = ctx.store().await?;
    // The database is complete up to its newest record: nothing after that can be in it.
    let since = store.newest_attempt().await?.unwrap_or_else(|| ctx.now());
    store.set_reconcile_mark(Some(since), &ctx.audit()).await?;
    tracing::warn!(%since, "database marked as restored");
    if ctx.json {
        return output::json(&serde_json::json!({ "reconcile_required_since": since }));
    }
    say(format!(
        "marked as restored, complete up to {since}: `autopay run` refuses this database until `autopay reconcile` has run"
    ));
    Ok(())
}

/// `--since`: a date (UTC midnight) or an RFC 3339 time.
fn parse_since(text: &str) -> Result<Timestamp, CliError> {
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(t);
    }
    let date = parse_date(text).map_err(|e| {
        CliError::usage(format!(
            "--since: {e}; give a date like 2026-12-01 or a time like 2026-12-01T09:00:00Z"
        ))
    })?;
    date.to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp())
        .map_err(|e| CliError::usage(format!("--since: {e}")))
}

pub(super) async fn reconcile(ctx: &Context, args: ReconcileArgs) -> Result<(), CliError> {
    let store = ctx.store().await?;
    if args.findings {
        let findings = store.findings(false).await?;
        if ctx.json {
            return output::json(&findings);
        }
        let mut table = Table::new(vec![
            "id",
            "kind",
            "charged",
            "amount",
            "reference",
            "payment",
            "acknowledged",
        ]);
        for f in &findings {
            table.row(vec![
                f.id.to_string(),
                f.kind.clone(),
                f.charged_at.to_string(),
                f.amount.to_string(),
                f.reference.clone(),
                f.payment_id.map_or("-".into(), |p| p.to_string()),
                f.acknowledged_at.map_or("no".into(), |t| {
                    format!("{t} by {}", f.acknowledged_by.as_deref().unwrap_or("?"))
                }),
            ]);
        }
        say(table.render());
        for f in findings.iter().filter(|f| f.acknowledged_at.is_none()) {
            say(format!("{}: {}", f.id, f.explanation));
        }
        return Ok(());
    }
    if let (Some(id), Some(note)) = (&args.acknowledge, &args.note) {
        let id = parse_id(id, "finding")?;
        let note = super::billing::free_text(note, 500)
            .map_err(|e| CliError::data(format!("--note: {e}")))?;
        let finding = store.acknowledge_finding(id, &note, &ctx.audit()).await?;
        tracing::info!(finding_id = %id, "finding acknowledged");
        if ctx.json {
            return output::json(&finding);
        }
        say(format!("finding {id} acknowledged"));
        return Ok(());
    }
    let since = args.since.as_deref().map(parse_since).transpose()?;
    let engine = Engine::new(
        store.clone(),
        ctx.processor().await?,
        ctx.clock.clone(),
        engine_config(&ctx.settings),
        outcome_policy(&ctx.settings),
    );
    let report = engine.reconcile(since).await?;
    tracing::info!(
        listed = report.listed,
        recorded = report.recorded,
        findings = report.findings,
        "reconciled"
    );
    if ctx.json {
        return output::json(&report);
    }
    if report.nothing_to_do {
        say(
            "nothing to reconcile: this database is not marked as restored, and the processor made no charge for this installation that it does not know. If it was restored from a backup, run `autopay restore-mark` first",
        );
        return Ok(());
    }
    say(output::fields(&[
        (
            "read from",
            report.since.map_or("-".into(), |t| t.to_string()),
        ),
        (
            "processor attempts",
            format!("{} of this installation", report.listed),
        ),
        ("already known", report.known.to_string()),
        (
            "recorded",
            format!(
                "{} ({} payment(s) now succeeded, {} need review; {} occurrence(s) planned to hold them)",
                report.recorded, report.succeeded, report.needs_review, report.planned
            ),
        ),
        (
            "declines with no payment",
            format!("{} (no money moved)", report.ignored),
        ),
        ("findings", report.findings.to_string()),
    ]));
    if report.needs_review > 0 {
        say(
            "payments that need review: `autopay payment list --state needs_review`, then `autopay payment retry` or `resolve` each",
        );
    }
    let open = store.findings(true).await?;
    if !open.is_empty() {
        say(format!(
            "{} finding(s) wait for an operator: `autopay reconcile --findings`",
            open.len()
        ));
    }
    say("the database is reconciled: `autopay run` accepts it");
    Ok(())
}
