//! The control socket (`--control`) and the metrics listener (`umm daemon --metrics`), served
//! by the manager's own loop and never blocking it: accepts are non-blocking, a connection
//! sends one short request, gets one answer written without waiting, and is closed. A peer
//! that sends too much, too slowly, or does not read its answer is dropped.

use std::io::{self, Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::epoll::{EpollEvent, EpollFlags};

use crate::manager::{event_for, Manager};
use crate::slab::{Id, Slab, Token};

/// A control request is one short line.
const CONTROL_REQUEST_MAX: usize = 256;
/// An HTTP request (request line and headers) is read into at most this much.
const HTTP_REQUEST_MAX: usize = 4096;
/// Connections open at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;
/// A connection that has not sent its request, or not read its answer, after this is dropped.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn is_http(&self) -> bool {
        matches!(self, Stream::Tcp(_))
    }
}

struct Conn {
    stream: Stream,
    input: Vec<u8>,
    /// The answer, once the request was read, and how much of it is written.
    output: Option<(Vec<u8>, usize)>,
    opened: Instant,
    /// A peer of another uid: its request is read (closing a unix socket with unread data
    /// resets it, and the peer would lose the line) and answered with this error.
    refused: Option<String>,
    /// The answer comes later (an attach running on a helper thread).
    deferred: bool,
}

/// What a complete request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Stat,
    Metrics,
    /// `attach [--strict] PID` (umm daemon): manage a running process; `--strict` also
    /// traces its mapping calls (as `umm attach --strict`).
    Attach {
        pid: u32,
        strict: bool,
    },
    /// `detach PID`: let go of a process (and the children it forked while managed).
    Detach(u32),
    /// Unknown control request or HTTP path: the text is for the error message.
    Unknown(String),
}

pub struct Control {
    unix: Option<UnixListener>,
    tcp: Option<TcpListener>,
    conns: Slab<Conn>,
    pub(crate) started: Instant,
    /// Control connections refused (wrong uid).
    pub(crate) refused: u64,
    pub(crate) rates: RateWindow,
}

/// Rates over the last window of about a second (sampled on the loop's tick).
#[derive(Default, Clone, Copy, Debug)]
pub struct RateWindow {
    last: Option<(Instant, u64, u64, u64)>,
    pub faults_per_s: f64,
    pub served_bytes_per_s: f64,
    pub background_bytes_per_s: f64,
}

impl RateWindow {
    pub fn sample(&mut self, now: Instant, faults: u64, served: u64, background: u64) {
        if let Some((at, f, s, b)) = self.last {
            let dt = now.duration_since(at).as_secs_f64();
            if dt < 1.0 {
                return;
            }
            self.faults_per_s = faults.saturating_sub(f) as f64 / dt;
            self.served_bytes_per_s = served.saturating_sub(s) as f64 / dt;
            self.background_bytes_per_s = background.saturating_sub(b) as f64 / dt;
        }
        self.last = Some((now, faults, served, background));
    }
}

impl Control {
    pub fn new(unix: Option<UnixListener>, tcp: Option<TcpListener>) -> io::Result<Control> {
        if let Some(l) = &unix {
            l.set_nonblocking(true)?;
        }
        if let Some(l) = &tcp {
            l.set_nonblocking(true)?;
        }
        Ok(Control {
            unix,
            tcp,
            conns: Slab::default(),
            started: Instant::now(),
            refused: 0,
            rates: RateWindow::default(),
        })
    }

    /// The live connection a token names.
    pub(crate) fn resolve(&self, token_id: Id) -> Option<Id> {
        self.conns.resolve(token_id)
    }
}

/// The control socket's file, removed when dropped (after the loop ended).
pub struct ControlFile(PathBuf);

