//! The systemd notification protocol (sd_notify(3)), written out: `KEY=VALUE` lines in one
//! datagram to the socket systemd names in `$NOTIFY_SOCKET`. The daemon says `READY=1` once it
//! can work, `STATUS=...` as it goes, `WATCHDOG=1` while its loops are alive, and `STOPPING=1`
//! when it is told to stop.
//!
//! Outside systemd (`$NOTIFY_SOCKET` unset) a [`Notifier`] does nothing, so `autopay run` in a
//! terminal behaves as before. Sending never waits: the socket is non-blocking, so a service
//! manager that does not read its socket makes a send fail, never stall the caller.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Says what this process is doing to the service manager that started it.
pub struct Notifier {
    /// Where systemd listens, and the socket we send from; None outside systemd.
    target: Option<Target>,
    /// How often systemd expects `WATCHDOG=1` from this process; None when it expects none.
    watchdog: Option<Duration>,
}

struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `$NOTIFY_SOCKET` as given, for error messages.
    shown: String,
}

impl Notifier {
    /// A notifier that sends nothing: not under systemd.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// The notifier systemd asks for through this process's environment: `$NOTIFY_SOCKET`,
    /// `$WATCHDOG_USEC` and `$WATCHDOG_PID`. A value that cannot be used is logged and ignored;
    /// systemd then notices the missing `READY=1` or `WATCHDOG=1` itself.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let addr = match socket.as_deref().map(socket_address).transpose() {
            Ok(addr) => addr,
            Err(e) => {
                tracing::warn!("{e}; systemd will not hear from autopay");
                None
            }
        };
        let watchdog = match watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
        {
            Ok(interval) => interval,
            Err(e) => {
                tracing::warn!("{e}; autopay sends no watchdog pings");
                None
            }
        };
        let shown = socket
            .as_deref()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match Notifier::new(addr, watchdog, shown) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(
                    "cannot open a socket to notify systemd ({e}); systemd will not hear from autopay"
                );
                Notifier::disabled()
            }
        }
    }

    /// A notifier that sends to `addr` (None: sends nothing) and pings every `watchdog`.
    pub fn to_address(
        addr: Option<SocketAddr>,
        watchdog: Option<Duration>,
    ) -> io::Result<Notifier> {
        let shown = addr.as_ref().map(describe).unwrap_or_default();
        Notifier::new(addr, watchdog, shown)
    }

    fn new(
        addr: Option<SocketAddr>,
        watchdog: Option<Duration>,
        shown: String,
    ) -> io::Result<Notifier> {
        let Some(addr) = addr else {
            return Ok(Notifier::disabled());
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            target: Some(Target {
                socket,
                addr,
                shown,
            }),
            watchdog,
        })
    }

    /// Whether systemd listens (`$NOTIFY_SOCKET` was set and usable).
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// How often systemd expects `WATCHDOG=1` (its `WatchdogSec=`), when it expects it from
    /// this process: `$WATCHDOG_USEC`, unless `$WATCHDOG_PID` names another process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// `READY=1`: start-up is over, the service is working.
    pub fn ready(&self) -> io::Result<()> {
        self.send("READY=1")
    }

    /// `STOPPING=1`: the service was told to stop and is finishing.
    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1")
    }

    /// `WATCHDOG=1`: the service is alive.
    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }

    /// `STATUS=...`: one line `systemctl status` shows. Control characters (a newline would
    /// start another assignment) become spaces. `systemctl status` is readable by every user of
    /// the host: the text must carry no member data, only what the log may carry.
    pub fn status(&self, text: &str) -> io::Result<()> {
        let line: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        self.send(&format!("STATUS={}", line.trim()))
    }

    fn send(&self, message: &str) -> io::Result<()> {
        let Some(t) = &self.target else {
            return Ok(());
        };
        let sent = t
            .socket
            .send_to_addr(message.as_bytes(), &t.addr)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot notify systemd at {}: {e}", t.shown),
                )
            })?;
        if sent != message.len() {
            return Err(io::Error::other(format!(
                "systemd at {} took {sent} of {} bytes",
                t.shown,
                message.len()
            )));
        }
        Ok(())
    }
}

/// The address `$NOTIFY_SOCKET` names: an absolute path, or `@name` for a socket in the
/// abstract namespace.
pub fn socket_address(value: &OsStr) -> Result<SocketAddr, String> {
    let bytes = value.as_bytes();
    let shown = value.to_string_lossy();
    let bad = |why: String| format!("NOTIFY_SOCKET={shown:?} {why}");
    match bytes.first() {
        Some(b'/') => {
            SocketAddr::from_pathname(value).map_err(|e| bad(format!("is not a socket path ({e})")))
        }
        Some(b'@') if bytes.len() > 1 => abstract_address(&bytes[1..]).map_err(bad),
        _ => Err(bad(
            "is neither an absolute socket path nor an @abstract name".into(),
        )),
    }
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &[u8]) -> Result<SocketAddr, String> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
        .map_err(|e| format!("is not an abstract socket name ({e})"))
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_name: &[u8]) -> Result<SocketAddr, String> {
    Err("names an abstract socket, which only Linux has".into())
}

