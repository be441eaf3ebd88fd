//! Operating-system accounts: who this process runs as, and the name of a user id. The audit
//! trail names the operator by them, and the SQLite store names a database file's owner.

/// The effective user id of this process.
pub fn effective() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The account name of a user id (getpwuid_r), or `uid N` when it has none.
pub fn name(uid: libc::uid_t) -> String {
    account(uid).unwrap_or_else(|| format!("uid {uid}"))
}

/// The account name of a user id, when the user database has one.
pub fn account(uid: libc::uid_t) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: a zeroed passwd is a valid out-parameter (pointers null, numbers 0).
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to a live local, and `buf.len()` is the buffer's real size.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || found.is_null() || entry.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`, alive here.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
}
