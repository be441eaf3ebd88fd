//! A real SMTP server for the email tests: `tests/smtp/server.py` (aiosmtpd) run by `python3`.
//!
//! [`SmtpPeer::start`] makes a temporary folder, writes a test CA and a leaf certificate for
//! `localhost` and `127.0.0.1` into it with the `openssl` CLI, starts the server on a free port
//! of 127.0.0.1 and waits for its `READY <port>` line. Every accepted message lands in
//! `maildir` as `<n>.eml` (the bytes received) and `<n>.json` (the envelope, and whether the
//! session was TLS and authenticated); [`SmtpPeer::received`] reads them back in order.
//!
//! Recipients script the server's answer at RCPT (see `tests/smtp/server.py`):
//! `tempfail-N+tag@…` gets `451 4.3.0` for its first N attempts, `reject+tag@…` gets
//! `550 5.1.1`, `relaydenied@…` gets `554 5.7.1 relay access denied`, `policy@…` gets
//! `550 5.7.1`; a message to `spam@…` gets `554 5.7.1` at the end of its data; a sender
//! `refusedsender@…` gets `553 5.7.1` at MAIL FROM; everything else is accepted.
//!
//! A missing `python3`, `openssl` or aiosmtpd fails the test with the fix: never a skip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the server has to say `READY`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long SIGTERM has before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server offers and demands.
#[derive(Debug, Clone, Default)]
pub struct PeerOptions {
    /// Offer STARTTLS and refuse mail until the client has used it.
    pub starttls: bool,
    /// Speak TLS from the first byte (implicit TLS, "SMTPS"). Excludes `starttls`.
    pub wrapper: bool,
    /// Demand AUTH (PLAIN or LOGIN) with this user name and password before MAIL.
    pub auth: Option<(String, String)>,
}

/// One message the server accepted.
#[derive(Debug, Clone)]
pub struct Received {
    /// The message as received after DATA (CRLF line ends, dot-unstuffed).
    pub raw: Vec<u8>,
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub tls: bool,
    pub authenticated: bool,
}

/// A running (or stopped) SMTP server on 127.0.0.1.
pub struct SmtpPeer {
    pub port: u16,
    /// The CA that signed the server's certificate: the root a client must trust.
    pub ca_pem: PathBuf,
    /// Where the server writes what it accepts; kept across `stop` and `restart`.
    pub maildir: PathBuf,
    opts: PeerOptions,
    cert_pem: PathBuf,
    key_pem: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl SmtpPeer {
    /// Starts a server on a free port. Panics, saying what to install, when it cannot.
    pub fn start(opts: PeerOptions) -> SmtpPeer {
        assert!(
            !(opts.starttls && opts.wrapper),
            "PeerOptions: starttls and wrapper exclude each other"
        );
        let dir = tempfile::tempdir().expect("a temporary folder for the SMTP peer");
        let certs = make_certs(&dir.path().join("certs"));
        let maildir = dir.path().join("maildir");
        std::fs::create_dir_all(&maildir).expect("create the SMTP peer's maildir");
        let mut peer = SmtpPeer {
            port: 0,
            ca_pem: certs.ca_pem,
            maildir,
            opts,
            cert_pem: certs.leaf_pem,
            key_pem: certs.leaf_key,
            child: None,
            dir,
        };
        peer.spawn(0);
        peer
    }

    /// Stops the server (SIGTERM, then SIGKILL if it lingers). The maildir stays; the port
    /// refuses connections until `restart`.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
            // SAFETY: kill(2) on our own child's pid; the child is not reaped yet, so the pid
            // cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// Starts the server again on the same port, with the same certificates and maildir.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(port);
    }

    /// Starts the server again on the same port, certificates and maildir, now demanding this
    /// user name and password (None: no AUTH): the operator changed the account under a client.
    pub fn restart_with_auth(&mut self, auth: Option<(String, String)>) {
        self.stop();
        self.opts.auth = auth;
        let port = self.port;
        self.spawn(port);
    }

