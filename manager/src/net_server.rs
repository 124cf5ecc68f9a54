//! `umm page-server --image DIR --listen ADDR:PORT --key FILE`: serve an image over TCP to
//! `umm restore --source tcp://ADDR:PORT` (protocol: `umm::netproto`, umm-protocol(5)).
//!
//! Blocking I/O, a thread per connection (this is not the event loop: no uffd here). Per
//! restore, after the handshake: this thread reads Gets into a queue with two levels, and a
//! writer thread answers urgent Gets before every queued background one. A client that can
//! also opens a second, urgent-only connection that joins the first one's session ([`Sessions`],
//! `Join` in umm-protocol(5)); its own thread answers its Gets one by one, so a fault's Data
//! never waits behind background bytes in the first connection's socket buffers (QEMU's
//! postcopy-preempt channel). The first connection's end ends it.
//!
//! Every chunk sent is verified against the image's checksum table first (`Image::data`); a
//! bad chunk is never sent: the client gets an Error and its restore stops. Every frame after
//! the handshake is sealed (MAC and sequence number, `np::Sealer`); a client frame that fails
//! its MAC drops the connection at once.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use clap::Args;

use umm::image::{Image, Manifest, CHUNK_SIZE};
use umm::netproto::{self as np, Frame, Key, Opener, Role, Sealer};

use crate::net_tls::{self, NetStream, ServerTlsArgs};

/// Test-only: flip one byte of this chunk (by index) in every Data frame that carries it,
/// after its checksum was computed (corruption in transit). Documented in umm(1) as test-only.
pub const CORRUPT_ENV: &str = "UMM_TEST_CORRUPT_CHUNK";
/// Test-only: flip one byte of this chunk (by index) in every Data frame that carries it,
/// AFTER the frame was sealed (an injection into the TCP stream). Test-only, like CORRUPT_ENV.
pub const TAMPER_ENV: &str = "UMM_TEST_TAMPER_SEALED_CHUNK";
/// Test-only: set, the server neither offers nor accepts urgent connections (what a client
/// does with a server without them).
pub const NO_URGENT_ENV: &str = "UMM_TEST_NO_URGENT_CONNECTION";

const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
/// A client that stops reading does not hold a writer thread forever.
const WRITE_WAIT: Duration = Duration::from_secs(120);
/// How a refused peer's error begins (already logged).
pub const REFUSED: &str = "refused: ";
/// The wait after a failed `accept`: out of fds (EMFILE, ENFILE) it fails at once for as
/// long as a connection waits in the backlog, and a loop without a wait spins a CPU.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Say why `accept` failed, then wait a little before the next try.
pub fn accept_failed(e: &std::io::Error) {
    log::warn!("accept: {e} (trying again in {ACCEPT_RETRY:?})");
    std::thread::sleep(ACCEPT_RETRY);
}