/// A socket address as `$NOTIFY_SOCKET` would write it.
fn describe(addr: &SocketAddr) -> String {
    if let Some(path) = addr.as_pathname() {
        return path.display().to_string();
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        if let Some(name) = addr.as_abstract_name() {
            return format!("@{}", String::from_utf8_lossy(name));
        }
    }
    "an unnamed socket".into()
}

/// The watchdog interval `$WATCHDOG_USEC` asks for, as sd_watchdog_enabled(3) reads it: none
/// when unset, or when `$WATCHDOG_PID` is set and names a process other than `me` (the pings
/// are that process's to send).
pub fn watchdog_interval(
    usec: Option<&str>,
    pid: Option<&str>,
    me: u32,
) -> Result<Option<Duration>, String> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    let micros: u64 = usec.trim().parse().ok().filter(|u| *u > 0).ok_or_else(|| {
        format!("WATCHDOG_USEC={usec:?} is not a positive number of microseconds")
    })?;
    if let Some(pid) = pid {
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| format!("WATCHDOG_PID={pid:?} is not a process id"))?;
        if pid != me {
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(micros)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket bound where systemd's would be, and a notifier pointed at it.
    fn listening() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let addr = socket_address(path.as_os_str()).unwrap();
        let notifier = Notifier::to_address(Some(addr), None).unwrap();
        (dir, systemd, notifier)
    }

    fn receive(systemd: &UnixDatagram) -> String {
        systemd
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = systemd.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn each_notification_is_one_datagram_systemd_reads() {
        let (_dir, systemd, notifier) = listening();
        assert!(notifier.is_active());
        notifier.ready().unwrap();
        notifier.status("charging; worker host-1-abc").unwrap();
        notifier.watchdog().unwrap();
        notifier.stopping().unwrap();
        assert_eq!(receive(&systemd), "READY=1");
        assert_eq!(receive(&systemd), "STATUS=charging; worker host-1-abc");
        assert_eq!(receive(&systemd), "WATCHDOG=1");
        assert_eq!(receive(&systemd), "STOPPING=1");
    }

    #[test]
    fn a_status_is_one_line_whatever_it_is_given() {
        let (_dir, systemd, notifier) = listening();
        notifier
            .status("stalled:\nREADY=1\r\n\tworker \u{1b}[2J ")
            .unwrap();
        let got = receive(&systemd);
        assert_eq!(got.lines().count(), 1, "{got:?}");
        assert!(got.starts_with("STATUS=stalled:"), "{got:?}");
        assert!(!got.chars().any(char::is_control), "{got:?}");
    }

    #[test]
    fn an_abstract_socket_is_reached_by_its_at_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("autopay-test-{}", uuid::Uuid::new_v4().simple());
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let addr = socket_address(OsStr::new(&format!("@{name}"))).unwrap();
        let notifier = Notifier::to_address(Some(addr), None).unwrap();
        notifier.ready().unwrap();
        assert_eq!(receive(&systemd), "READY=1");
    }

    #[test]
    fn outside_systemd_every_call_does_nothing() {
        let notifier = Notifier::disabled();
        assert!(!notifier.is_active());
        assert!(notifier.ready().is_ok() && notifier.watchdog().is_ok());
        assert!(notifier.status("x").is_ok() && notifier.stopping().is_ok());
        assert_eq!(notifier.watchdog_interval(), None);
        // A watchdog interval without a socket to ping is no watchdog.
        let notifier = Notifier::to_address(None, Some(Duration::from_secs(1))).unwrap();
        assert_eq!(notifier.watchdog_interval(), None);
    }

    #[test]
    fn a_notify_socket_that_is_neither_a_path_nor_an_at_name_is_refused() {
        for bad in ["", "@", "relative/notify.sock", "vsock:2:1234"] {
            let err = socket_address(OsStr::new(bad)).unwrap_err();
            assert!(err.starts_with("NOTIFY_SOCKET="), "{err}");
        }
    }

    #[test]
    fn the_watchdog_interval_is_for_the_process_watchdog_pid_names() {
        let me = 4242;
        assert_eq!(watchdog_interval(None, None, me), Ok(None));
        assert_eq!(
            watchdog_interval(Some("2000000"), None, me),
            Ok(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("4242"), me),
            Ok(Some(Duration::from_secs(2)))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("1"), me), Ok(None));
        for bad in ["0", "-5", "2s", ""] {
            assert!(watchdog_interval(Some(bad), None, me).is_err(), "{bad}");
        }
        assert!(watchdog_interval(Some("2000000"), Some("x"), me).is_err());
    }

    #[test]
    fn a_service_manager_that_stopped_listening_makes_a_send_fail_not_wait() {
        let (dir, systemd, notifier) = listening();
        drop(systemd);
        std::fs::remove_file(dir.path().join("notify.sock")).unwrap();
        let err = notifier.watchdog().unwrap_err();
        assert!(
            err.to_string().contains("cannot notify systemd at"),
            "{err}"
        );
    }

    #[test]
    fn a_service_manager_that_does_not_read_makes_a_send_fail_not_wait() {
        let (_dir, _systemd, notifier) = listening();
        let err = (0..100_000)
            .find_map(|_| notifier.watchdog().err())
            .expect("the queue of a socket nobody reads fills up");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }
}