    /// Every message accepted so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        let mut numbers: Vec<u64> = std::fs::read_dir(&self.maildir)
            .expect("read the SMTP peer's maildir")
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".json")?.parse().ok()
            })
            .collect();
        numbers.sort_unstable();
        numbers
            .into_iter()
            .map(|n| {
                let meta_path = self.maildir.join(format!("{n}.json"));
                let meta: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(&meta_path).expect("read a message's sidecar"),
                )
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", meta_path.display()));
                let raw = std::fs::read(self.maildir.join(format!("{n}.eml")))
                    .expect("read a received message");
                Received {
                    raw,
                    mail_from: meta["mail_from"].as_str().unwrap_or_default().to_string(),
                    rcpt_tos: meta["rcpt_tos"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                    tls: meta["tls"].as_bool().unwrap_or(false),
                    authenticated: meta["authenticated"].as_bool().unwrap_or(false),
                }
            })
            .collect()
    }

    /// Runs the server on `port` (0: any free one) and waits for `READY <port>`. A restart
    /// on a fixed port retries for a few seconds while the port is still taken.
    fn spawn(&mut self, port: u16) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.try_spawn(port, deadline) {
                Ok(()) => return,
                Err(stderr)
                    if port != 0
                        && stderr.contains("Address already in use")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(stderr) => panic!("{stderr}"),
            }
        }
    }

    fn try_spawn(&mut self, port: u16, deadline: Instant) -> Result<(), String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp/server.py");
        let stderr_path = self.dir.path().join("server.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("create the server's log");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg("--port")
            .arg(port.to_string())
            .arg("--maildir")
            .arg(&self.maildir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if self.opts.starttls || self.opts.wrapper {
            cmd.arg("--cert").arg(&self.cert_pem);
            cmd.arg("--key").arg(&self.key_pem);
        }
        if self.opts.starttls {
            cmd.arg("--require-starttls");
        }
        if self.opts.wrapper {
            cmd.arg("--tls-wrapper");
        }
        if let Some((user, password)) = &self.opts.auth {
            cmd.arg("--user").arg(user).arg("--password").arg(password);
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "SMTP peer: python3 not found on PATH ({e}). The email tests need Python 3 \
                 with aiosmtpd: install python3, then `python3 -m pip install 'aiosmtpd>=1.4'` \
                 (.ci/run does the latter)."
            ),
            Err(e) => panic!("SMTP peer: cannot run python3 {}: {e}", script.display()),
        };

        // Read stdout on a thread so that the wait can time out.
        let stdout = child.stdout.take().expect("the server's stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let why = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(p) = line.strip_prefix("READY ") {
                        let p: u16 = p.trim().parse().expect("READY <port>");
                        self.port = p;
                        self.child = Some(child);
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    break format!("did not say READY within {READY_TIMEOUT:?}");
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break "exited before it said READY".to_string();
                }
            }
        };
        let _ = child.kill();
        let status = child.wait().ok();
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let fix = if log.contains("No module named 'aiosmtpd'") || log.contains("aiosmtpd is not") {
            "\nFix: `python3 -m pip install 'aiosmtpd>=1.4'` (.ci/run does this before the tests)."
        } else {
            ""
        };
        Err(format!(
            "SMTP peer ({} --port {port}) {why} (exit: {status:?}).{fix}\n--- server stderr ---\n{log}",
            script.display()
        ))
    }
}

impl Drop for SmtpPeer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Certs {
    ca_pem: PathBuf,
    leaf_pem: PathBuf,
    leaf_key: PathBuf,
}

/// The openssl configuration for the two certificates (the system's is not read).
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
";