/// How long a whole handshake (TLS, authentication, manifest) may take where it holds up
/// others: each read has its own timeout, but a peer trickling a byte now and then could
/// otherwise stretch it without end. Test hook: `UMM_TEST_HANDSHAKE_DEADLINE_MS`.
pub fn handshake_deadline() -> Duration {
    std::env::var("UMM_TEST_HANDSHAKE_DEADLINE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis)
}

/// Shuts a connection down unless dropped within its limit (a blocked read then returns),
/// with one log line: bounds a handshake that runs on a thread others wait for.
pub struct HandshakeDeadline {
    _cancel: crossbeam_channel::Sender<()>,
}

impl HandshakeDeadline {
    pub fn start(socket: &TcpStream, peer: &str, limit: Duration) -> std::io::Result<Self> {
        let socket = socket.try_clone()?;
        let peer = peer.to_string();
        let (cancel, cancelled) = crossbeam_channel::bounded::<()>(0);
        crate::helper_thread::spawn("umm-hs-deadline", move || {
            // Dropping the guard disconnects the channel: the handshake ended in time.
            if let Err(crossbeam_channel::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit)
            {
                log::warn!("{peer}: handshake not done within {limit:?}; connection closed");
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        })?;
        Ok(HandshakeDeadline { _cancel: cancel })
    }
}

/// What a page server serves: an image's manifest and checksum table, and its data by
/// data-file offset. An image directory (`umm page-server`) or a frozen live process
/// (`umm migrate-source`).
pub trait ServedData: Send + Sync {
    fn manifest(&self) -> &Manifest;
    /// CRC-32C of each chunk of the data.
    fn checksums(&self) -> &[u32];
    /// `len` bytes at data offset `offset` (checked by `check_get`), verified against the
    /// checksum table: a chunk that does not match is an error, never sent.
    fn read(&self, offset: u64, len: u64) -> Result<Cow<'_, [u8]>, String>;
    /// `offset..offset + len` was written to the client's socket.
    fn sent(&self, _offset: u64, _len: u64) {}
}

impl ServedData for Image {
    fn manifest(&self) -> &Manifest {
        Image::manifest(self)
    }
    fn checksums(&self) -> &[u32] {
        Image::checksums(self)
    }
    fn read(&self, offset: u64, len: u64) -> Result<Cow<'_, [u8]>, String> {
        // Straight from the mapping: no copy before the socket.
        self.data(offset, len)
            .map(Cow::Borrowed)
            .map_err(|e| format!("{e}"))
    }
}

#[derive(Args, Debug)]
pub struct PageServerArgs {
    /// The image directory to serve (written by umm snapshot).
    #[arg(long, value_name = "DIR")]
    image: PathBuf,
    /// Address and port to listen on (port 0: any free port; the one chosen is printed).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The pre-shared key file (at least 16 bytes; a final newline is ignored). Clients must
    /// prove they hold the same key.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Keep serving after a client said its restore is complete (default: exit then).
    #[arg(long)]
    keep_serving: bool,
    /// Verify every chunk of the image before listening (else each chunk is verified before
    /// it is first sent).
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    tls: ServerTlsArgs,
}

pub fn main(args: PageServerArgs) -> i32 {
    match serve(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("umm: page-server: {e}");
            1
        }
    }
}

fn serve(args: PageServerArgs) -> Result<(), String> {
    let key = Key::from_file(&args.key)?;
    let tls = args.tls.load()?;
    let image = Image::open(&args.image).map_err(|e| format!("cannot serve {e}"))?;
    if args.verify {
        image.verify_all().map_err(|e| format!("{e}"))?;
    }
    let image: Arc<dyn ServedData> = Arc::new(image);
    let corrupt = TestHooks::from_env();
    let sessions = Sessions::default();
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("listening socket: {e}"))?;
    eprintln!(
        "umm: page-server: serving {} ({} of data) on {local}{}",
        args.image.display(),
        umm::human_bytes(image.manifest().data_len),
        if tls.is_some() { " (TLS)" } else { "" }
    );
    let keep_serving = args.keep_serving;
    serve_connections(&listener, "umm-ps-conn", move |socket, peer| {
        let ended = net_tls::accept(socket, &peer, tls.as_ref())
            .and_then(|stream| connection(stream, &peer, &image, &key, corrupt, &sessions));
        match ended {
            Ok(true) if !keep_serving => {
                eprintln!("umm: page-server: {peer} completed its restore; exiting");
                std::process::exit(0);
            }
            Ok(true) => log::info!("{peer} completed its restore"),
            Ok(false) => log::info!("{peer} closed the connection"),
            // Said in one line already.
            Err(e) if e.starts_with(REFUSED) => {}
            Err(e) => log::warn!("{peer}: {e}"),
        }
    });
    Ok(())
}

/// Test-only damage to the Data frames sent (umm(1), ENVIRONMENT).
#[derive(Clone, Copy, Debug, Default)]
pub struct TestHooks {
    /// Flip a byte of this chunk before the frame is sealed (the CRC-32C catches it).
    pub corrupt_chunk: Option<u64>,
    /// Flip a byte of this chunk after the frame is sealed (the MAC catches it).
    pub tamper_chunk: Option<u64>,
    /// Neither offer nor accept urgent connections.
    pub no_urgent_connection: bool,
}

impl TestHooks {
    pub fn from_env() -> TestHooks {
        let chunk = |name: &str| {
            let c = std::env::var(name).ok()?.parse::<u64>().ok()?;
            log::warn!("{name}={c}: TEST HOOK, a byte of chunk {c} is flipped when sent");
            Some(c)
        };
        let no_urgent_connection = std::env::var_os(NO_URGENT_ENV).is_some();
        if no_urgent_connection {
            log::warn!("{NO_URGENT_ENV}: TEST HOOK, no urgent connections");
        }
        TestHooks {
            corrupt_chunk: chunk(CORRUPT_ENV),
            tamper_chunk: chunk(TAMPER_ENV),
            no_urgent_connection,
        }
    }

