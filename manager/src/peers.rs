//! Agent connections: accepting, reading framed messages with their fds, the handshake that
//! hands a uffd over, and Register requests afterwards.
//!
//! A peer never blocks the loop: its socket is non-blocking, its buffer is bounded by the
//! frame limit, a handshake has a deadline, and anything malformed drops that peer alone.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use umm::layout::Layout;
use umm::protocol::{
    self, Message, NackCode, HELLO_FORKED, HELLO_HAS_UFFD, HELLO_WANT_GRANT, MAX_FRAME,
};
use umm::sys::{fd as sysfd, proc, socket};
use umm::uffd::{Features, Uffd};

use crate::manager::{event_for, Manager, Policy};
use crate::slab::{Id, Token};
use crate::space::{FaultAround, Origin, Space};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    AwaitHello,
    /// We sent a Grant; the agent makes its uffd from it and sends Handoff.
    AwaitHandoff,
    /// Handed over; the connection stays for Register requests.
    Attached(Id),
}

pub struct Peer {
    stream: UnixStream,
    cred: socket::PeerCred,
    inbuf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    state: PeerState,
    deadline: Instant,
    exe: String,
}

impl Peer {
    fn describe(&self) -> String {
        if self.exe.is_empty() {
            format!("peer pid {} uid {}", self.cred.pid, self.cred.uid)
        } else {
            format!(
                "peer pid {} uid {} ({})",
                self.cred.pid, self.cred.uid, self.exe
            )
        }
    }
}

/// How many reads (of up to one frame each) a peer gets per turn of the loop.
const PEER_READS_PER_TURN: usize = 8;

/// Why a peer is dropped; each is one log line, a Nack, and a count in the report.
pub(crate) enum Reject {
    Refused(NackCode, String),
    Protocol(String),
}