/// A test CA and a leaf for `localhost`/`127.0.0.1` signed by it, PEM, P-256 keys, made in
/// `dir` with the openssl CLI.
fn make_certs(dir: &Path) -> Certs {
    std::fs::create_dir_all(dir).expect("create the certificates' folder");
    let cnf = dir.join("openssl.cnf");
    std::fs::write(&cnf, OPENSSL_CNF).expect("write openssl.cnf");
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let cnf = cnf.to_string_lossy().into_owned();
    let serial = format!("0x{}", uuid::Uuid::new_v4().simple());
    let steps: [&[&str]; 5] = [
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &p("ca.key"),
        ],
        &[
            "req",
            "-new",
            "-x509",
            "-config",
            &cnf,
            "-extensions",
            "ca",
            "-key",
            &p("ca.key"),
            "-subj",
            "/CN=autopay test CA",
            "-days",
            "30",
            "-out",
            &p("ca.pem"),
        ],
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &p("leaf.key"),
        ],
        &[
            "req",
            "-new",
            "-config",
            &cnf,
            "-key",
            &p("leaf.key"),
            "-subj",
            "/CN=localhost",
            "-out",
            &p("leaf.csr"),
        ],
        &[
            "x509",
            "-req",
            "-in",
            &p("leaf.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-set_serial",
            &serial,
            "-days",
            "30",
            "-extfile",
            &cnf,
            "-extensions",
            "leaf",
            "-out",
            &p("leaf.pem"),
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(args)
            .env("OPENSSL_CONF", &cnf)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("SMTP peer: cannot run the openssl CLI ({e}); install it: apt-get install openssl")
            });
        assert!(
            out.status.success(),
            "openssl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Certs {
        ca_pem: dir.join("ca.pem"),
        leaf_pem: dir.join("leaf.pem"),
        leaf_key: dir.join("leaf.key"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use lettre::message::{Mailbox, MultiPart};
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    use mail_parser::{MessageParser, MimeHeaders};

    const USER: &str = "autopay";
    const PASSWORD: &str = "s3cret pass";

    fn with_auth(starttls: bool, wrapper: bool) -> PeerOptions {
        PeerOptions {
            starttls,
            wrapper,
            auth: Some((USER.to_string(), PASSWORD.to_string())),
        }
    }

    /// A lettre client that trusts only the peer's CA and checks the name `localhost`.
    fn transport(peer: &SmtpPeer, password: &str) -> AsyncSmtpTransport<Tokio1Executor> {
        let ca = std::fs::read(&peer.ca_pem).expect("read the test CA");
        let tls = TlsParameters::builder("localhost".to_string())
            .add_root_certificate(Certificate::from_pem(&ca).expect("the test CA parses"))
            .build_rustls()
            .expect("rustls TLS parameters");
        let tls = if peer.opts.wrapper {
            Tls::Wrapper(tls)
        } else {
            Tls::Required(tls)
        };
        transport_with(peer, tls, password)
    }

    fn transport_with(
        peer: &SmtpPeer,
        tls: Tls,
        password: &str,
    ) -> AsyncSmtpTransport<Tokio1Executor> {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(peer.port)
            .tls(tls)
            .credentials(Credentials::new(USER.to_string(), password.to_string()))
            .timeout(Some(Duration::from_secs(10)))
            .build()
    }

    fn message(to: &str, subject: &str) -> Message {
        Message::builder()
            .from("Autopay <autopay@example.com>".parse::<Mailbox>().unwrap())
            .to(to.parse::<Mailbox>().unwrap())
            .subject(subject)
            .message_id(Some(format!(
                "<{}@autopay.test>",
                uuid::Uuid::new_v4().simple()
            )))
            .multipart(MultiPart::alternative_plain_html(
                "Your payment of $12.34 is scheduled.".to_string(),
                "<p>Your payment of <b>$12.34</b> is scheduled.</p>".to_string(),
            ))
            .expect("a valid message")
    }

    fn message_id(message: &Message) -> String {
        let id = message
            .headers()
            .get_raw("Message-ID")
            .expect("the message has a Message-ID");
        id.trim_matches(|c| c == '<' || c == '>').to_string()
    }

    fn is_connection_refused(err: &lettre::transport::smtp::Error) -> bool {
        let mut source = std::error::Error::source(err);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return io.kind() == std::io::ErrorKind::ConnectionRefused;
            }
            source = e.source();
        }
        false
    }

    /// lettre reports a refused certificate as a connection error (not `is_tls()`), with
    /// rustls's reason inside an `io::Error`.
    fn certificate_error(err: &lettre::transport::smtp::Error) -> Option<rustls::CertificateError> {
        let mut source = std::error::Error::source(err);
        while let Some(e) = source {
            if let Some(rustls::Error::InvalidCertificate(why)) = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return Some(why.clone());
            }
            source = e.source();
        }
        None
    }

    async fn sends_over_tls_with_auth(opts: PeerOptions) {
        let peer = SmtpPeer::start(opts);
        let mailer = transport(&peer, PASSWORD);
        let email = message("member@example.org", "Payment scheduled");
        let id = message_id(&email);
        let response = mailer
            .send(email)
            .await
            .expect("the peer accepts the message");
        assert!(response.is_positive());

        let got = peer.received();
        assert_eq!(got.len(), 1);
        let got = &got[0];
        assert_eq!(got.mail_from, "autopay@example.com");
        assert_eq!(got.rcpt_tos, ["member@example.org"]);
        assert!(got.tls, "the session was TLS");
        assert!(got.authenticated, "the session was authenticated");

        let parsed = MessageParser::default()
            .parse(&got.raw)
            .expect("mail-parser reads the message");
        assert_eq!(parsed.subject(), Some("Payment scheduled"));
        assert_eq!(parsed.message_id(), Some(id.as_str()));
        let ct = parsed.content_type().expect("a Content-Type");
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("alternative"));
        assert_eq!(parsed.text_body_count(), 1);
        assert_eq!(parsed.html_body_count(), 1);
        assert_eq!(
            parsed.body_text(0).as_deref().map(str::trim_end),
            Some("Your payment of $12.34 is scheduled.")
        );
        assert_eq!(
            parsed.body_html(0).as_deref().map(str::trim_end),
            Some("<p>Your payment of <b>$12.34</b> is scheduled.</p>")
        );
        let html = parsed.html_part(0).unwrap().content_type().unwrap();
        assert_eq!((html.ctype(), html.subtype()), ("text", Some("html")));
        let text = parsed.text_part(0).unwrap().content_type().unwrap();
        assert_eq!((text.ctype(), text.subtype()), ("text", Some("plain")));
    }

    #[tokio::test]
    async fn starttls_and_auth_deliver_a_multipart_message() {
        sends_over_tls_with_auth(with_auth(true, false)).await;
    }

    #[tokio::test]
    async fn implicit_tls_and_auth_deliver_a_multipart_message() {
        sends_over_tls_with_auth(with_auth(false, true)).await;
    }

    #[tokio::test]
    async fn tls_is_verified_against_the_ca_and_the_name() {
        let peer = SmtpPeer::start(with_auth(true, false));
        let ca = std::fs::read(&peer.ca_pem).expect("read the test CA");
        let send = async |tls: TlsParameters| {
            transport_with(&peer, Tls::Required(tls), PASSWORD)
                .send(message("member@example.org", "Trust"))
                .await
        };

        // Only the public roots: the test CA is unknown.
        let untrusted = TlsParameters::builder("localhost".to_string())
            .build_rustls()
            .unwrap();
        let err = send(untrusted).await.expect_err("an unknown CA is refused");
        assert_eq!(
            certificate_error(&err),
            Some(rustls::CertificateError::UnknownIssuer),
            "{err:?}"
        );

        // The right CA, the wrong name.
        let wrong_name = TlsParameters::builder("mail.example.org".to_string())
            .add_root_certificate(Certificate::from_pem(&ca).unwrap())
            .build_rustls()
            .unwrap();
        let err = send(wrong_name)
            .await
            .expect_err("a name not in the SAN is refused");
        assert!(
            matches!(
                certificate_error(&err),
                Some(rustls::CertificateError::NotValidForNameContext { .. })
                    | Some(rustls::CertificateError::NotValidForName)
            ),
            "{err:?}"
        );

        // The leaf also names the IP address.
        let by_ip = TlsParameters::builder("127.0.0.1".to_string())
            .add_root_certificate(Certificate::from_pem(&ca).unwrap())
            .build_rustls()
            .unwrap();
        send(by_ip).await.expect("IP:127.0.0.1 is in the SAN");
        assert_eq!(peer.received().len(), 1);
    }

    #[tokio::test]
    async fn plain_peer_without_tls_or_auth_records_that() {
        let peer = SmtpPeer::start(PeerOptions::default());
        let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(peer.port)
            .build();
        mailer
            .send(message("member@example.org", "Plain"))
            .await
            .expect("the plain peer accepts");
        let got = peer.received();
        assert_eq!(got.len(), 1);
        assert!(!got[0].tls);
        assert!(!got[0].authenticated);
    }

    #[tokio::test]
    async fn scripted_recipients_give_transient_and_permanent_errors() {
        let peer = SmtpPeer::start(with_auth(true, false));
        let mailer = transport(&peer, PASSWORD);

        let err = mailer
            .send(message("tempfail-1+x@example.org", "Try later"))
            .await
            .expect_err("the first attempt is deferred");
        assert!(err.is_transient(), "451 is transient: {err}");
        assert_eq!(err.status().map(u16::from), Some(451));
        assert!(peer.received().is_empty());

        mailer
            .send(message("tempfail-1+x@example.org", "Try later"))
            .await
            .expect("the second attempt is accepted");
        let got = peer.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].rcpt_tos, ["tempfail-1+x@example.org"]);

        let err = mailer
            .send(message("reject+x@example.org", "Nobody home"))
            .await
            .expect_err("rejected");
        assert!(err.is_permanent(), "550 is permanent: {err}");
        assert_eq!(err.status().map(u16::from), Some(550));

        let err = mailer
            .send(message("relaydenied@example.org", "Elsewhere"))
            .await
            .expect_err("relay denied");
        assert!(err.is_permanent(), "554 is permanent: {err}");
        assert_eq!(err.status().map(u16::from), Some(554));

        assert_eq!(peer.received().len(), 1, "only the accepted one was stored");
    }

    #[tokio::test]
    async fn a_wrong_password_is_a_permanent_535() {
        let peer = SmtpPeer::start(with_auth(true, false));
        let err = transport(&peer, "wrong")
            .send(message("member@example.org", "Hello"))
            .await
            .expect_err("bad credentials are refused");
        assert!(err.is_permanent(), "535 is permanent: {err}");
        assert_eq!(err.status().map(u16::from), Some(535));
        assert!(peer.received().is_empty());
    }

    #[tokio::test]
    async fn stop_refuses_connections_and_restart_serves_again() {
        let mut peer = SmtpPeer::start(with_auth(true, false));
        let port = peer.port;
        let mailer = transport(&peer, PASSWORD);
        mailer
            .send(message("member@example.org", "Before"))
            .await
            .expect("sent before the stop");

        peer.stop();
        let err = mailer
            .send(message("member@example.org", "While down"))
            .await
            .expect_err("nobody listens while stopped");
        assert!(
            !err.is_transient() && !err.is_permanent() && is_connection_refused(&err),
            "a connection error: {err:?}"
        );
        assert_eq!(peer.received().len(), 1, "the maildir survives a stop");

        peer.restart();
        assert_eq!(peer.port, port, "same port after restart");
        mailer
            .send(message("member@example.org", "After"))
            .await
            .expect("sent after the restart, by the same transport");
        let subjects: Vec<String> = peer
            .received()
            .iter()
            .map(|r| {
                MessageParser::default()
                    .parse(&r.raw)
                    .and_then(|m| m.subject().map(str::to_string))
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(subjects, ["Before", "After"]);
    }
}
