//! The command line, as clap types. Card numbers and security codes are never arguments: `card
//! add` reads them from standard input or a no-echo prompt.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "autopay",
    version,
    about = "Charges members' automatic bill payments on schedule and emails them about it",
    after_help = "Exit codes: 0 ok, 64 usage, 65 bad data, 66 no such member/card/bill/schedule/payment, 69 a service unavailable, 70 internal error, 73 a backup file that exists, 78 bad configuration, database schema or an unreconciled restore, 130 stopped by a second signal."
)]
pub struct Cli {
    /// Settings file (TOML) layered over the embedded defaults.
    #[arg(long, global = true, env = "AUTOPAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: plan and charge due payments until stopped.
    Run(RunArgs),
    /// Stop or restart charging on every host (an emergency stop).
    #[command(subcommand)]
    Charging(ChargingCommand),
    /// Create or upgrade the database schema and record the installation id.
    Migrate,
    /// Print the effective settings (secrets redacted), or every problem in them.
    CheckConfig,
    /// Counts by state, and whether charging or mail is paused.
    Status,
    /// Copy the SQLite database online to FILE, marked "reconcile required".
    ///
    /// The copy is consistent while the daemon runs (SQLite's VACUUM INTO) and readable only by
    /// this user. A database restored from it is refused by `autopay run` until `autopay
    /// reconcile` has run. PostgreSQL is backed up with pg_dump instead (docs/operations.md).
    Backup {
        /// The new file to write; it must not exist.
        file: PathBuf,
    },
    /// Mark this database as restored from a backup: `run` refuses it until `reconcile`.
    ///
    /// For a PostgreSQL database restored with pg_restore (a SQLite copy from `autopay backup`
    /// carries the mark already). The mark records the newest time the database holds.
    RestoreMark,
    /// Teach a restored database what the processor did after its backup.
    ///
    /// Every attempt of this installation the processor made since --since is recorded onto its
    /// payment (approved: the payment succeeds and the member gets the receipt; declined: the
    /// payment waits for an operator). Charges that fit no payment become findings, shown by
    /// `status` until acknowledged. Then `run` accepts the database.
    Reconcile(ReconcileArgs),
    /// Members: billing accounts.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Cards: stored as processor tokens, never as numbers.
    #[command(subcommand)]
    Card(CardCommand),
    /// Bills: what members owe.
    #[command(subcommand)]
    Bill(BillCommand),
    /// Schedules: one-time and recurring automatic payments.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Payments: one per occurrence of a schedule.
    #[command(subcommand)]
    Payment(PaymentCommand),
    /// Measure charges per second on throwaway databases (never the configured one).
    ///
    /// For each backend, autopay bench creates a database of its own: a SQLite file in a fresh
    /// folder under the system's temporary directory, and a PostgreSQL database named
    /// autopay_bench_<uuid> created through --postgres-url. It loads N schedules whose first
    /// payment is due now, charges them all with the zero-latency simulated processor (ledger in
    /// memory), checks that every payment succeeded, and deletes the file or drops the database
    /// afterwards, also when the run fails or is interrupted with Ctrl-C.
    ///
    /// It never opens database.url from the settings and never writes into an existing
    /// database. It uses the settings' engine values (daemon.batch_size, daemon.lease,
    /// database.max_connections, ...) except that processor.max_requests_per_second is raised to
    /// 100000 so the rate limit does not cap the figures. It logs warnings and errors only, so
    /// that per-payment log lines neither flood the terminal nor count in the figures. Peak
    /// memory is the process-wide high-water mark (VmHWM) read after each backend.
    Bench(BenchArgs),
}

/// The databases `autopay bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    Sqlite,
    Postgres,
    Both,
}

