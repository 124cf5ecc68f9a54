//! `umm page-server --image DIR --listen ADDR:PORT --key FILE`: serve an image over TCP to
//! `umm restore --source tcp://ADDR:PORT` (protocol: `umm::netproto`, umm-protocol(5)).
//!
//! Blocking I/O, a thread per connection (this is not the event loop: no uffd here). Per
//! connection, after the handshake: this thread reads Gets into a queue with two levels, and a
//! writer thread answers urgent Gets (faults) before every queued background one. One
//! connection with a priority queue rather than a second "urgent" connection: one handshake,
//! one ordering, and the background never has to be cancelled; an urgent Get still waits for
//! the Data being written and what the socket buffers hold (bounded by the client's window).
//!
//! Every chunk sent is verified against the image's checksum table first (`Image::data`); a
//! bad chunk is never sent: the client gets an Error and its restore stops. Every frame after
//! the handshake is sealed (MAC and sequence number, `np::Sealer`); a client frame that fails
//! its MAC drops the connection at once.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
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

const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
/// A client that stops reading does not hold a writer thread forever.
const WRITE_WAIT: Duration = Duration::from_secs(120);
/// How a refused peer's error begins (already logged).
pub const REFUSED: &str = "refused: ";

/// What a page server serves: an image's manifest and checksum table, and its data by
/// data-file offset. An image directory (`umm page-server`) or a frozen live process
/// (`umm migrate-source`).
pub trait ServedData: Send + Sync {
    fn manifest(&self) -> &Manifest;
    /// CRC-32C of each chunk of the data.
    fn checksums(&self) -> &[u32];
    /// `len` bytes at data offset `offset` (checked by `check_get`), verified against the
    /// checksum table: a chunk that does not match is an error, never sent.
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String>;
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
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        self.data(offset, len)
            .map(<[u8]>::to_vec)
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
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept: {e}");
                continue;
            }
        };
        let (image, key, tls) = (image.clone(), key.clone(), tls.clone());
        let keep_serving = args.keep_serving;
        let spawned = std::thread::Builder::new()
            .name("umm-ps-conn".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map_or_else(|_| "?".to_string(), |a| a.to_string());
                let ended = net_tls::accept(stream, &peer, tls.as_ref())
                    .and_then(|stream| connection(stream, &peer, &image, &key, corrupt));
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
        if let Err(e) = spawned {
            log::warn!("cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// Test-only damage to the Data frames sent (umm(1), ENVIRONMENT).
#[derive(Clone, Copy, Debug, Default)]
pub struct TestHooks {
    /// Flip a byte of this chunk before the frame is sealed (the CRC-32C catches it).
    pub corrupt_chunk: Option<u64>,
    /// Flip a byte of this chunk after the frame is sealed (the MAC catches it).
    pub tamper_chunk: Option<u64>,
}

impl TestHooks {
    pub fn from_env() -> TestHooks {
        let chunk = |name: &str| {
            let c = std::env::var(name).ok()?.parse::<u64>().ok()?;
            log::warn!("{name}={c}: TEST HOOK, a byte of chunk {c} is flipped when sent");
            Some(c)
        };
        TestHooks {
            corrupt_chunk: chunk(CORRUPT_ENV),
            tamper_chunk: chunk(TAMPER_ENV),
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

/// One client, to its end. Ok(true): it completed its restore.
fn connection(
    mut stream: NetStream,
    peer: &str,
    image: &Arc<dyn ServedData>,
    key: &Key,
    hooks: TestHooks,
) -> Result<bool, String> {
    let session = handshake(&mut stream, peer, image.as_ref(), key)?;
    answer(stream, session, image, hooks)
}

/// One authenticated connection's sealing state, both directions.
pub struct Session {
    pub sealer: Sealer,
    pub opener: Opener,
}

/// Authenticate the client (a refusal's error starts with [`REFUSED`]) and send it the
/// manifest, sealed.
pub fn handshake(
    stream: &mut NetStream,
    peer: &str,
    image: &dyn ServedData,
    key: &Key,
) -> Result<Session, String> {
    let _ = stream.set_read_timeout(Some(HANDSHAKE_WAIT));
    let _ = stream.set_write_timeout(Some(WRITE_WAIT));
    let session_key = authenticate(stream, peer, key)?;
    let mut session = Session {
        sealer: session_key.sealer(Role::Server),
        opener: session_key.opener(Role::Client),
    };
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
        .map_err(|e| format!("sending the manifest: {e}"))?;
    let _ = stream.set_read_timeout(None);
    log::info!("{peer}: authenticated; manifest sent");
    Ok(session)
}

/// Answer an authenticated client's Gets until it completes (Ok(true)), closes (Ok(false)) or
/// fails.
pub fn answer(
    mut stream: NetStream,
    session: Session,
    image: &Arc<dyn ServedData>,
    hooks: TestHooks,
) -> Result<bool, String> {
    let m = image.manifest();
    let Session { sealer, mut opener } = session;

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
        let frame = match opener.read(&mut stream, np::MAX_SMALL_FRAME) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // Nothing more is said to a stream someone may be writing into.
                let _ = stream.shutdown(std::net::Shutdown::Both);
                break Err(format!("connection dropped: refused a request: {e}"));
            }
            Err(e) => break Err(format!("reading a request: {e}")),
        };
        match frame {
            Frame::Get {
                id,
                offset,
                len,
                flags,
            } => {
                if let Err(e) = np::check_get(offset, len, flags, data_len) {
                    break Err(e);
                }
                let (lock, cv) = &*shared;
                let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
                if flags & np::GET_URGENT != 0 {
                    q.urgent.push_back((id, offset, len));
                } else {
                    q.background.push_back((id, offset, len));
                }
                cv.notify_one();
            }
            Frame::Complete => break Ok(true),
            Frame::Close => break Ok(false),
            f => break Err(format!("unexpected {f:?}")),
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

/// Hello → Challenge; Auth checked; → Welcome. A wrong key is refused with one log line.
/// Ok: the connection's session key.
fn authenticate(stream: &mut NetStream, peer: &str, key: &Key) -> Result<np::SessionKey, String> {
    let refuse = |stream: &mut NetStream, why: String| -> Result<np::SessionKey, String> {
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
    match np::read_frame_max(stream, np::MAX_SMALL_FRAME) {
        Ok(Frame::Hello { .. }) => {}
        Ok(f) => return refuse(stream, format!("sent {f:?} instead of Hello")),
        Err(e) => return refuse(stream, format!("no Hello ({e})")),
    }
    let server = np::nonce().map_err(|e| format!("no random nonce: {e}"))?;
    np::write_frame(
        stream,
        &Frame::Challenge {
            features: np::FEATURES,
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
    Ok(key.session(&server, &client))
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
        let (id, offset, len) = next;
        let mut bytes = match image.read(offset, u64::from(len)) {
            Ok(b) => b,
            Err(e) => {
                log::error!("not sending {offset:#x}+{len:#x}: {e}");
                let error = Frame::Error {
                    code: np::ERR_IMAGE,
                    msg: e,
                };
                let _ = sealer.write(&mut stream, &error);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        };
        let checksums = np::chunk_checksums(&bytes);
        if let Some(c) = hooks.corrupt_chunk {
            if flip_chunk(&mut bytes, offset, c) {
                log::warn!("TEST HOOK: flipped a byte of chunk {c} in the Data sent");
            }
        }
        let frame = Frame::Data {
            id,
            offset,
            checksums,
            bytes,
        };
        let mut sealed = sealer.seal(&frame);
        if let Some(c) = hooks.tamper_chunk {
            let header = sealed.len() - np::MAC_LEN - len as usize;
            if flip_chunk(&mut sealed[header..header + len as usize], offset, c) {
                log::warn!("TEST HOOK: flipped a byte of chunk {c} after sealing the Data sent");
            }
        }
        if let Err(e) = stream.write_all(&sealed) {
            log::info!("sending data: {e}");
            return;
        }
        image.sent(offset, u64::from(len));
    }
}