    /// The features this server offers.
    fn features(&self) -> u32 {
        if self.no_urgent_connection {
            np::FEATURES & !np::FEATURE_URGENT_CONNECTION
        } else {
            np::FEATURES
        }
    }
}

/// Flip a byte of `chunk` in `bytes` (the data at `offset`), if it is there.
fn flip_chunk(bytes: &mut [u8], offset: u64, chunk: u64) -> bool {
    let first = offset / CHUNK_SIZE;
    let at = chunk
        .checked_sub(first)
        .map(|i| i * CHUNK_SIZE)
        .filter(|&i| i < bytes.len() as u64);
    if let Some(i) = at {
        bytes[i as usize] ^= 0x40;
    }
    at.is_some()
}

/// The Gets a connection has queued: faults' first.
#[derive(Default)]
struct Queue {
    urgent: VecDeque<(u64, u64, u32)>,
    background: VecDeque<(u64, u64, u32)>,
    /// The reader is done: Some(true) on Complete, Some(false) on close or error.
    ended: Option<bool>,
    /// What the writer tells the client before it closes (a bad request).
    error: Option<String>,
}

type Shared = Arc<(Mutex<Queue>, Condvar)>;

/// A session's urgent connection: none yet, joined (a clone, to shut it down when the
/// session ends), or gone (its client closed it; no second one is taken).
enum Urgent {
    None,
    Joined(NetStream),
    Left,
}

/// The restores a server is serving, by join id (`SessionKey::join_id`): where an urgent
/// connection finds the session it belongs to.
#[derive(Clone, Default)]
pub struct Sessions {
    by_id: Arc<Mutex<HashMap<[u8; np::MAC_LEN], Urgent>>>,
    /// Only urgent connections are taken (`umm migrate-source` has its one destination).
    joins_only: Arc<std::sync::atomic::AtomicBool>,
}