/// What `autopay bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchScenario {
    /// Charges per second with a processor that answers at once, against PostgreSQL's
    /// ceiling measured by pgbench in the same run.
    Charge,
    /// A processor that takes 300 ms, then one with a median of 300 ms and a 99th percentile
    /// of 2 s, at a concurrency of 256 (or --concurrency) and at most 500 requests a second.
    Slow,
    /// The 1st of the month: --payments monthly schedules due at once, loaded in bulk, planned
    /// and charged, every receipt queued, with the ledger in a database of its own so the
    /// memory figure is autopay's.
    MonthStart,
    /// --payments receipts delivered to a local SMTP server (aiosmtpd, started for the run)
    /// over email.smtp.pool_size connections, against a plain one-connection client's rate to
    /// the same server.
    Mail,
}

/// Where `autopay bench` keeps the simulated processor's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchLedger {
    /// In memory: the fastest, for charges per second (it grows with every charge).
    Memory,
    /// In a SQLite file of its own: for memory figures, like the daemon's ledger.
    Database,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Where the simulated processor keeps its ledger during the run (default: memory, and a
    /// database for month-start, whose figures include memory).
    #[arg(long, value_enum)]
    pub ledger: Option<BenchLedger>,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = BenchScenario::Charge)]
    pub scenario: BenchScenario,
    /// How long pgbench measures PostgreSQL's ceiling after the charge scenario (0: not at all).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=600))]
    pub ceiling_seconds: u32,
    /// Schedules to load and charge on each backend.
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub payments: u32,
    /// Which databases to measure.
    #[arg(long, value_enum, default_value_t = BenchBackend::Both)]
    pub backend: BenchBackend,
    /// PostgreSQL admin connection, used only to CREATE the throwaway database and DROP it
    /// afterwards; its user needs CREATEDB.
    #[arg(
        long,
        value_name = "URL",
        env = "TEST_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub postgres_url: String,
    /// Payments charged at once (default daemon.concurrency; claims are also capped by
    /// daemon.batch_size).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: Option<u32>,
    /// Instead of charging, run the daemon idle for SECONDS over --payments schedules none of
    /// which is due, and report the CPU time it used.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle: Option<u64>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Do all work due now, print a summary, and exit.
    #[arg(long)]
    pub drain: bool,
    /// With --drain: show what would be charged now, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seed sample members, cards, bills and schedules into the embedded SQLite default first.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Debug, Subcommand)]
