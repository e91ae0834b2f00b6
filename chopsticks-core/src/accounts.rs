//! User and group names, resolved where a file is written: the owner a
//! `put` asks for is looked up on the target, where the name means
//! something.

use std::ffi::CString;
use std::io;

/// An owner and group to give a file, as ids on this machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    /// The user id, if one was asked for.
    pub uid: Option<u32>,
    /// The group id, if one was asked for.
    pub gid: Option<u32>,
}

impl Ownership {
    /// Resolves an owner and group given as names or decimal ids (as
    /// `chown` takes them). An unknown name is a `NotFound` error naming it.
    pub fn resolve(owner: Option<&str>, group: Option<&str>) -> io::Result<Ownership> {
        Ok(Ownership {
            uid: owner.map(user_id).transpose()?,
            gid: group.map(group_id).transpose()?,
        })
    }

    /// Whether nothing was asked for.
    pub fn is_empty(&self) -> bool {
        self.uid.is_none() && self.gid.is_none()
    }
}

/// The id of the user `name` (or `name` itself when it is a decimal id).
pub fn user_id(name: &str) -> io::Result<u32> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c_name = c_name(name, "user")?;
    lookup(|buffer| {
        // SAFETY: passwd is plain old data; an all-zero value is valid.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let code = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        (code, (!found.is_null()).then_some(entry.pw_uid))
    })?
    .ok_or_else(|| unknown("user", name))
}

/// The id of the group `name` (or `name` itself when it is a decimal id).
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c_name = c_name(name, "group")?;
    lookup(|buffer| {
        // SAFETY: group is plain old data; an all-zero value is valid.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let code = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        (code, (!found.is_null()).then_some(entry.gr_gid))
    })?
    .ok_or_else(|| unknown("group", name))
}

fn c_name(name: &str, what: &str) -> io::Result<CString> {
    if name.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("an empty {what} name"),
        ));
    }
    CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the {what} name {name:?} contains a NUL byte"),
        )
    })
}

fn unknown(what: &str, name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("there is no {what} named {name:?} here"),
    )
}

/// Runs a `get*nam_r` call with a buffer that grows on `ERANGE` (up to 1 MiB).
fn lookup(
    mut call: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, Option<u32>),
) -> io::Result<Option<u32>> {
    let mut buffer: Vec<libc::c_char> = vec![0; 4096];
    loop {
        match call(&mut buffer) {
            (0, found) => return Ok(found),
            (libc::ERANGE, _) if buffer.len() < 1 << 20 => buffer.resize(buffer.len() * 4, 0),
            // Some C libraries report "no such entry" as an error code.
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (code, _) => return Err(io::Error::from_raw_os_error(code)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_resolve_and_strangers_are_named() {
        assert_eq!(user_id("root").expect("root"), 0);
        assert_eq!(group_id("root").expect("root group"), 0);
        assert_eq!(user_id("4242").expect("an id"), 4242);
        let error = user_id("no-such-user-here").expect_err("unknown");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(error.to_string().contains("no-such-user-here"), "{error}");
        let error = group_id("bad\0name").expect_err("NUL");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            Ownership::resolve(None, Some("0")).expect("resolve"),
            Ownership {
                uid: None,
                gid: Some(0)
            }
        );
    }
}
