//! The start-up marker a re-executed child finds in its environment, and the hello it
//! answers with.
//!
//! The marker is `__PROCPOOL_ROLE=<role>:<parent pid>:<fd>`. A process only acts on it when
//! its parent pid matches: a grandchild that inherits the variable (a task running the
//! same program again) ignores it, so the variable never needs removing (`remove_var` is
//! `unsafe` in edition 2024). `<fd>` is the one descriptor the parent let survive exec.

use std::io;
use std::os::fd::{AsFd, RawFd};

use rustix::process::Pid;

/// The environment variable holding the marker.
pub(crate) const ROLE_ENV: &str = "__PROCPOOL_ROLE";

/// What a re-executed process should become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// A worker (spawn start method).
    Worker,
    /// The fork server.
    Forkserver,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Forkserver => "forkserver",
        }
    }

    fn code(self) -> u16 {
        match self {
            Role::Worker => 1,
            Role::Forkserver => 2,
        }
    }
}

/// A parsed `__PROCPOOL_ROLE` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Marker {
    pub(crate) role: Role,
    pub(crate) ppid: Pid,
    pub(crate) fd: RawFd,
}

impl Marker {
    pub(crate) fn to_env_value(self) -> String {
        format!(
            "{}:{}:{}",
            self.role.as_str(),
            self.ppid.as_raw_nonzero(),
            self.fd
        )
    }

    pub(crate) fn parse(s: &str) -> Option<Marker> {
        let mut it = s.split(':');
        let role = match it.next()? {
            "worker" => Role::Worker,
            "forkserver" => Role::Forkserver,
            _ => return None,
        };
        let ppid = Pid::from_raw(it.next()?.parse().ok()?)?;
        let fd = it.next()?.parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(Marker { role, ppid, fd })
    }

    /// The marker in this process's environment, if any.
    pub(crate) fn from_env() -> Option<Marker> {
        let v = std::env::var_os(ROLE_ENV)?;
        Marker::parse(v.to_str()?)
    }

    /// The marker in this process's environment, if it is addressed to this process.
    pub(crate) fn for_this_process() -> Option<Marker> {
        Marker::from_env().filter(|m| rustix::process::getppid() == Some(m.ppid))
    }
}

/// The size of the hello a started process writes first on its channel.
pub(crate) const HELLO_LEN: usize = 16;
const HELLO_MAGIC: &[u8; 8] = b"PROCPOOL";

/// The hello: magic, protocol version, role, pid.
pub(crate) fn hello(role: Role) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[..8].copy_from_slice(HELLO_MAGIC);
    b[8..10].copy_from_slice(&(crate::protocol::PROTOCOL_VERSION as u16).to_le_bytes());
    b[10..12].copy_from_slice(&role.code().to_le_bytes());
    let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
    b[12..16].copy_from_slice(&pid.to_le_bytes());
    b
}

/// Checks a hello; returns the pid it names.
pub(crate) fn check_hello(b: &[u8; HELLO_LEN], role: Role) -> Result<u32, String> {
    if &b[..8] != HELLO_MAGIC {
        return Err(format!(
            "the first bytes were not a procpool hello: {:02x?}",
            &b[..]
        ));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if u32::from(version) != crate::protocol::PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version}, expected {}",
            crate::protocol::PROTOCOL_VERSION
        ));
    }
    let code = u16::from_le_bytes([b[10], b[11]]);
    if code != role.code() {
        return Err(format!(
            "the child started as role {code}, expected {}",
            role.code()
        ));
    }
    Ok(u32::from_le_bytes([b[12], b[13], b[14], b[15]]))
}

/// Writes the hello on `sock`.
pub(crate) fn send_hello(sock: impl AsFd, role: Role) -> io::Result<()> {
    let msg = hello(role);
    let mut off = 0;
    while off < msg.len() {
        match rustix::io::write(&sock, &msg[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_roundtrip() {
        let m = Marker {
            role: Role::Forkserver,
            ppid: Pid::from_raw(1234).unwrap(),
            fd: 7,
        };
        assert_eq!(m.to_env_value(), "forkserver:1234:7");
        assert_eq!(Marker::parse(&m.to_env_value()), Some(m));
        assert_eq!(Marker::parse("worker:0:3"), None);
        assert_eq!(Marker::parse("worker:12:3:4"), None);
        assert_eq!(Marker::parse("nobody:12:3"), None);
    }

    #[test]
    fn hello_roundtrip() {
        let h = hello(Role::Worker);
        let pid = check_hello(&h, Role::Worker).unwrap();
        assert_eq!(pid, std::process::id());
        assert!(check_hello(&h, Role::Forkserver).is_err());
        assert!(check_hello(&[0; HELLO_LEN], Role::Worker).is_err());
    }
}