pub enum ChargingCommand {
    /// Stop all charging on every host until `charging resume`.
    Pause {
        #[arg(long, default_value = "paused by operator", value_name = "TEXT")]
        reason: String,
    },
    /// Lift a pause (an operator's or the circuit breaker's).
    Resume,
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Add a member.
    Add {
        #[arg(long, value_name = "N")]
        account: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_name = "E")]
        email: String,
        /// individual-family or employer-group.
        #[arg(long = "type", value_name = "TYPE")]
        account_type: String,
        /// IANA time zone (default: this host's zone).
        #[arg(long, value_name = "TZ")]
        time_zone: Option<String>,
    },
    /// List members.
    List {
        /// Only members whose email address bounces (the mail server refused it for good);
        /// `member update --email` with a working address clears the flag.
        #[arg(long)]
        bouncing: bool,
    },
    /// Show one member with cards, schedules and credits.
    Show {
        #[arg(value_name = "ACCOUNT")]
        account: String,
    },
    /// Change a member's contact details, zone or reminder preference.
    Update {
        #[arg(value_name = "ACCOUNT")]
        account: String,
        #[arg(long, value_name = "E")]
        email: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_name = "TZ")]
        time_zone: Option<String>,
        /// on or off: upcoming-charge reminders and card-expiry notices.
        #[arg(long, value_name = "on|off")]
        reminders: Option<String>,
    },
    /// Close a member's account, cancelling every schedule.
    Close {
        #[arg(value_name = "ACCOUNT")]
        account: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CardCommand {
    /// Add a card: the number and security code from standard input (two lines) or a no-echo
    /// prompt, or a token the member portal got from the processor.
    Add {
        #[arg(long, value_name = "N")]
        account: String,
        /// Expiry, MM/YYYY (with a number from standard input).
        #[arg(
            long,
            value_name = "MM/YYYY",
            conflicts_with = "token",
            required_unless_present = "token"
        )]
        exp: Option<String>,
        /// A processor token instead of a number.
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// The version of the terms the member agreed to when they asked for the card to be
        /// kept for automatic payments, recorded with the card's consent.
        #[arg(long, value_name = "V")]
        terms_version: Option<String>,
    },
    /// List a member's cards.
    List {
        #[arg(long, value_name = "N")]
        account: String,
    },
    /// Remove a card no live schedule uses.
    Remove {
        #[arg(value_name = "CARD_ID")]
        card: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BillCommand {
    /// Add one bill.
    Add {
        #[arg(long, value_name = "N")]
        account: String,
        #[arg(long, value_name = "125.00", allow_negative_numbers = true)]
        amount: String,
        #[arg(long, value_name = "YYYY-MM-DD")]
        due: String,
        #[arg(long, value_name = "REF")]
        reference: String,
    },
    /// Import bills from CSV (account,reference,amount,due_date): all rows or none.
    Import {
        #[arg(value_name = "FILE.csv")]
        file: PathBuf,
        /// Check the file and print the count and total without storing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// List bills.
    List {
        #[arg(long, value_name = "N")]
        account: Option<String>,
    },
    /// Void a bill; what was paid on it becomes a credit.
    Void {
        #[arg(value_name = "ID")]
        bill: String,
        #[arg(long, default_value = "voided by operator")]
        reason: String,
    },
    /// Set a new amount due; below what was paid, the difference becomes a credit.
    Adjust {
        #[arg(value_name = "ID")]
        bill: String,
        #[arg(long, value_name = "100.00", allow_negative_numbers = true)]
        amount: String,
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// Record a payment made outside autopay (phone, portal).
    Pay {
        #[arg(value_name = "ID")]
        bill: String,
        #[arg(long, value_name = "50.00", allow_negative_numbers = true)]
        amount: String,
        /// The outside payment's reference.
        #[arg(long, value_name = "REF")]
        external: String,
    },
}

/// When and how often a schedule charges.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct RuleArgs {
    /// One payment, on --on.
    #[arg(long, requires = "on", group = "rule")]
    pub once: bool,
    /// The one-time payment's date, YYYY-MM-DD, or now.
    #[arg(long, value_name = "YYYY-MM-DD|now")]
    pub on: Option<String>,
    /// Every month, on --day.
    #[arg(long, requires = "day", group = "rule")]
    pub monthly: bool,
    /// Day of the month, 1 to 31 (the month's last day when it is shorter).
    #[arg(long, value_name = "1..31")]
    pub day: Option<u8>,
    /// Every N --unit.
    #[arg(long, value_name = "N", requires = "unit", group = "rule")]
    pub every: Option<u32>,
    /// days, weeks or months.
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// Time of day in the schedule's zone, HH:MM (default payments.default_time).
    #[arg(long, value_name = "HH:MM")]
    pub at: Option<String>,
    /// First date the rule may fall on (default today).
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub start: Option<String>,
    /// One payment before the rule's first date: now or a date.
    #[arg(long, value_name = "now|YYYY-MM-DD")]
    pub first_payment: Option<String>,
    /// Last date a payment may fall on.
    #[arg(long, value_name = "YYYY-MM-DD", conflicts_with = "count")]
    pub end: Option<String>,
    /// Number of payments (a first payment not counted).
    #[arg(long, value_name = "N")]
    pub count: Option<u32>,
    /// Move dates on weekends and holidays to the next business day (monthly rules).
    #[arg(long)]
    pub business_days: bool,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Set up automatic payments, recording the member's authorization.
    Add {
        #[arg(long, value_name = "N")]
        account: String,
        #[arg(long, value_name = "CARD_ID")]
        card: String,
        #[command(flatten)]
        rule: RuleArgs,
        /// A fixed amount each time.
        #[arg(
            long,
            value_name = "125.00",
            conflicts_with = "balance",
            required_unless_present = "balance"
        )]
        amount: Option<String>,
        /// The statement balance: every unpaid bill.
        #[arg(long)]
        balance: bool,
        /// IANA zone (default the member's).
        #[arg(long, value_name = "TZ")]
        time_zone: Option<String>,
        /// The version of the terms the member agreed to.
        #[arg(long, default_value = "2026-01", value_name = "V")]
        terms_version: String,
    },
    /// Change a schedule's card, amount, day, time or zone; unclaimed payments are re-planned.
    Update {
        #[arg(value_name = "ID")]
        schedule: String,
        #[arg(long, value_name = "CARD_ID")]
        card: Option<String>,
        #[arg(long, value_name = "125.00", conflicts_with = "balance")]
        amount: Option<String>,
        #[arg(long)]
        balance: bool,
        #[arg(long, value_name = "1..31")]
        day: Option<u8>,
        #[arg(long, value_name = "HH:MM")]
        at: Option<String>,
        #[arg(long, value_name = "TZ")]
        time_zone: Option<String>,
    },
    /// List the next payment dates of a rule, without a database.
    Preview {
        #[command(flatten)]
        rule: RuleArgs,
        #[arg(long, value_name = "TZ", default_value = "UTC")]
        time_zone: String,
        #[arg(long, default_value_t = 12, value_name = "N")]
        next: usize,
    },
    /// List schedules.
    List {
        #[arg(long, value_name = "N")]
        account: Option<String>,
    },
    /// Show a schedule and its next payment dates.
    Show {
        #[arg(value_name = "ID")]
        schedule: String,
        #[arg(long, default_value_t = 6, value_name = "N")]
        next: usize,
    },
    /// Pause: nothing is charged until resumed.
    Pause {
        #[arg(value_name = "ID")]
        schedule: String,
    },
    /// Resume a paused or suspended schedule from now on (missed dates are not charged).
    Resume {
        #[arg(value_name = "ID")]
        schedule: String,
    },
    /// Cancel for good.
    Cancel {
        #[arg(value_name = "ID")]
        schedule: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PaymentCommand {
    /// List payments.
    List {
        #[arg(long, value_name = "N")]
        account: Option<String>,
        /// scheduled, processing, retry_wait, unknown, succeeded, failed, skipped, cancelled,
        /// needs_review or missed.
        #[arg(long, value_name = "S")]
        state: Option<String>,
    },
    /// Show one payment with its history.
    Show {
        #[arg(value_name = "ID")]
        payment: String,
    },
    /// Charge a failed, missed or needs_review payment again, with a new idempotency key.
    Retry {
        #[arg(value_name = "ID")]
        payment: String,
        /// Retry even after a hard decline.
        #[arg(long)]
        force: bool,
    },
    /// Settle an unknown or needs_review payment after asking the processor.
    Resolve {
        #[arg(value_name = "ID")]
        payment: String,
        /// succeeded, failed or cancelled.
        #[arg(long = "as", value_name = "STATE")]
        resolution: String,
        /// The processor's reference for the charge (or the ticket that decided it).
        #[arg(long, value_name = "R")]
        reference: String,
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// What would be charged, per day, until a date; writes nothing.
    Forecast {
        #[arg(long, value_name = "YYYY-MM-DD")]
        until: String,
    },
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Read the processor's attempts from this time (YYYY-MM-DD, UTC midnight, or an RFC 3339
    /// time). Default, and the latest allowed: the backup's time less processor.key_retention
    /// and daemon.lease.
    #[arg(long, value_name = "DATE")]
    pub since: Option<String>,
    /// List every finding (acknowledged ones too) and change nothing.
    #[arg(long, conflicts_with_all = ["since", "acknowledge"])]
    pub findings: bool,
    /// Acknowledge the finding with this id (after refunding or recording the charge).
    #[arg(long, value_name = "ID", requires = "note", conflicts_with = "since")]
    pub acknowledge: Option<String>,
    /// What was done about the finding (kept with it).
    #[arg(long, value_name = "TEXT", requires = "acknowledge")]
    pub note: Option<String>,
}