impl Sessions {
    /// From now on, a restore's first connection (Hello) is refused; urgent ones still join.
    pub fn take_joins_only(&self) {
        self.joins_only
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn joins_only(&self) -> bool {
        self.joins_only.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn register(&self, id: [u8; np::MAC_LEN]) {
        self.lock().insert(id, Urgent::None);
    }

    /// `stream` joins session `id` as its urgent connection (one per session).
    fn join(&self, id: &[u8; np::MAC_LEN], stream: &NetStream) -> Result<(), String> {
        let mut sessions = self.lock();
        match sessions.get_mut(id) {
            None => Err("no such session (unknown or ended)".into()),
            Some(Urgent::Joined(_) | Urgent::Left) => {
                Err("the session has (had) an urgent connection already".into())
            }
            Some(slot) => {
                let clone = stream.try_clone().map_err(|e| format!("socket: {e}"))?;
                *slot = Urgent::Joined(clone);
                Ok(())
            }
        }
    }

    /// Session `id`'s urgent connection ended: its socket is released now (the client sees
    /// the close), not when the session ends.
    fn left(&self, id: &[u8; np::MAC_LEN]) {
        if let Some(slot) = self.lock().get_mut(id) {
            *slot = Urgent::Left;
        }
    }

    /// Session `id` ended: its urgent connection (if any) ends too.
    fn end(&self, id: &[u8; np::MAC_LEN]) {
        if let Some(Urgent::Joined(urgent)) = self.lock().remove(id) {
            let _ = urgent.shutdown(std::net::Shutdown::Both);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; np::MAC_LEN], Urgent>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One connection, to its end. Ok(true): its client completed its restore.
fn connection(
    mut stream: NetStream,
    peer: &str,
    image: &Arc<dyn ServedData>,
    key: &Key,
    hooks: TestHooks,
    sessions: &Sessions,
) -> Result<bool, String> {
    match handshake(&mut stream, peer, image.as_ref(), key, hooks, sessions)? {
        Opened::Restore(session) => answer(stream, session, image, hooks, sessions),
        Opened::Urgent(session) => answer_urgent(stream, session, image.as_ref(), hooks, sessions),
    }
}

/// One authenticated connection's sealing state, both directions.
pub struct Session {
    pub sealer: Sealer,
    pub opener: Opener,
    /// The id an urgent connection joins this one by (a restore's first connection).
    join_id: [u8; np::MAC_LEN],
    /// The session an urgent connection joined.
    joined: Option<[u8; np::MAC_LEN]>,
}

/// What an authenticated connection is.
pub enum Opened {
    /// A restore's first connection: the manifest was sent; it is registered in `Sessions`.
    Restore(Session),
    /// An urgent connection that joined a registered restore.
    Urgent(Session),
}

/// Authenticate the client (a refusal's error starts with [`REFUSED`]); a restore's first
/// connection is registered and sent the manifest, sealed; an urgent one joins its session.
pub fn handshake(
    stream: &mut NetStream,
    peer: &str,
    image: &dyn ServedData,
    key: &Key,
    hooks: TestHooks,
    sessions: &Sessions,
) -> Result<Opened, String> {
    let _ = stream.set_read_timeout(Some(HANDSHAKE_WAIT));
    let _ = stream.set_write_timeout(Some(WRITE_WAIT));
    let (session_key, joins) = authenticate(stream, peer, key, hooks, sessions)?;
    let mut session = Session {
        sealer: session_key.sealer(Role::Server),
        opener: session_key.opener(Role::Client),
        join_id: session_key.join_id(),
        joined: None,
    };
    if let Some(id) = joins {
        if let Err(why) = sessions.join(&id, stream) {
            log::warn!("refused {peer}'s urgent connection: {why}");
            let error = Frame::Error {
                code: np::ERR_SESSION,
                msg: format!("urgent connection refused: {why}"),
            };
            let _ = session.sealer.write(stream, &error);
            return Err(format!("{REFUSED}{why}"));
        }
        let joined = Frame::Join {
            features: hooks.features(),
            session: id,
        };
        if let Err(e) = session.sealer.write(stream, &joined) {
            sessions.left(&id);
            return Err(format!("urgent connection: sending Join: {e}"));
        }
        session.joined = Some(id);
        let _ = stream.set_read_timeout(None);
        log::info!("{peer}: urgent connection joined its session");
        return Ok(Opened::Urgent(session));
    }
    // Registered before the manifest goes: the client joins as soon as it has it.
    sessions.register(session.join_id);
    let m = image.manifest();
    session
        .sealer
        .write(
            stream,
            &Frame::Manifest {
                data_len: m.data_len,
                checksums: image.checksums().to_vec(),
                json: m.to_json().into_bytes(),
            },
        )
        .map_err(|e| {
            sessions.end(&session.join_id);
            format!("sending the manifest: {e}")
        })?;
    let _ = stream.set_read_timeout(None);
    log::info!("{peer}: authenticated; manifest sent");
    Ok(Opened::Restore(session))
}

/// Answer an authenticated client's Gets until it completes (Ok(true)), closes (Ok(false)) or
/// fails.
pub fn answer(
    stream: NetStream,
    session: Session,
    image: &Arc<dyn ServedData>,
    hooks: TestHooks,
    sessions: &Sessions,
) -> Result<bool, String> {
    let join_id = session.join_id;
    let ended = answer_queued(stream, session, image, hooks);
    sessions.end(&join_id);
    ended
}

/// [`answer`]'s work: a reader (this thread) and a writer with a two-level queue.
fn answer_queued(
    mut stream: NetStream,
    session: Session,
    image: &Arc<dyn ServedData>,
    hooks: TestHooks,
) -> Result<bool, String> {
    let m = image.manifest();
    let Session {
        sealer, mut opener, ..
    } = session;

    let shared: Shared = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    let writer = {
        let (stream, shared, image) = (
            stream.try_clone().map_err(|e| format!("socket: {e}"))?,
            shared.clone(),
            image.clone(),
        );
        std::thread::Builder::new()
            .name("umm-ps-writer".into())
            .spawn(move || answer_gets(stream, sealer, &shared, image.as_ref(), hooks))
            .map_err(|e| format!("cannot start a writer: {e}"))?
    };
    let data_len = m.data_len;
    let ended = loop {
        match read_request(&mut opener, &mut stream, data_len) {
            Ok(Request::Get {
                id,
                offset,
                len,
                urgent,
            }) => {
                let (lock, cv) = &*shared;
                let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
                if urgent {
                    q.urgent.push_back((id, offset, len));
                } else {
                    q.background.push_back((id, offset, len));
                }
                cv.notify_one();
            }
            Ok(Request::Complete) => break Ok(true),
            Ok(Request::Close) => break Ok(false),
            Err(RequestError::Protocol(e) | RequestError::Connection(e)) => break Err(e),
        }
    };
    {
        // The writer says a bad request's error (it owns the sending sequence) and closes.
        let (lock, cv) = &*shared;
        let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
        q.ended = Some(matches!(ended, Ok(true)));
        q.error = ended.as_ref().err().cloned();
        cv.notify_one();
    }
    let _ = writer.join();
    ended
}

/// Take urgent connections that join the sessions in `sessions` (only those), each on a
/// thread of its own, until the process ends: `umm migrate-source` after its one destination
/// connected.
pub fn accept_urgent(
    listener: TcpListener,
    image: Arc<dyn ServedData>,
    key: Key,
    sessions: Sessions,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    sessions.take_joins_only();
    serve_connections(&listener, "umm-ps-urgent", move |socket, peer| {
        let mut stream = match net_tls::accept(socket, &peer, tls.as_ref()) {
            Ok(s) => s,
            Err(e) if e.starts_with(REFUSED) => return,
            Err(e) => return log::warn!("{peer}: {e}"),
        };
        let hooks = TestHooks::default();
        match handshake(&mut stream, &peer, image.as_ref(), &key, hooks, &sessions) {
            Ok(Opened::Urgent(session)) => {
                if let Err(e) = answer_urgent(stream, session, image.as_ref(), hooks, &sessions) {
                    log::info!("{peer}: {e}");
                }
            }
            // Cannot happen (joins only: Hello is refused); said, not served.
            Ok(Opened::Restore(_)) => log::warn!("{peer}: a second destination"),
            Err(e) if e.starts_with(REFUSED) => {}
            Err(e) => log::warn!("{peer}: {e}"),
        }
    });
}

/// Take connections until the process ends, each served by `serve(socket, peer address)` on
/// a thread of its own named `name`.
fn serve_connections<F>(listener: &TcpListener, name: &str, serve: F)
where
    F: Fn(TcpStream, String) + Clone + Send + 'static,
{
    for conn in listener.incoming() {
        let socket = match conn {
            Ok(s) => s,
            Err(e) => {
                accept_failed(&e);
                continue;
            }
        };
        let peer = socket
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let serve = serve.clone();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serve(socket, peer));
        if let Err(e) = spawned {
            log::warn!("cannot start a connection thread ({name}): {e}");
        }
    }
}

/// An urgent connection's Gets, answered one by one in order, until the client closes it
/// (or the restore's first connection ends, which shuts this one down). Ok(false) always:
/// only the first connection completes a restore.
fn answer_urgent(
    stream: NetStream,
    session: Session,
    image: &dyn ServedData,
    hooks: TestHooks,
    sessions: &Sessions,
) -> Result<bool, String> {
    let joined = session.joined;
    let ended = answer_urgent_gets(stream, session, image, hooks);
    if let Some(id) = joined {
        sessions.left(&id);
    }
    ended
}

/// [`answer_urgent`]'s work.
fn answer_urgent_gets(
    mut stream: NetStream,
    session: Session,
    image: &dyn ServedData,
    hooks: TestHooks,
) -> Result<bool, String> {
    let Session {
        mut sealer,
        mut opener,
        ..
    } = session;
    let data_len = image.manifest().data_len;
    loop {
        match read_request(&mut opener, &mut stream, data_len) {
            Ok(Request::Get {
                id, offset, len, ..
            }) => send_data(&mut stream, &mut sealer, image, hooks, (id, offset, len))?,
            Ok(Request::Close) => return Ok(false),
            // Only the first connection completes a restore.
            Ok(Request::Complete) => {
                return refuse_request(&mut stream, &mut sealer, "unexpected Complete".into())
            }
            Err(RequestError::Protocol(e)) => return refuse_request(&mut stream, &mut sealer, e),
            // The first connection ended and shut this one down, or the peer reset it.
            Err(RequestError::Connection(e)) => return Err(format!("urgent connection: {e}")),
        }
    }
}

/// Tell an urgent connection's client why its request is refused, and close.
fn refuse_request(
    stream: &mut NetStream,
    sealer: &mut Sealer,
    why: String,
) -> Result<bool, String> {
    let error = Frame::Error {
        code: np::ERR_PROTOCOL,
        msg: why.clone(),
    };
    let _ = sealer.write(stream, &error);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Err(format!("urgent connection: {why}"))
}

/// A client's next request, checked against the data's size.
enum Request {
    Get {
        id: u64,
        offset: u64,
        len: u32,
        urgent: bool,
    },
    Complete,
    /// Close, or the end of the stream between frames.
    Close,
}

/// Why no request was read: the client broke the protocol (it may be told), or the
/// connection is unusable (nothing more is said on it).
enum RequestError {
    Protocol(String),
    Connection(String),
}

fn read_request(
    opener: &mut Opener,
    stream: &mut NetStream,
    data_len: u64,
) -> Result<Request, RequestError> {
    let frame = match opener.read(stream, np::MAX_SMALL_FRAME) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Request::Close),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            // Nothing more is said to a stream someone may be writing into.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Err(RequestError::Connection(format!(
                "connection dropped: refused a request: {e}"
            )));
        }
        Err(e) => return Err(RequestError::Connection(format!("reading a request: {e}"))),
    };
    match frame {
        Frame::Get {
            id,
            offset,
            len,
            flags,
        } => {
            np::check_get(offset, len, flags, data_len).map_err(RequestError::Protocol)?;
            Ok(Request::Get {
                id,
                offset,
                len,
                urgent: flags & np::GET_URGENT != 0,
            })
        }
        Frame::Complete => Ok(Request::Complete),
        Frame::Close => Ok(Request::Close),
        f => Err(RequestError::Protocol(format!("unexpected {f:?}"))),
    }
}