impl Manager {
    pub(crate) fn accept_peers(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the connection in the backlog, and stop
                    // polling the listener until the next tick (it stays readable: a
                    // level-triggered loop would spin on it).
                    self.pause_listener(&e);
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("peer socket: {e}");
                continue;
            }
            let cred = match socket::peer_cred(&stream) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("peer without credentials ({e}); dropped");
                    continue;
                }
            };
            let peer = Peer {
                stream,
                cred,
                inbuf: Vec::new(),
                fds: VecDeque::new(),
                state: PeerState::AwaitHello,
                deadline: Instant::now() + self.cfg.handshake_timeout,
                exe: String::new(),
            };
            let id = self.peers.insert(peer);
            let p = self.peers.get(id).expect("just inserted");
            if let Err(e) = self.epoll.add(p.stream.as_fd(), event_for(Token::Peer(id))) {
                log::warn!("epoll add for a peer failed: {e}");
                self.peers.remove(id);
            }
        }
    }

    pub(crate) fn on_peer_readable(&mut self, id: Id) {
        let mut chunk = [0u8; MAX_FRAME + 4];
        // A bounded share per wakeup: a peer that keeps sending cannot keep the loop from
        // faults and other peers (epoll is level-triggered: the rest waits for the next turn).
        for _ in 0..PEER_READS_PER_TURN {
            let Some(peer) = self.peers.get_mut(id) else {
                return;
            };
            let got = match socket::recv_with_fds(peer.stream.as_fd(), &mut chunk) {
                Ok(g) => g,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let what = peer.describe();
                    log::info!("{what}: read failed ({e}); dropped");
                    self.drop_peer(id, None);
                    return;
                }
            };
            if got.len == 0 {
                self.peer_closed(id);
                return;
            }
            if got.truncated || peer.fds.len() + got.fds.len() > 2 {
                self.drop_peer(
                    id,
                    Some(Reject::Protocol(
                        "sent more file descriptors than the protocol allows".into(),
                    )),
                );
                return;
            }
            peer.fds.extend(got.fds);
            peer.inbuf.extend_from_slice(&chunk[..got.len]);
            if !self.decode_frames(id) {
                return;
            }
        }
    }

    /// Handle every complete frame in the peer's buffer. False when the peer was dropped.
    fn decode_frames(&mut self, id: Id) -> bool {
        loop {
            let Some(peer) = self.peers.get_mut(id) else {
                return false;
            };
            // Only a restore manager takes frames longer than MAX_FRAME (Restore's region
            // lists): everywhere else a peer holds at most one MAX_FRAME frame in memory.
            if self.cfg.restore.is_none() {
                if let Ok(Some(size)) = protocol::frame_size(&peer.inbuf) {
                    if size > MAX_FRAME + 4 {
                        self.drop_peer(
                            id,
                            Some(Reject::Protocol(format!(
                                "a frame of {} bytes: this manager takes at most {MAX_FRAME} \
                                 (longer Restore frames go to umm restore)",
                                size - 4
                            ))),
                        );
                        return false;
                    }
                }
            }
            let (msg, used) = match protocol::decode(&peer.inbuf) {
                Ok(Some(x)) => x,
                Ok(None) => return true,
                Err(e) => {
                    let why = match e {
                        protocol::ProtocolError::Version { .. } => {
                            Reject::Refused(NackCode::Version, e.to_string())
                        }
                        _ => Reject::Protocol(e.to_string()),
                    };
                    self.drop_peer(id, Some(why));
                    return false;
                }
            };
            peer.inbuf.drain(..used);
            if let Err(d) = self.handle_message(id, msg) {
                self.drop_peer(id, Some(d));
                return false;
            }
        }
    }

    fn handle_message(&mut self, id: Id, msg: Message) -> Result<(), Reject> {
        let peer = self.peers.get_mut(id).expect("caller checked");
        match (peer.state, msg) {
            (PeerState::AwaitHello, Message::Hello { pid: _, flags, exe }) => {
                peer.exe = exe;
                let cred = peer.cred;
                self.authorize(cred)?;
                if flags & HELLO_HAS_UFFD != 0 {
                    let fd = self.take_fd(id, "Hello")?;
                    self.attach(id, fd)
                } else if flags & HELLO_WANT_GRANT != 0 {
                    self.grant(id)
                } else if flags & HELLO_FORKED != 0 {
                    self.expect_no_fd(id)?;
                    self.attach_forked(id, cred.pid)
                } else {
                    Err(Reject::Protocol(
                        "Hello with neither a uffd nor a grant request".into(),
                    ))
                }
            }
            (PeerState::AwaitHello, Message::Restore { image, regions, .. }) => {
                let cred = peer.cred;
                peer.exe = proc::exe(cred.pid);
                self.authorize(cred)?;
                let fd = self.take_fd(id, "Restore")?;
                let (space, registered) = self.restore_attach(cred.pid, &image, &regions, fd)?;
                let peer = self.peers.get_mut(id).expect("caller checked");
                peer.state = PeerState::Attached(space);
                self.reply(
                    id,
                    &Message::Ack {
                        registered_bytes: registered,
                    },
                )?;
                // Faults may have queued while the restorer waited for the ack.
                self.to_drain.push(space);
                Ok(())
            }
            (PeerState::AwaitHandoff, Message::Handoff) => {
                let fd = self.take_fd(id, "Handoff")?;
                self.attach(id, fd)
            }
            (PeerState::Attached(space), Message::Register { start, len }) => {
                self.expect_no_fd(id)?;
                self.stats.register_requests += 1;
                let end = start.saturating_add(len);
                let range = umm::page_floor(start)..umm::page_ceil(end);
                if !range.is_empty() {
                    self.register_servable(space, range);
                }
                let registered = self
                    .spaces
                    .get(space)
                    .map_or(0, |s| s.layout.registered_bytes());
                self.reply(
                    id,
                    &Message::Ack {
                        registered_bytes: registered,
                    },
                )
            }
            (state, msg) => Err(Reject::Protocol(format!(
                "unexpected {} in state {state:?}",
                protocol::kind_name(msg.kind())
            ))),
        }
    }

    fn take_fd(&mut self, id: Id, what: &str) -> Result<OwnedFd, Reject> {
        let peer = self.peers.get_mut(id).expect("caller checked");
        let fd = peer.fds.pop_front().ok_or_else(|| {
            Reject::Protocol(format!("{what} says a uffd is attached, none arrived"))
        })?;
        if !peer.fds.is_empty() {
            return Err(Reject::Protocol(format!(
                "{what} came with more than one fd"
            )));
        }
        Ok(fd)
    }

    fn expect_no_fd(&mut self, id: Id) -> Result<(), Reject> {
        let peer = self.peers.get_mut(id).expect("caller checked");
        if peer.fds.is_empty() {
            Ok(())
        } else {
            Err(Reject::Protocol(
                "a message without fds came with one".into(),
            ))
        }
    }

    /// Whether this peer may hand a process over.
    fn authorize(&self, cred: socket::PeerCred) -> Result<(), Reject> {
        if cred.pid == self.own_pid {
            return Err(Reject::Refused(
                NackCode::Denied,
                "the manager does not manage itself".into(),
            ));
        }
        match &self.cfg.policy {
            Policy::Tree => match is_descendant(cred.pid, self.own_pid) {
                Ok(true) => Ok(()),
                Ok(false) => Err(Reject::Refused(
                    NackCode::Denied,
                    format!(
                        "pid {} is not in the process tree of the command this manager runs",
                        cred.pid
                    ),
                )),
                Err(e) => Err(Reject::Refused(
                    NackCode::Denied,
                    format!("cannot check the ancestry of pid {}: {e}", cred.pid),
                )),
            },
            Policy::Uids(allowed) => {
                let me = nix::unistd::geteuid().as_raw();
                if cred.uid == me || cred.uid == 0 || allowed.contains(&cred.uid) {
                    Ok(())
                } else {
                    Err(Reject::Refused(
                        NackCode::Denied,
                        format!("uid {} is not allowed (see --allow-uid)", cred.uid),
                    ))
                }
            }
        }
    }

    /// The agent could not open a uffd: give it a `/dev/userfaultfd` fd if we may.
    fn grant(&mut self, id: Id) -> Result<(), Reject> {
        if !self.cfg.grant_device {
            return Err(Reject::Refused(
                NackCode::NoGrant,
                "the process cannot open a userfaultfd itself and this manager does not grant \
                 /dev/userfaultfd (start it with --grant-device, or run the process with \
                 CAP_SYS_PTRACE)"
                    .into(),
            ));
        }
        let dev = Uffd::open_device().map_err(|e| {
            Reject::Refused(
                NackCode::NoGrant,
                format!("cannot open /dev/userfaultfd to grant: {e}"),
            )
        })?;
        let peer = self.peers.get_mut(id).expect("caller checked");
        send_frame(&peer.stream, &Message::Grant, Some(dev.as_fd()))
            .map_err(|e| Reject::Protocol(format!("sending the grant failed: {e}")))?;
        peer.state = PeerState::AwaitHandoff;
        peer.deadline = Instant::now() + self.cfg.handshake_timeout;
        Ok(())
    }

    /// Take the uffd over: check it, enable the events, register the process's memory, start
    /// watching it, ack.
    fn attach(&mut self, id: Id, fd: OwnedFd) -> Result<(), Reject> {
        check_uffd(&fd)?;
        let uffd = Uffd::from_owned(fd);
        uffd.api(Features::NON_COOPERATIVE)
            .map_err(|e| Reject::Refused(NackCode::Setup, e.to_string()))?;
        let peer = self.peers.get(id).expect("caller checked");
        let pid = peer.cred.pid;
        check_peer_mm(&uffd, pid)?;
        let exe = if peer.exe.is_empty() {
            proc::exe(pid)
        } else {
            peer.exe.clone()
        };
        // An exec replaced the mm of any older space of this pid: let the probe find out.
        let older: Vec<Id> = self
            .spaces
            .iter()
            .filter(|(_, s)| s.pid == Some(pid))
            .map(|(i, _)| i)
            .collect();
        for old in older {
            self.probe(old);
        }
        let mut space = Space::new(
            uffd,
            Layout::new(),
            Origin::Handoff,
            FaultAround::new(self.cfg.fault_around_min, self.cfg.fault_around_max),
        );
        space.same_pidns = proc::pid_namespace(&pid.to_string()).ok() == self.own_pidns;
        let sid = self.spaces.insert(space);
        self.set_pid(sid, pid);
        if let Some(s) = self.spaces.get_mut(sid) {
            s.exe = exe;
        }
        let registered = self.rescan(sid);
        // The rescan probes the mm first: a process that exited (or exec'd) since it sent its
        // uffd has no space any more.
        let Some(s) = self.spaces.get(sid) else {
            return Err(Reject::Refused(
                NackCode::Setup,
                format!("pid {pid} is gone (exited or exec'd) since it sent its uffd"),
            ));
        };
        if let Err(e) = self.epoll.add(s.uffd.as_fd(), event_for(Token::Uffd(sid))) {
            self.close_space(sid, "epoll add failed");
            return Err(Reject::Refused(NackCode::Setup, format!("epoll: {e}")));
        }
        log::info!(
            "{}: handed over, {} registered",
            s.describe(sid),
            crate::stats::human_bytes(registered)
        );
        self.stats.handoffs += 1;
        self.stats.processes += 1;
        let peer = self.peers.get_mut(id).expect("caller checked");
        peer.state = PeerState::Attached(sid);
        self.reply(
            id,
            &Message::Ack {
                registered_bytes: registered,
            },
        )?;
        // Faults may have queued while the agent waited for the ack.
        self.to_drain.push(sid);
        Ok(())
    }

    /// A forked child's agent opens a channel for its Register requests. Its uffd came with
    /// the FORK event; the agent made its first fault (its "beacon" page) before connecting,
    /// so the space knows the child's pid by now.
    fn attach_forked(&mut self, id: Id, pid: u32) -> Result<(), Reject> {
        let candidates: Vec<Id> = self
            .spaces
            .iter()
            .filter(|(_, s)| s.pid == Some(pid))
            .map(|(i, _)| i)
            .collect();
        // More than one: an exec left a dead mm behind; the probe sorts them out.
        let live: Vec<Id> = candidates.into_iter().filter(|&c| self.probe(c)).collect();
        let Some(&space) = live.last() else {
            return Err(Reject::Refused(
                NackCode::Other,
                format!(
                    "no address space of pid {pid} is known (it is not a forked child of a \
                     managed process, or its first fault did not name it)"
                ),
            ));
        };
        let registered = self
            .spaces
            .get(space)
            .map_or(0, |s| s.layout.registered_bytes());
        let peer = self.peers.get_mut(id).expect("caller checked");
        peer.state = PeerState::Attached(space);
        log::debug!("pid {pid}: forked child opened a Register channel");
        self.reply(
            id,
            &Message::Ack {
                registered_bytes: registered,
            },
        )
    }

    fn reply(&mut self, id: Id, msg: &Message) -> Result<(), Reject> {
        let peer = self.peers.get(id).expect("caller checked");
        send_frame(&peer.stream, msg, None)
            .map_err(|e| Reject::Protocol(format!("sending the reply failed: {e}")))
    }

    /// The peer closed its end: the process exited or exec'd (the agent's socket is
    /// close-on-exec), or all its forked holders did. Check its space at once.
    fn peer_closed(&mut self, id: Id) {
        let state = self.peers.get(id).map(|p| p.state);
        if let Some(PeerState::AwaitHello | PeerState::AwaitHandoff) = state {
            let what = self.peers.get(id).map(|p| p.describe()).unwrap_or_default();
            log::info!("{what}: disconnected during the handshake");
            self.stats.protocol_errors += 1;
        }
        self.drop_peer(id, None);
        if let Some(PeerState::Attached(space)) = state {
            self.probe(space);
        }
    }

    /// Drop a peer, with a Nack and a log line when there is a reason.
    pub(crate) fn drop_peer(&mut self, id: Id, why: Option<Reject>) {
        let Some(peer) = self.peers.remove(id) else {
            return;
        };
        let _ = self.epoll.delete(peer.stream.as_fd());
        let Some(why) = why else { return };
        let (code, reason, refused) = match why {
            Reject::Refused(code, r) => (code, r, true),
            Reject::Protocol(r) => (NackCode::Malformed, r, false),
        };
        self.finish_drop(&peer, code, reason, refused);
    }

    fn finish_drop(&mut self, peer: &Peer, code: NackCode, reason: String, refused: bool) {
        if refused {
            self.stats.refused += 1;
            log::warn!("{}: refused: {reason}", peer.describe());
        } else {
            self.stats.protocol_errors += 1;
            log::warn!("{}: protocol error: {reason}; dropped", peer.describe());
        }
        let _ = send_frame(&peer.stream, &Message::Nack { code, reason }, None);
    }

    /// Peers that did not finish their handshake in time (slow or stuck) are dropped.
    pub(crate) fn expire_handshakes(&mut self, now: Instant) {
        let late: Vec<Id> = self
            .peers
            .iter()
            .filter(|(_, p)| !matches!(p.state, PeerState::Attached(_)) && now >= p.deadline)
            .map(|(i, _)| i)
            .collect();
        for id in late {
            let secs = self.cfg.handshake_timeout.as_secs_f64();
            self.drop_peer(
                id,
                Some(Reject::Protocol(format!(
                    "handshake not finished within {secs:.1} s"
                ))),
            );
        }
    }
}