impl Drop for ControlFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bind what was asked for: the control socket (0600, in a directory only its owner may
/// write, like the agents' socket) and the metrics listener.
pub fn open(
    control: Option<&Path>,
    metrics: Option<SocketAddr>,
) -> Result<(Option<Control>, Option<ControlFile>), String> {
    if control.is_none() && metrics.is_none() {
        return Ok((None, None));
    }
    let unix = match control {
        Some(path) => Some(crate::daemon::bind(path, &[]).map_err(|e| format!("--control: {e}"))?),
        None => None,
    };
    let file = control.map(|p| ControlFile(p.to_path_buf()));
    let tcp = match metrics {
        Some(addr) => {
            if !addr.ip().is_loopback() {
                log::warn!(
                    "--metrics {addr}: the metrics are served to anyone who can reach that                      address (no authentication)"
                );
            }
            Some(TcpListener::bind(addr).map_err(|e| {
                format!("--metrics: cannot listen on {addr}: {e}; choose another address or port")
            })?)
        }
        None => None,
    };
    let ctl = Control::new(unix, tcp).map_err(|e| format!("control socket: {e}"))?;
    Ok((Some(ctl), file))
}

/// Parse what a connection sent so far: None while incomplete.
pub fn parse_request(input: &[u8], http: bool) -> Option<Request> {
    let text = String::from_utf8_lossy(input);
    if http {
        let end = text.find("\r\n\r\n").or_else(|| text.find("\n\n"))?;
        let line = text[..end].lines().next().unwrap_or("");
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        return Some(if method == "GET" && path == "/metrics" {
            Request::Metrics
        } else {
            Request::Unknown(format!("{method} {target}"))
        });
    }
    let end = text.find('\n')?;
    Some(match text[..end].trim() {
        "stat" => Request::Stat,
        "metrics" => Request::Metrics,
        other => match other.split_once(' ') {
            Some(("attach", args)) => match parse_attach(args) {
                Some((pid, strict)) => Request::Attach { pid, strict },
                None => Request::Unknown(other.chars().take(64).collect()),
            },
            Some(("detach", pid)) if pid.trim().parse::<u32>().is_ok() => {
                Request::Detach(pid.trim().parse().expect("checked"))
            }
            _ => Request::Unknown(other.chars().take(64).collect()),
        },
    })
}

/// The arguments of `attach`: `PID` or `--strict PID`.
fn parse_attach(args: &str) -> Option<(u32, bool)> {
    let (strict, pid) = match args.trim().split_once(' ') {
        Some(("--strict", pid)) => (true, pid.trim()),
        Some(_) => return None,
        None => (false, args.trim()),
    };
    Some((pid.parse().ok()?, strict))
}

/// An HTTP/1.0 response that closes the connection.
fn http_response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Manager {
    /// Serve `control` from this loop.
    pub fn attach_control(&mut self, control: Control) -> io::Result<()> {
        if let Some(l) = &control.unix {
            self.epoll.add(l, event_for(Token::ControlListener))?;
        }
        if let Some(l) = &control.tcp {
            self.epoll.add(l, event_for(Token::MetricsListener))?;
        }
        self.control = Some(control);
        Ok(())
    }

    pub(crate) fn accept_control(&mut self, http: bool) {
        let me = nix::unistd::geteuid().as_raw();
        loop {
            let Some(ctl) = self.control.as_mut() else {
                return;
            };
            let accepted = if http {
                match ctl.tcp.as_ref().map(|l| l.accept()) {
                    Some(Ok((s, _))) => Stream::Tcp(s),
                    Some(Err(e)) => return self.accept_failed(e),
                    None => return,
                }
            } else {
                match ctl.unix.as_ref().map(|l| l.accept()) {
                    Some(Ok((s, _))) => Stream::Unix(s),
                    Some(Err(e)) => return self.accept_failed(e),
                    None => return,
                }
            };
            let mut refused = None;
            if let Stream::Unix(s) = &accepted {
                // Root or the manager's own uid only: the answer describes every managed
                // process.
                match umm::sys::socket::peer_cred(s) {
                    Ok(c) if c.uid == 0 || c.uid == me => {}
                    Ok(c) => {
                        ctl.refused += 1;
                        log::warn!(
                            "control socket: refused peer pid {} uid {} (only root and uid {me} \
                             may ask)",
                            c.pid,
                            c.uid
                        );
                        refused = Some(format!(
                            "error: uid {} may not use this control socket\n",
                            c.uid
                        ));
                    }
                    Err(e) => {
                        ctl.refused += 1;
                        log::warn!("control socket: peer without credentials ({e}); dropped");
                        continue;
                    }
                }
            }
            if ctl.conns.len() >= MAX_CONNECTIONS {
                log::warn!(
                    "{}: {MAX_CONNECTIONS} connections already open; a new one was closed",
                    if http { "metrics" } else { "control socket" }
                );
                continue;
            }
            let nonblocking = match &accepted {
                Stream::Unix(s) => s.set_nonblocking(true),
                Stream::Tcp(s) => s.set_nonblocking(true),
            };
            if let Err(e) = nonblocking {
                log::warn!("control connection: cannot make it non-blocking ({e}); dropped");
                continue;
            }
            let id = ctl.conns.insert(Conn {
                stream: accepted,
                input: Vec::new(),
                output: None,
                opened: Instant::now(),
                refused,
                deferred: false,
            });
            let conn = ctl.conns.get(id).expect("just inserted");
            if let Err(e) = self
                .epoll
                .add(conn.stream.as_fd(), event_for(Token::ControlConn(id)))
            {
                log::warn!("control connection: epoll add failed ({e}); dropped");
                ctl.conns.remove(id);
            }
        }
    }

    fn accept_failed(&mut self, e: io::Error) {
        if e.kind() != io::ErrorKind::WouldBlock {
            log::warn!("control/metrics accept failed: {e}");
        }
    }

    /// A connection is readable (its request) or writable (the rest of its answer).
    pub(crate) fn on_control_conn(&mut self, id: Id) {
        let Some(ctl) = self.control.as_mut() else {
            return;
        };
        let Some(conn) = ctl.conns.get_mut(id) else {
            return;
        };
        if conn.output.is_some() {
            self.flush_control(id);
            return;
        }
        if conn.deferred {
            // Waiting for its answer; anything more it sends is not read.
            let mut ev = EpollEvent::new(EpollFlags::empty(), Token::ControlConn(id).encode());
            let _ = self.epoll.modify(conn.stream.as_fd(), &mut ev);
            return;
        }
        let http = conn.stream.is_http();
        let max = if http {
            HTTP_REQUEST_MAX
        } else {
            CONTROL_REQUEST_MAX
        };
        let mut buf = [0u8; 512];
        let request = loop {
            let room = (max - conn.input.len()).min(buf.len());
            if room == 0 {
                break Some(Request::Unknown("(request too long)".to_string()));
            }
            match conn.stream.read(&mut buf[..room]) {
                Ok(0) => return self.drop_control(id, None),
                Ok(n) => {
                    conn.input.extend_from_slice(&buf[..n]);
                    if let Some(r) = parse_request(&conn.input, http) {
                        break Some(r);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_control(id, Some(&format!("read failed: {e}"))),
            }
        };
        let Some(request) = request else {
            return; // more to come
        };
        let answer = match (conn.refused.take(), &request) {
            (Some(error), _) => error.into_bytes(),
            (None, Request::Attach { pid, strict }) if !http => match self
                .start_attach(id, *pid, *strict)
            {
                Ok(()) => {
                    if let Some(conn) = self.control.as_mut().and_then(|c| c.conns.get_mut(id)) {
                        conn.deferred = true;
                    }
                    return;
                }
                Err(e) => format!("error: {e}\n").into_bytes(),
            },
            (None, _) => self.answer(&request, http),
        };
        if let Some(conn) = self.control.as_mut().and_then(|c| c.conns.get_mut(id)) {
            conn.output = Some((answer, 0));
        }
        self.flush_control(id);
    }

    fn answer(&mut self, request: &Request, http: bool) -> Vec<u8> {
        match (request, http) {
            (Request::Stat, _) => {
                let mut json =
                    serde_json::to_string(&self.live_snapshot()).expect("the snapshot serializes");
                json.push('\n');
                json.into_bytes()
            }
            (Request::Metrics, false) => self.metrics_text().into_bytes(),
            (Request::Detach(pid), false) => {
                let n = self.detach_pid(*pid);
                if n == 0 {
                    format!("error: pid {pid} is not managed here\n").into_bytes()
                } else {
                    log::info!("pid {pid}: detached ({n} address spaces let go)");
                    format!("ok detached pid {pid} ({n} address spaces)\n").into_bytes()
                }
            }
            (Request::Attach { pid, .. }, false) => {
                // Deferred by the caller; reached only if that changes.
                format!("error: cannot attach to pid {pid} from here\n").into_bytes()
            }
            (Request::Attach { .. } | Request::Detach(_), true) => http_response(
                "404 Not Found",
                "text/plain; charset=utf-8",
                "only GET /metrics is served here\n",
            ),
            (Request::Metrics, true) => http_response(
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &self.metrics_text(),
            ),
            (Request::Unknown(what), false) => {
                log::info!("control socket: unknown request {what:?}");
                format!(
                    "error: unknown request {what:?}; ask `stat`, `metrics`, `attach [--strict] \
                     PID` or `detach PID`\n"
                )
                .into_bytes()
            }
            (Request::Unknown(what), true) => {
                log::info!("metrics: {what:?} is not served (only GET /metrics)");
                http_response(
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "only GET /metrics is served here\n",
                )
            }
        }
    }

    /// The answer of a deferred request (an attach): write it now.
    pub(crate) fn answer_later(&mut self, id: Id, answer: Vec<u8>) {
        let Some(conn) = self.control.as_mut().and_then(|c| c.conns.get_mut(id)) else {
            return; // gone meanwhile (deadline or peer closed)
        };
        conn.deferred = false;
        conn.output = Some((answer, 0));
        self.flush_control(id);
    }

    /// Write what the socket takes now; the rest waits for EPOLLOUT (until the deadline).
    fn flush_control(&mut self, id: Id) {
        let Some(conn) = self.control.as_mut().and_then(|c| c.conns.get_mut(id)) else {
            return;
        };
        let Some((out, done)) = conn.output.as_mut() else {
            return;
        };
        while *done < out.len() {
            match conn.stream.write(&out[*done..]) {
                Ok(0) => return self.drop_control(id, Some("wrote nothing")),
                Ok(n) => *done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut ev =
                        EpollEvent::new(EpollFlags::EPOLLOUT, Token::ControlConn(id).encode());
                    let _ = self.epoll.modify(conn.stream.as_fd(), &mut ev);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_control(id, Some(&format!("write failed: {e}"))),
            }
        }
        if let Stream::Tcp(s) = &conn.stream {
            let _ = s.shutdown(NetShutdown::Write);
        }
        self.drop_control(id, None);
    }

    fn drop_control(&mut self, id: Id, why: Option<&str>) {
        let Some(conn) = self.control.as_mut().and_then(|c| c.conns.remove(id)) else {
            return;
        };
        let _ = self.epoll.delete(conn.stream.as_fd());
        if let Some(why) = why {
            log::info!("control connection dropped: {why}");
        }
    }

    /// On the loop's tick: update the rates; drop connections past their deadline.
    pub(crate) fn control_tick(&mut self, now: Instant) {
        let (faults, served) = (self.stats.faults, self.stats.bytes_served);
        let background = self.stats.background_bytes;
        let Some(ctl) = self.control.as_mut() else {
            return;
        };
        ctl.rates.sample(now, faults, served, background);
        let late: Vec<Id> = ctl
            .conns
            .iter()
            .filter(|(_, c)| now.duration_since(c.opened) > CONNECTION_DEADLINE)
            .map(|(id, _)| id)
            .collect();
        for id in late {
            self.drop_control(
                id,
                Some("no complete request or answer not read in time (peer too slow)"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_requests_are_one_line() {
        assert_eq!(parse_request(b"sta", false), None);
        assert_eq!(parse_request(b"stat\n", false), Some(Request::Stat));
        assert_eq!(
            parse_request(b" metrics \r\n", false),
            Some(Request::Metrics)
        );
        assert!(matches!(
            parse_request(b"quit\n", false),
            Some(Request::Unknown(_))
        ));
    }

    #[test]
    fn attach_and_detach_take_a_pid() {
        assert_eq!(
            parse_request(b"attach 42\n", false),
            Some(Request::Attach {
                pid: 42,
                strict: false
            })
        );
        assert_eq!(
            parse_request(b"attach --strict 42\n", false),
            Some(Request::Attach {
                pid: 42,
                strict: true
            })
        );
        assert_eq!(
            parse_request(b"detach 7\n", false),
            Some(Request::Detach(7))
        );
        for bad in [
            &b"attach\n"[..],
            b"attach x\n",
            b"detach -1\n",
            b"attach 1 2\n",
            b"attach --strict\n",
            b"attach --strict x\n",
            b"attach --loose 1\n",
            b"attach 1 --strict\n",
        ] {
            assert!(
                matches!(parse_request(bad, false), Some(Request::Unknown(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn http_requests_need_their_headers_and_the_metrics_path() {
        assert_eq!(parse_request(b"GET /metrics HTTP/1.0\r\n", true), None);
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n", true),
            Some(Request::Metrics)
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", true),
            Some(Request::Metrics)
        );
        assert!(matches!(
            parse_request(b"GET / HTTP/1.0\r\n\r\n", true),
            Some(Request::Unknown(_))
        ));
        assert!(matches!(
            parse_request(b"POST /metrics HTTP/1.0\r\n\r\n", true),
            Some(Request::Unknown(_))
        ));
    }

    #[test]
    fn rates_cover_at_least_a_second() {
        let mut r = RateWindow::default();
        let t0 = Instant::now();
        r.sample(t0, 0, 0, 0);
        r.sample(t0 + Duration::from_millis(500), 50, 0, 0);
        assert_eq!(r.faults_per_s, 0.0);
        r.sample(t0 + Duration::from_secs(2), 200, 4096, 0);
        assert_eq!(r.faults_per_s, 100.0);
        assert_eq!(r.served_bytes_per_s, 2048.0);
    }
}