/// Hello (or Join) → Challenge; Auth checked; → Welcome. A wrong key is refused with one log
/// line. Ok: the connection's session key, and the session a Join asks to join.
fn authenticate(
    stream: &mut NetStream,
    peer: &str,
    key: &Key,
    hooks: TestHooks,
    sessions: &Sessions,
) -> Result<(np::SessionKey, Option<[u8; np::MAC_LEN]>), String> {
    type Authenticated = (np::SessionKey, Option<[u8; np::MAC_LEN]>);
    let refuse = |stream: &mut NetStream, why: String| -> Result<Authenticated, String> {
        log::warn!("refused {peer}: {why}");
        let _ = np::write_frame(
            stream,
            &Frame::Error {
                code: np::ERR_AUTH,
                msg: "authentication failed".into(),
            },
        );
        Err(format!("{REFUSED}{why}"))
    };
    let joins = match np::read_frame_max(stream, np::MAX_SMALL_FRAME) {
        Ok(Frame::Hello { .. }) if sessions.joins_only() => {
            return refuse(stream, "a destination is being served already".into())
        }
        Ok(Frame::Hello { .. }) => None,
        Ok(Frame::Join { session, .. }) if !hooks.no_urgent_connection => Some(session),
        Ok(f) => return refuse(stream, format!("sent {f:?} instead of Hello")),
        Err(e) => return refuse(stream, format!("no Hello ({e})")),
    };
    let server = np::nonce().map_err(|e| format!("no random nonce: {e}"))?;
    np::write_frame(
        stream,
        &Frame::Challenge {
            features: hooks.features(),
            nonce: server,
        },
    )
    .map_err(|e| format!("sending the challenge: {e}"))?;
    let (client, mac) = match np::read_frame_max(stream, np::MAX_SMALL_FRAME) {
        Ok(Frame::Auth { nonce, mac }) => (nonce, mac),
        Ok(f) => return refuse(stream, format!("sent {f:?} instead of Auth")),
        Err(e) => return refuse(stream, format!("no Auth ({e})")),
    };
    if !key.verify(Role::Client, &server, &client, &mac) {
        return refuse(
            stream,
            "authentication failed (wrong key: its HMAC does not match)".into(),
        );
    }
    np::write_frame(
        stream,
        &Frame::Welcome {
            mac: key.mac(Role::Server, &server, &client),
        },
    )
    .map_err(|e| format!("sending Welcome: {e}"))?;
    Ok((key.session(&server, &client), joins))
}