/// A peer's fd must be a userfaultfd (a peer chooses what it sends).
pub(crate) fn check_uffd(fd: &OwnedFd) -> Result<(), Reject> {
    if sysfd::is_userfaultfd(fd.as_fd()) {
        return Ok(());
    }
    Err(Reject::Refused(
        NackCode::BadFd,
        format!(
            "the attached fd is {}, not a userfaultfd",
            sysfd::describe(fd.as_fd())
        ),
    ))
}

/// The uffd must be for the peer's own address space ([`crate::mm_check`]).
pub(crate) fn check_peer_mm(uffd: &Uffd, pid: u32) -> Result<(), Reject> {
    crate::mm_check::check_uffd_mm(uffd, pid)
        .map_err(|e| Reject::Refused(NackCode::BadFd, format!("pid {pid}: {e}")))
}

/// Send one frame in one go. Replies are small and a peer's socket buffer holds many, so a
/// short or blocked send means a peer that does not read: an error, never a wait.
fn send_frame(stream: &UnixStream, msg: &Message, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let frame = msg.encode();
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let n = socket::send_with_fds(stream.as_fd(), &frame, &fds)?;
    if n != frame.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short send: {n} of {} bytes", frame.len()),
        ));
    }
    Ok(())
}

/// Whether `pid` descends from `ancestor` (walking parent links; a subreaper keeps orphans in
/// the tree). A process that vanished on the way is not a descendant; any other failure to
/// read `/proc` (no fds left, say) is an error, not a verdict.
fn is_descendant(pid: u32, ancestor: u32) -> io::Result<bool> {
    let mut at = pid;
    for _ in 0..4096 {
        if at == ancestor {
            return Ok(true);
        }
        if at <= 1 {
            return Ok(false);
        }
        match proc::parent_pid(at) {
            Ok(p) => at = p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_descends_from_us_and_we_do_not_descend_from_it() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        assert!(is_descendant(child.id(), me).unwrap());
        assert!(!is_descendant(me, child.id()).unwrap());
        assert!(!is_descendant(1, me).unwrap());
        let _ = child.kill();
        let _ = child.wait();
    }
}
