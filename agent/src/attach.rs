//! The constructor's work: connect to the manager, hand it a userfaultfd (or ask for a grant),
//! and either publish the connection for Register requests or fail open (fail closed with
//! UMM_REQUIRE=1).

use std::any::Any;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;

use umm::protocol::{
    kind_name, Message, HELLO_HAS_UFFD, HELLO_REQUIRE, HELLO_WANT_GRANT, MAX_FRAME,
};
use umm::uffd::Uffd;

use crate::sys::{self, Deadline, Fail, OneLine};
use crate::{alloc, child, data, register};

/// The default for UMM_TIMEOUT_MS.
pub(crate) const DEFAULT_TIMEOUT_MS: u32 = 5000;

/// What the environment asks for.
struct Config {
    socket: std::ffi::OsString,
    require: bool,
    quiet: bool,
    timeout_ms: u32,
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// UMM_TIMEOUT_MS: a positive number of milliseconds; anything else means the default.
fn parse_timeout(value: Option<&str>) -> u32 {
    value
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|&ms| ms > 0)
        .unwrap_or(DEFAULT_TIMEOUT_MS)
}

fn config() -> Option<Config> {
    let socket = std::env::var_os("UMM_SOCKET").filter(|s| !s.is_empty())?;
    Some(Config {
        socket,
        require: env_flag("UMM_REQUIRE"),
        quiet: env_flag("UMM_AGENT_QUIET"),
        timeout_ms: parse_timeout(std::env::var("UMM_TIMEOUT_MS").ok().as_deref()),
    })
}

/// The constructor's body.
pub(crate) fn run() {
    let Some(cfg) = config() else {
        // UMM_SOCKET unset or empty: do nothing at all.
        return;
    };
    register::TIMEOUT_MS.store(cfg.timeout_ms, Ordering::Relaxed);
    register::QUIET.store(cfg.quiet, Ordering::Relaxed);
    // A panic inside the agent is reported as one line by whoever catches it; the default
    // hook would print several. This is the agent's own copy of std: the program's hook (if
    // it is written in Rust) is not affected.
    std::panic::set_hook(Box::new(|_| {}));
    // The next malloc family, now, while this is the only thread.
    alloc::resolve_all();
    let pid = sys::raw_getpid();
    // Before the Hello, so that the manager registers it (missing) at the handoff.
    child::map_beacon();
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Data segments become anonymous (writable until the handoff scan registered them), and
    // the handoff scan registers `[heap]` as it is then: at least up to here.
    let copied = data::make_anonymous();
    alloc::note_break_at_handoff();
    let attached = attach(&cfg, pid, &exe);
    data::restore_protection(&copied);
    match attached {
        Ok(sock) => {
            child::prepare(&cfg.socket, &exe, cfg.require);
            register::publish(sock, pid);
        }
        Err(reason) => {
            child::drop_beacon();
            fail(&cfg, pid, &reason);
        }
    }
}

/// Report a failed attach: fail open with a warning, or exit 1 when UMM_REQUIRE=1.
fn fail(cfg: &Config, pid: i32, reason: &str) {
    if cfg.require {
        // Printed even with UMM_AGENT_QUIET=1: a silent exit would be a mystery.
        sys::warn(
            pid,
            format_args!("manager required (UMM_REQUIRE=1) but {reason}"),
        );
        // SAFETY: _exit ends the process at once; nothing of the program has run yet.
        unsafe { libc::_exit(1) };
    }
    if !cfg.quiet {
        sys::warn(pid, format_args!("{reason}; running unmanaged"));
    }
}

/// The constructor panicked (a bug): report it like any other failure.
pub(crate) fn internal_error(payload: &(dyn Any + Send)) {
    // Whatever was reached, the handoff was not published: no child will look for a beacon.
    child::drop_beacon();
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic");
    let cfg = config().unwrap_or(Config {
        socket: Default::default(),
        require: false,
        quiet: false,
        timeout_ms: DEFAULT_TIMEOUT_MS,
    });
    fail(
        &cfg,
        sys::raw_getpid(),
        &format!("the agent failed (internal error: {})", OneLine(what)),
    );
}