/// The writer: answer queued Gets, urgent first, until the reader ends.
fn answer_gets(
    mut stream: NetStream,
    mut sealer: Sealer,
    shared: &Shared,
    image: &dyn ServedData,
    hooks: TestHooks,
) {
    loop {
        let next = {
            let (lock, cv) = &**shared;
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(ended) = q.ended {
                    if ended {
                        let _ = sealer.write(&mut stream, &Frame::Close);
                    } else if let Some(msg) = q.error.take() {
                        let error = Frame::Error {
                            code: np::ERR_PROTOCOL,
                            msg,
                        };
                        let _ = sealer.write(&mut stream, &error);
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    return;
                }
                if let Some(g) = q.urgent.pop_front().or_else(|| q.background.pop_front()) {
                    break g;
                }
                q = cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        if send_data(&mut stream, &mut sealer, image, hooks, next).is_err() {
            return;
        }
    }
}

/// Answer one Get `(id, offset, len)` with its Data, sealed. An image error is sent as Error
/// (the connection is then shut down); Err: the connection cannot go on (said in the log).
fn send_data(
    stream: &mut NetStream,
    sealer: &mut Sealer,
    image: &dyn ServedData,
    hooks: TestHooks,
    (id, offset, len): (u64, u64, u32),
) -> Result<(), String> {
    let bytes = match image.read(offset, u64::from(len)) {
        Ok(b) => b,
        Err(e) => {
            log::error!("not sending {offset:#x}+{len:#x}: {e}");
            let error = Frame::Error {
                code: np::ERR_IMAGE,
                msg: e.clone(),
            };
            let _ = sealer.write(stream, &error);
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Err(e);
        }
    };
    // `read` verified every chunk against the table: its checksums are the ones to send.
    let first = (offset / CHUNK_SIZE) as usize;
    let checksums = &image.checksums()[first..first + np::chunks_in(u64::from(len)) as usize];
    let sent = if hooks.corrupt_chunk.is_some() || hooks.tamper_chunk.is_some() {
        send_damaged(
            stream,
            sealer,
            hooks,
            (id, offset),
            checksums,
            bytes.into_owned(),
        )
    } else {
        sealer.write_data(stream, id, offset, checksums, &bytes)
    };
    if let Err(e) = sent {
        log::info!("sending data: {e}");
        return Err(format!("sending data: {e}"));
    }
    image.sent(offset, u64::from(len));
    Ok(())
}

/// [`send_data`] with the test hooks' damage (umm(1), ENVIRONMENT).
fn send_damaged(
    stream: &mut NetStream,
    sealer: &mut Sealer,
    hooks: TestHooks,
    (id, offset): (u64, u64),
    checksums: &[u32],
    mut bytes: Vec<u8>,
) -> std::io::Result<()> {
    let len = bytes.len();
    if let Some(c) = hooks.corrupt_chunk {
        if flip_chunk(&mut bytes, offset, c) {
            log::warn!("TEST HOOK: flipped a byte of chunk {c} in the Data sent");
        }
    }
    let frame = Frame::Data {
        id,
        offset,
        checksums: checksums.to_vec(),
        bytes,
    };
    let mut sealed = sealer.seal(&frame);
    if let Some(c) = hooks.tamper_chunk {
        let header = sealed.len() - np::MAC_LEN - len;
        if flip_chunk(&mut sealed[header..header + len], offset, c) {
            log::warn!("TEST HOOK: flipped a byte of chunk {c} after sealing the Data sent");
        }
    }
    stream.write_all(&sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_stream() -> NetStream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server = listener.accept().unwrap();
        NetStream::Plain(client)
    }

    #[test]
    fn a_session_takes_one_urgent_connection_and_releases_it_when_it_leaves() {
        let sessions = Sessions::default();
        let id = [1u8; np::MAC_LEN];
        let stream = loopback_stream();
        assert!(sessions.join(&id, &stream).is_err(), "unknown session");
        sessions.register(id);
        sessions.join(&id, &stream).unwrap();
        assert!(sessions.join(&id, &stream).is_err(), "a second one");
        sessions.left(&id);
        assert!(matches!(sessions.lock().get(&id), Some(Urgent::Left)));
        assert!(
            sessions.join(&id, &stream).is_err(),
            "no rejoin after it left"
        );
        sessions.end(&id);
        assert!(sessions.lock().get(&id).is_none());
    }
}
