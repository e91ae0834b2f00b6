//! A user's ids and home, looked up on the agent, and the switch to them
//! in a command's child process.

use std::ffi::{CStr, CString};

/// What a command needs to run as a user.
pub(crate) struct Account {
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
    pub(crate) groups: Vec<libc::gid_t>,
    pub(crate) home: String,
}

/// Looks `user` up in the host's user database.
pub(crate) fn lookup(user: &str) -> Result<Account, String> {
    let name = CString::new(user).map_err(|_| format!("the user name {user:?} holds a NUL"))?;
    let mut entry: libc::passwd = unsafe_zeroed_passwd();
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is NUL-terminated,
    // `entry` and `found` are writable, and the buffer's length is passed.
    let status = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() {
        return Err(format!("the host knows no user {user:?}"));
    }
    let home = if entry.pw_dir.is_null() {
        "/".to_string()
    } else {
        // SAFETY: getpwnam_r filled pw_dir with a NUL-terminated string
        // inside `buffer`, which is alive here.
        unsafe { CStr::from_ptr(entry.pw_dir) }
            .to_string_lossy()
            .into_owned()
    };
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut listed = -1;
    for _ in 0..4 {
        let mut count = groups.len() as libc::c_int;
        // SAFETY: `groups` holds `count` writable entries, the name is NUL-terminated.
        listed = unsafe {
            libc::getgrouplist(name.as_ptr(), entry.pw_gid, groups.as_mut_ptr(), &mut count)
        };
        if listed >= 0 {
            groups.truncate(count.max(0) as usize);
            break;
        }
        // Too few places: `count` says how many it needs.
        let needed = (count.max(0) as usize).max(groups.len() * 2);
        groups.resize(needed, 0);
    }
    if listed < 0 {
        groups.clear();
    }
    if groups.is_empty() {
        groups.push(entry.pw_gid);
    }
    Ok(Account {
        uid: entry.pw_uid,
        gid: entry.pw_gid,
        groups,
        home,
    })
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: passwd is a plain C struct of integers and pointers, for
    // which all zeroes (null pointers) is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Becomes `uid`, `gid` and `groups` in a forked child, before exec.
/// Only async-signal-safe system calls: it runs between fork and exec.
pub(crate) fn switch(
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: &[libc::gid_t],
) -> std::io::Result<()> {
    // SAFETY: `groups` is a valid slice of gids; these calls touch no
    // memory of ours otherwise.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