/// Connect, say Hello (with the uffd or asking for a grant), follow a Grant with a Handoff.
/// Ok: the manager holds the uffd; the connection is returned for Register requests.
fn attach(cfg: &Config, pid: i32, exe: &str) -> Result<OwnedFd, String> {
    let shown = cfg.socket.to_string_lossy();
    let shown = OneLine(&shown);
    let sock = sys::connect(&cfg.socket, cfg.timeout_ms)
        .map_err(|e| format!("no manager at {shown} ({e})"))?;
    let at = |what: &dyn std::fmt::Display| format!("manager at {shown}: {what}");

    // Never UFFD_USER_MODE_ONLY, and no UFFDIO_API here: the manager does it (EVENT_FORK
    // needs CAP_SYS_PTRACE of the ioctl's caller).
    let uffd = Uffd::open_syscall().or_else(|_| Uffd::open_dev()).ok();
    let mut flags = if uffd.is_some() {
        HELLO_HAS_UFFD
    } else {
        HELLO_WANT_GRANT
    };
    if cfg.require {
        flags |= HELLO_REQUIRE;
    }
    let hello = Message::Hello {
        pid: pid as u32,
        flags,
        exe: exe.to_owned(),
    };
    let attach_fd = uffd.as_ref().map(|u| u.as_raw_fd());
    let (reply, mut fds) =
        exchange(&sock, &hello, attach_fd, cfg.timeout_ms).map_err(|e| at(&e))?;
    match reply {
        Message::Ack { .. } => Ok(sock),
        Message::Nack { code, reason } => Err(at(&Fail::Nack {
            code,
            reason: &reason,
        })),
        Message::Grant if flags & HELLO_WANT_GRANT != 0 => {
            if fds.len() != 1 {
                return Err(at(&format_args!(
                    "Grant came with {} fds instead of one",
                    fds.len()
                )));
            }
            let dev = fds.remove(0);
            let made = Uffd::from_device(dev.as_fd());
            // The device fd is a grant to make more uffds: keep it no longer than needed.
            drop(dev);
            let uffd = made.map_err(|e| {
                format!("cannot make a userfaultfd from the /dev/userfaultfd fd granted by the manager at {shown} ({e})")
            })?;
            let (reply, _) = exchange(
                &sock,
                &Message::Handoff,
                Some(uffd.as_raw_fd()),
                cfg.timeout_ms,
            )
            .map_err(|e| at(&e))?;
            match reply {
                Message::Ack { .. } => Ok(sock),
                Message::Nack { code, reason } => Err(at(&Fail::Nack {
                    code,
                    reason: &reason,
                })),
                other => Err(at(&format_args!(
                    "unexpected {} reply to Handoff",
                    kind_name(other.kind())
                ))),
            }
            // `uffd` (the agent's copy) closes here: the manager holds it now.
        }
        other => Err(at(&format_args!(
            "unexpected {} reply to Hello",
            kind_name(other.kind())
        ))),
    }
    // `uffd` and any fds that came with the reply close here.
}

/// Send one message (with `attach` as SCM_RIGHTS) and read one reply with its fds, within
/// `timeout_ms` for both.
fn exchange(
    sock: &OwnedFd,
    msg: &Message,
    attach: Option<RawFd>,
    timeout_ms: u32,
) -> Result<(Message, Vec<OwnedFd>), Fail<'static>> {
    let fd = sock.as_raw_fd();
    let mut frame = [0u8; MAX_FRAME + 4];
    let n = msg.encode_into(&mut frame);
    let deadline = Deadline::after_ms(timeout_ms);
    sys::send_all(fd, &frame[..n], attach, &deadline)?;
    let mut fds = Vec::new();
    let reply = sys::read_reply(fd, &mut frame, &deadline, Some(&mut fds))?.to_message();
    Ok((reply, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_or_missing_timeout_means_the_default() {
        assert_eq!(parse_timeout(None), DEFAULT_TIMEOUT_MS);
        assert_eq!(parse_timeout(Some("")), DEFAULT_TIMEOUT_MS);
        assert_eq!(parse_timeout(Some("0")), DEFAULT_TIMEOUT_MS);
        assert_eq!(parse_timeout(Some("-5")), DEFAULT_TIMEOUT_MS);
        assert_eq!(parse_timeout(Some("soon")), DEFAULT_TIMEOUT_MS);
        assert_eq!(parse_timeout(Some(" 300 ")), 300);
    }

    #[test]
    fn exchange_fails_cleanly_on_a_closed_peer() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        let a = OwnedFd::from(a);
        let e = exchange(&a, &Message::Handoff, None, 1000).unwrap_err();
        // Either the send sees EPIPE or the reply sees EOF; neither raises SIGPIPE.
        assert!(matches!(e, Fail::Net(_)), "{e:?}");
    }

    #[test]
    fn exchange_reads_exactly_one_reply_and_its_fd() {
        use std::io::Write;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let a = OwnedFd::from(a);
        // The reply is already waiting, followed by bytes of a next frame that must stay unread.
        let mut bytes = Message::Ack {
            registered_bytes: 7,
        }
        .encode();
        bytes.extend_from_slice(&[1, 2, 3]);
        b.write_all(&bytes).unwrap();
        let (m, fds) = exchange(&a, &Message::Handoff, None, 1000).unwrap();
        assert_eq!(
            m,
            Message::Ack {
                registered_bytes: 7
            }
        );
        assert!(fds.is_empty());
        let mut rest = [0u8; 8];
        let n = read_rest(&a, &mut rest);
        assert_eq!(&rest[..n], &[1, 2, 3]);
    }

    fn read_rest(fd: &OwnedFd, buf: &mut [u8]) -> usize {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::from(fd.try_clone().unwrap());
        s.read(buf).unwrap()
    }
}
