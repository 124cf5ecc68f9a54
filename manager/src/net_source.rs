//! `umm restore --source tcp://HOST:PORT --key FILE`: an image's pages fetched from
//! `umm page-server` (protocol: `umm::netproto`, umm-protocol(5)).
//!
//! Same structure as the CRIU page-server client (`crate::page_server`): the handshake and the
//! manifest are read before the loop starts; then a writer thread sends the requests the loop
//! hands it and a reader thread reads the Data frames, checks every chunk's CRC-32C against
//! the image's table (off the loop), and hands each verified buffer to the loop through a
//! channel plus an eventfd in the loop's poll set. Only the loop touches uffds: it keeps the
//! fetched data in a [`NetStore`] (the `UFFDIO_COPY` source, indexed by data-file offset like
//! an mmap'd image) and copies from there.
//!
//! Order: a fault's chunks are asked at once, flagged urgent, on a second, urgent-only
//! connection that joins the first one's session (`connect_urgent`): its replies never wait
//! behind background bytes in socket buffers. Without it (a server that does not offer it, or
//! it cannot be made: a warning, and the report says so) they go on the first connection,
//! where the server answers them before its queued background requests. The rest is asked in
//! the background, in data-file order, large requests, several in flight, on the first
//! connection. Either connection lost stops the restore like any failure. A bad chunk, a frame that fails its MAC (every frame
//! after the handshake is sealed), a server error or a lost connection stops the restore
//! (fail-stop): missing pages never read as zeros, bad data never becomes memory.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::sys::eventfd::{EfdFlags, EventFd};

use umm::image::{Manifest, CHUNK_SIZE};
use umm::netproto::{self as np, Frame, Key, Opener, Role, Sealer};

use crate::net_tls::{self, ClientTls, NetStream};
use crate::page_source::PageSource;

/// Chunks per background request (1 MiB): large, so the link stays full.
const BACKGROUND_CHUNKS: u64 = 16;
/// Background requests in flight at once (16 MiB): covers a 10 ms RTT at 1.6 GB/s.
const WINDOW: usize = 16;
/// A fault (or the fill) on a chunk a background request already asked waits for that reply
/// when at most this many background requests are before it in the server's queue (1 MiB);
/// farther back, it asks again, urgently.
const NEAR_REQUESTS: u64 = 1;
/// Largest urgent request, in chunks.
const MAX_URGENT_CHUNKS: u64 = np::MAX_GET as u64 / CHUNK_SIZE;
/// Data buffers kept for reuse by the readers (each up to MAX_GET).
const RECYCLED_BUFFERS: usize = 4;
/// Bounds on connecting, on the handshake, and on the end of the conversation.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
const HANDSHAKE_WAIT: Duration = Duration::from_secs(30);
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The image's data as it arrives, by data-file offset, in CHUNK_SIZE chunks.
pub struct NetStore {
    data: Vec<u8>,
    arrived: Vec<bool>,
    requested: Vec<bool>,
    /// Asked by a fault (urgent).
    urgently: Vec<bool>,
    /// The serial number (from 1) of the background request that asked each chunk, 0: none.
    /// The server answers background requests in order, so serial - `background_answered` is
    /// how far back in its queue a chunk is.
    background_serial: Vec<u64>,
    background_sent: u64,
    background_answered: u64,
    /// Chunk ranges faults need, asked first.
    urgent: VecDeque<Range<u64>>,
    /// The next chunk the background asks for (data-file order).
    cursor: u64,
    background: bool,
}

impl NetStore {
    pub fn new(data_len: u64, background: bool) -> NetStore {
        let chunks = np::chunks_in(data_len) as usize;
        NetStore {
            // Zeroed lazily by the kernel: only what arrives is ever touched. (Huge pages
            // were tried: in this VM zeroing fresh 2 MiB pages cost 3x the 4 KiB faults.)
            data: vec![0u8; data_len as usize],
            arrived: vec![false; chunks],
            requested: vec![false; chunks],
            urgently: vec![false; chunks],
            background_serial: vec![0; chunks],
            background_sent: 0,
            background_answered: 0,
            urgent: VecDeque::new(),
            cursor: 0,
            background,
        }
    }

    fn chunks(&self, offset: u64, len: u64) -> Result<Range<u64>, String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.data.len() as u64 && len > 0 => {
                Ok(offset / CHUNK_SIZE..end.div_ceil(CHUNK_SIZE))
            }
            _ => Err(format!(
                "{offset:#x}+{len:#x} is outside the image's data ({:#x} bytes)",
                self.data.len()
            )),
        }
    }

    /// The bytes at `offset..offset + len` if they all arrived (Ok(None): not yet).
    pub fn data(&self, offset: u64, len: u64) -> Result<Option<&[u8]>, String> {
        let chunks = self.chunks(offset, len)?;
        if self.arrived[chunks.start as usize..chunks.end as usize]
            .iter()
            .all(|&a| a)
        {
            return Ok(Some(&self.data[offset as usize..(offset + len) as usize]));
        }
        Ok(None)
    }

    /// A fault needs `offset..offset + len`: ask for it before the background.
    pub fn want(&mut self, offset: u64, len: u64) {
        if let Ok(chunks) = self.chunks(offset, len) {
            self.urgent.push_back(chunks);
        }
    }

    fn has_urgent(&self) -> bool {
        !self.urgent.is_empty()
    }

    /// The next request: (offset, len, urgent), its chunks marked asked. None: nothing to ask
    /// (or, with `urgent_only`, nothing urgent).
    fn next_request(&mut self, urgent_only: bool) -> Option<(u64, u64, bool)> {
        let total = self.arrived.len() as u64;
        let (first, end, urgent) = loop {
            if let Some(r) = self.urgent.pop_front() {
                let mut first = r.start;
                while first < r.end && self.asked_for_fault(first) {
                    first += 1;
                }
                if first < r.end {
                    break (first, r.end, true);
                }
                continue;
            }
            if urgent_only || !self.background {
                return None;
            }
            while self.cursor < total && self.requested[self.cursor as usize] {
                self.cursor += 1;
            }
            if self.cursor >= total {
                return None;
            }
            break (self.cursor, total, false);
        };
        let max = if urgent {
            MAX_URGENT_CHUNKS
        } else {
            BACKGROUND_CHUNKS
        };
        let mut stop = first;
        if urgent {
            while stop < end && stop - first < max && !self.asked_for_fault(stop) {
                self.requested[stop as usize] = true;
                self.urgently[stop as usize] = true;
                stop += 1;
            }
        } else {
            self.background_sent += 1;
            while stop < end && stop - first < max && !self.requested[stop as usize] {
                self.requested[stop as usize] = true;
                self.background_serial[stop as usize] = self.background_sent;
                stop += 1;
            }
        }
        if urgent && stop < end {
            self.urgent.push_front(stop..end);
        }
        let offset = first * CHUNK_SIZE;
        let len = (stop * CHUNK_SIZE).min(self.data.len() as u64) - offset;
        Some((offset, len, urgent))
    }

    /// Whether a fault on `chunk` needs no request: it arrived, a fault asked for it, or a
    /// background request near the head of the server's queue did.
    fn asked_for_fault(&self, chunk: u64) -> bool {
        let serial = self.background_serial[chunk as usize];
        self.arrived[chunk as usize]
            || self.urgently[chunk as usize]
            || (serial != 0 && serial <= self.background_answered + NEAR_REQUESTS)
    }

    /// A background request was answered (they are answered in the order asked).
    fn background_reply(&mut self) {
        self.background_answered += 1;
    }

    /// Verified data arrived for `offset` (a chunk asked twice arrives twice: same bytes).
    fn arrived(&mut self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        let chunks = self.chunks(offset, bytes.len() as u64)?;
        if offset % CHUNK_SIZE != 0 {
            return Err(format!("data at {offset:#x} is not chunk aligned"));
        }
        self.data[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        self.arrived[chunks.start as usize..chunks.end as usize].fill(true);
        Ok(())
    }
}

/// What the network threads hand the loop (the page-server readers, or the HTTP fetchers).
pub(crate) enum Reply {
    Data {
        id: u64,
        offset: u64,
        bytes: Vec<u8>,
        /// It came on the urgent connection.
        urgent_connection: bool,
    },
    Closed,
    Failed(String),
    /// The urgent connection ended (why): a failure while the restore runs, expected after
    /// the client closed it.
    UrgentEnded(String),
}

/// Which of a restore's connections a helper thread serves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Channel {
    First,
    Urgent,
}

/// The loop's side of the connection to a page server.
pub struct NetClient {
    url: String,
    manifest: Arc<Manifest>,
    store: Rc<RefCell<NetStore>>,
    requests: Option<Sender<Frame>>,
    /// The urgent connection's writer, when there is one.
    urgent: Option<Sender<Frame>>,
    urgent_connection: bool,
    replies: Receiver<Reply>,
    /// Data buffers copied into the store go back to the readers (page-server connections).
    recycle: Option<Sender<Vec<u8>>>,
    wake: Arc<EventFd>,
    /// Request id → (offset, len, urgent).
    in_flight: HashMap<u64, (u64, u64, bool)>,
    background_in_flight: usize,
    next_id: u64,
    pub requests_sent: u64,
    pub urgent_requests: u64,
    pub bytes_fetched: u64,
    /// Requests sent, and verified bytes received, on the urgent connection.
    urgent_connection_requests: u64,
    urgent_connection_bytes: u64,
    /// The transport is TLS (tcp:// with --tls-ca, or https://).
    tls: bool,
    /// Why the connection failed, once it did: nothing more is asked or taken.
    pub broken: Option<String>,
}

fn new_wake() -> Result<Arc<EventFd>, String> {
    EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map(Arc::new)
        .map_err(|e| format!("eventfd: {e}"))
}

/// `tcp://HOST:PORT` → `HOST:PORT`.
pub fn parse_url(url: &str) -> Result<&str, String> {
    let rest = url.strip_prefix("tcp://").ok_or_else(|| {
        format!("--source {url}: only tcp://HOST:PORT sources are supported (umm page-server)")
    })?;
    if rest.is_empty() || !rest.contains(':') || rest.contains('/') {
        return Err(format!("--source {url}: expected tcp://HOST:PORT"));
    }
    Ok(rest)
}

impl NetClient {
    /// Connect, authenticate (both ways), read the manifest and checksum table, start the
    /// helper threads.
    pub fn connect(
        url: &str,
        key: &Key,
        tls: Option<&ClientTls>,
        background: bool,
    ) -> Result<NetClient, String> {
        let addr = parse_url(url)?;
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: no address"))?;
        let mut stream = net_tls::connect(&sock, url, tls, CONNECT_WAIT, HANDSHAKE_WAIT)?;
        let Handshake {
            manifest,
            table,
            sealer,
            opener,
            features,
            join_id,
        } = handshake(&mut stream, url, key)?;
        let _ = stream.set_read_timeout(None);
        log::info!(
            "{url}: authenticated; image of {} regions, {} of data",
            manifest.regions.len(),
            crate::stats::human_bytes(manifest.data_len)
        );
        let reader = stream
            .try_clone()
            .map_err(|e| format!("{url}: socket: {e}"))?;
        let wake = new_wake()?;
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded::<Reply>();
        let table = Arc::new(table);
        let (recycle_tx, recycle_rx) = crossbeam_channel::bounded(RECYCLED_BUFFERS);
        let recycled = Recycled(recycle_rx);
        let conn = Conn {
            stream,
            reader,
            sealer,
            opener,
        };
        let req_tx = start_threads(conn, Channel::First, &table, &reply_tx, &wake, &recycled)?;
        let urgent = if features & np::FEATURE_URGENT_CONNECTION == 0 {
            log::warn!(
                "{url}: the page server offers no urgent connection: faults' replies may wait \
                 behind background data"
            );
            None
        } else {
            match connect_urgent(&sock, url, key, tls, &join_id) {
                Ok(conn) => Some(start_threads(
                    conn,
                    Channel::Urgent,
                    &table,
                    &reply_tx,
                    &wake,
                    &recycled,
                )?),
                Err(e) => {
                    log::warn!(
                        "{e}; faults go on the first connection (answered first, but their \
                         replies may wait behind background data)"
                    );
                    None
                }
            }
        };
        let mut client = NetClient::new(url, manifest, background, req_tx, reply_rx, wake);
        client.urgent_connection = urgent.is_some();
        client.recycle = Some(recycle_tx);
        client.urgent = urgent;
        client.tls = tls.is_some();
        Ok(client)
    }

    /// An image directory on an HTTP server (`crate::http_source`): manifest and checksum
    /// table fetched, fetcher threads started.
    pub fn connect_http(
        url: &str,
        http: &crate::http_source::HttpOptions,
        background: bool,
    ) -> Result<NetClient, String> {
        let base = crate::http_source::parse_url(url)?;
        let agent = http.agent(base.starts_with("https://"))?;
        let (manifest, table) = crate::http_source::fetch_manifest(&agent, &base)?;
        log::info!(
            "{url}: image of {} regions, {} of data",
            manifest.regions.len(),
            crate::stats::human_bytes(manifest.data_len)
        );
        let wake = new_wake()?;
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded::<Reply>();
        let req_tx = crate::http_source::start(
            agent,
            &base,
            manifest.data_len,
            table,
            reply_tx,
            wake.clone(),
        )?;
        let mut client = NetClient::new(url, manifest, background, req_tx, reply_rx, wake);
        client.tls = base.starts_with("https://");
        Ok(client)
    }

    fn new(
        url: &str,
        manifest: Manifest,
        background: bool,
        requests: Sender<Frame>,
        replies: Receiver<Reply>,
        wake: Arc<EventFd>,
    ) -> NetClient {
        let store = Rc::new(RefCell::new(NetStore::new(manifest.data_len, background)));
        NetClient {
            url: url.to_string(),
            manifest: Arc::new(manifest),
            store,
            requests: Some(requests),
            urgent: None,
            urgent_connection: false,
            replies,
            recycle: None,
            wake,
            in_flight: HashMap::new(),
            background_in_flight: 0,
            next_id: 1,
            requests_sent: 0,
            urgent_requests: 0,
            bytes_fetched: 0,
            urgent_connection_requests: 0,
            urgent_connection_bytes: 0,
            tls: false,
            broken: None,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn store(&self) -> Rc<RefCell<NetStore>> {
        self.store.clone()
    }

    /// The eventfd the loop polls: readable when replies wait.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Hand the writer what the store wants: every urgent request at once, background ones
    /// while the window has room.
    pub fn pump(&mut self) {
        let Some(tx) = self.requests.as_ref().filter(|_| self.broken.is_none()) else {
            return;
        };
        loop {
            let mut store = self.store.borrow_mut();
            let urgent_only = self.background_in_flight >= WINDOW;
            if urgent_only && !store.has_urgent() {
                return;
            }
            let Some((offset, len, urgent)) = store.next_request(urgent_only) else {
                return;
            };
            drop(store);
            let id = self.next_id;
            self.next_id += 1;
            let get = Frame::Get {
                id,
                offset,
                len: len as u32,
                flags: if urgent { np::GET_URGENT } else { 0 },
            };
            let via = match &self.urgent {
                Some(urgent_tx) if urgent => urgent_tx,
                _ => tx,
            };
            if via.send(get).is_err() {
                return; // the writer stopped: its reason is on the reply channel
            }
            if urgent && self.urgent.is_some() {
                self.urgent_connection_requests += 1;
            }
            self.in_flight.insert(id, (offset, len, urgent));
            self.requests_sent += 1;
            if urgent {
                self.urgent_requests += 1;
            } else {
                self.background_in_flight += 1;
            }
        }
    }

    /// Take the verified data that arrived into the store. Ok(n): replies taken; Err: the
    /// connection failed (or the server sent something wrong).
    pub fn on_readable(&mut self) -> Result<usize, String> {
        let _ = self.wake.read();
        if self.broken.is_some() {
            return Ok(0);
        }
        let mut got = 0;
        while let Ok(reply) = self.replies.try_recv() {
            match reply {
                Reply::Data {
                    id,
                    offset,
                    bytes,
                    urgent_connection,
                } => {
                    let (asked, len, urgent) = self
                        .in_flight
                        .remove(&id)
                        .ok_or_else(|| format!("Data for request {id}, which is not in flight"))?;
                    if asked != offset || len != bytes.len() as u64 {
                        return Err(format!(
                            "request {id} asked {asked:#x}+{len:#x}, the reply carries \
                             {offset:#x}+{:#x}",
                            bytes.len()
                        ));
                    }
                    let mut store = self.store.borrow_mut();
                    if !urgent {
                        self.background_in_flight -= 1;
                        store.background_reply();
                    }
                    store.arrived(offset, &bytes)?;
                    drop(store);
                    self.bytes_fetched += bytes.len() as u64;
                    if urgent_connection {
                        self.urgent_connection_bytes += bytes.len() as u64;
                    }
                    if let Some(r) = &self.recycle {
                        let _ = r.try_send(bytes); // full: the readers have enough
                    }
                    got += 1;
                }
                Reply::Closed => return Err("the page server closed the connection".into()),
                Reply::Failed(e) => return Err(e),
                Reply::UrgentEnded(e) => return Err(format!("urgent connection: {e}")),
            }
        }
        self.pump();
        Ok(got)
    }

    /// What came over the network, for the report.
    pub fn report(&self) -> crate::stats::NetReport {
        crate::stats::NetReport {
            source: self.url.clone(),
            requests: self.requests_sent,
            urgent_requests: self.urgent_requests,
            bytes_fetched: self.bytes_fetched,
            urgent_connection: self.urgent_connection,
            urgent_connection_requests: self.urgent_connection_requests,
            urgent_connection_bytes: self.urgent_connection_bytes,
            tls: self.tls,
        }
    }

    /// The restore is complete: say so (the server then ends), bounded.
    pub fn complete(mut self) -> Result<(), String> {
        // Its writer says Close and the server ends it; its reader's end is expected now.
        drop(self.urgent.take());
        if let Some(tx) = self.requests.take() {
            let _ = tx.send(Frame::Complete);
        }
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(Reply::Closed) => return Ok(()),
                Ok(Reply::Failed(e)) => return Err(e),
                Ok(Reply::Data { .. } | Reply::UrgentEnded(_)) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no answer to Complete in {CLOSE_WAIT:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => return Err("connection gone".into()),
            }
        }
    }
}

fn expect_frame(
    stream: &mut NetStream,
    opener: Option<&mut Opener>,
    url: &str,
    what: &str,
) -> Result<Frame, String> {
    let read = match opener {
        Some(o) => o.read(stream, usize::MAX),
        None => np::read_frame(stream),
    };
    match read {
        Ok(Frame::Error { code, msg }) => {
            Err(format!("{url}: the page server refused ({code}): {msg}"))
        }
        Ok(f) => Ok(f),
        Err(e) => Err(format!("{url}: reading the {what}: {e}")),
    }
}

/// What the first connection's handshake gives.
struct Handshake {
    manifest: Manifest,
    /// The image's CRC-32C per chunk.
    table: Vec<u32>,
    sealer: Sealer,
    opener: Opener,
    /// What the server offers (np::FEATURE_*).
    features: u32,
    /// What an urgent connection joins this session by.
    join_id: [u8; np::MAC_LEN],
}

/// Hello, Challenge, Auth, Welcome (the server proves it has the key too), Manifest (the
/// first sealed frame).
fn handshake(stream: &mut NetStream, url: &str, key: &Key) -> Result<Handshake, String> {
    let hello = Frame::Hello {
        features: np::FEATURES,
    };
    let (features, session) = authenticate(stream, url, key, &hello)?;
    let mut opener = session.opener(Role::Server);
    let Frame::Manifest {
        data_len,
        checksums,
        json,
    } = expect_frame(stream, Some(&mut opener), url, "manifest")?
    else {
        return Err(format!("{url}: no manifest after the authentication"));
    };
    let manifest = Manifest::parse(Path::new(url), &json).map_err(|e| format!("{e}"))?;
    if manifest.data_len != data_len {
        return Err(format!(
            "{url}: the manifest says {:#x} bytes of data, the frame {data_len:#x}",
            manifest.data_len
        ));
    }
    Ok(Handshake {
        manifest,
        table: checksums,
        sealer: session.sealer(Role::Client),
        opener,
        features,
        join_id: session.join_id(),
    })
}

/// `first` (Hello or Join), Challenge, Auth, Welcome: both sides proved they hold the key.
/// Ok: what the server offers, and this connection's session key.
fn authenticate(
    stream: &mut NetStream,
    url: &str,
    key: &Key,
    first: &Frame,
) -> Result<(u32, np::SessionKey), String> {
    let send = |s: &mut NetStream, f: &Frame| {
        np::write_frame(s, f).map_err(|e| format!("{url}: sending {f:?}: {e}"))
    };
    send(stream, first)?;
    let Frame::Challenge {
        nonce: server,
        features,
    } = expect_frame(stream, None, url, "challenge")?
    else {
        return Err(format!("{url}: the server did not send a challenge"));
    };
    let client = np::nonce().map_err(|e| format!("no random nonce: {e}"))?;
    send(
        stream,
        &Frame::Auth {
            nonce: client,
            mac: key.mac(Role::Client, &server, &client),
        },
    )?;
    let Frame::Welcome { mac } = expect_frame(stream, None, url, "answer to the authentication")?
    else {
        return Err(format!("{url}: no Welcome after the authentication"));
    };
    if !key.verify(Role::Server, &server, &client, &mac) {
        return Err(format!(
            "{url}: the page server does not prove it holds the key (wrong key, or not the \
             server meant)"
        ));
    }
    Ok((features, key.session(&server, &client)))
}

/// One authenticated connection, ready for its helper threads.
struct Conn {
    stream: NetStream,
    /// A clone of `stream` for the reader.
    reader: NetStream,
    sealer: Sealer,
    opener: Opener,
}

/// The urgent connection: a second connection to `sock` that joins session `join_id` (Join,
/// the handshake, and the server's sealed Join back). Err: why not (the caller goes on
/// without it).
fn connect_urgent(
    sock: &SocketAddr,
    url: &str,
    key: &Key,
    tls: Option<&ClientTls>,
    join_id: &[u8; np::MAC_LEN],
) -> Result<Conn, String> {
    let mut stream = net_tls::connect(sock, url, tls, CONNECT_WAIT, HANDSHAKE_WAIT)
        .map_err(|e| format!("no urgent connection: {e}"))?;
    let join = Frame::Join {
        features: np::FEATURES,
        session: *join_id,
    };
    let (_, session) = authenticate(&mut stream, url, key, &join)
        .map_err(|e| format!("no urgent connection: {e}"))?;
    let mut opener = session.opener(Role::Server);
    match expect_frame(&mut stream, Some(&mut opener), url, "answer to Join") {
        Ok(Frame::Join { session, .. }) if session == *join_id => {}
        Ok(f) => {
            return Err(format!(
                "{url}: no urgent connection: {f:?} instead of Join"
            ))
        }
        Err(e) => return Err(format!("no urgent connection: {e}")),
    }
    let _ = stream.set_read_timeout(None);
    let reader = stream
        .try_clone()
        .map_err(|e| format!("{url}: urgent connection: socket: {e}"))?;
    log::info!("{url}: urgent connection joined");
    Ok(Conn {
        stream,
        reader,
        sealer: session.sealer(Role::Client),
        opener,
    })
}

/// Data buffers the loop gave back, for the readers to read the next Data into (no zeroing
/// and no fresh pages per frame: 17 % of the reader's CPU in a bare-veth restore).
#[derive(Clone)]
struct Recycled(Receiver<Vec<u8>>);

impl Recycled {
    fn take(&self) -> Vec<u8> {
        self.0.try_recv().unwrap_or_default()
    }
}

/// A connection's writer and reader threads. Ok: the writer's request channel.
fn start_threads(
    conn: Conn,
    channel: Channel,
    table: &Arc<Vec<u32>>,
    replies: &Sender<Reply>,
    wake: &Arc<EventFd>,
    recycled: &Recycled,
) -> Result<Sender<Frame>, String> {
    let (req_tx, req_rx) = crossbeam_channel::unbounded::<Frame>();
    let Conn {
        stream,
        reader,
        sealer,
        opener,
    } = conn;
    let names = match channel {
        Channel::First => ["umm-net-writer", "umm-net-reader"],
        Channel::Urgent => ["umm-net-uwriter", "umm-net-ureader"],
    };
    {
        let (replies, wake) = (replies.clone(), wake.clone());
        crate::helper_thread::spawn(names[0], move || {
            write_requests(stream, sealer, req_rx, channel, replies, wake)
        })
        .map_err(|e| format!("cannot start the network writer: {e}"))?;
    }
    let (replies, wake, table) = (replies.clone(), wake.clone(), table.clone());
    let recycled = recycled.clone();
    crate::helper_thread::spawn(names[1], move || {
        read_replies(reader, opener, table, channel, replies, wake, recycled)
    })
    .map_err(|e| format!("cannot start the network reader: {e}"))?;
    Ok(req_tx)
}

/// The writer thread: send each frame the loop hands it. The urgent connection's writer
/// says Close when the loop lets go of it (the restore is complete).
fn write_requests(
    mut stream: NetStream,
    mut sealer: Sealer,
    requests: Receiver<Frame>,
    channel: Channel,
    replies: Sender<Reply>,
    wake: Arc<EventFd>,
) {
    for f in requests.iter() {
        if let Err(e) = sealer.write(&mut stream, &f) {
            let why = format!("page server connection lost sending {f:?}: {e}");
            let _ = replies.send(match channel {
                Channel::First => Reply::Failed(why),
                Channel::Urgent => Reply::UrgentEnded(why),
            });
            let _ = wake.write(1);
            return;
        }
    }
    if channel == Channel::Urgent {
        let _ = sealer.write(&mut stream, &Frame::Close);
    }
}

/// The reader thread: open each sealed frame, verify Data against the image's checksum table,
/// hand it over.
fn read_replies(
    mut stream: NetStream,
    mut opener: Opener,
    table: Arc<Vec<u32>>,
    channel: Channel,
    replies: Sender<Reply>,
    wake: Arc<EventFd>,
    recycled: Recycled,
) {
    let urgent_connection = channel == Channel::Urgent;
    let hand = |r: Reply| {
        let ok = replies.send(r).is_ok();
        let _ = wake.write(1);
        ok
    };
    loop {
        let reply = match opener.read_reusing(&mut stream, usize::MAX, recycled.take()) {
            Ok(Frame::Data {
                id,
                offset,
                checksums,
                bytes,
            }) => match np::verify_data(offset, &bytes, &checksums, &table) {
                Ok(()) => Reply::Data {
                    id,
                    offset,
                    bytes,
                    urgent_connection,
                },
                Err(e) => Reply::Failed(format!("refused data from the page server: {e}")),
            },
            Ok(Frame::Close) => Reply::Closed,
            Ok(Frame::Error { code, msg }) => {
                Reply::Failed(format!("the page server failed ({code}): {msg}"))
            }
            Ok(f) => Reply::Failed(format!("unexpected {f:?} from the page server")),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Reply::Failed(format!("refused a frame from the page server: {e}"))
            }
            Err(e) => Reply::Failed(format!("page server connection lost: {e}")),
        };
        // The urgent connection's end, whatever it was, is told as such.
        let reply = match reply {
            Reply::Failed(e) if urgent_connection => Reply::UrgentEnded(e),
            Reply::Closed if urgent_connection => Reply::UrgentEnded("closed".into()),
            r => r,
        };
        let last = !matches!(reply, Reply::Data { .. });
        if !hand(reply) || last {
            return;
        }
    }
}

impl crate::manager::Manager {
    /// Verified data from the page server: into the store; what waited for it is tried again.
    /// A failed connection stops the restores that still need it (fail-stop).
    pub(crate) fn on_net_readable(&mut self) {
        let Some(client) = self.restore.net.as_mut() else {
            return;
        };
        let result = client.on_readable();
        if let Err(e) = &result {
            client.broken = Some(e.clone());
            let _ = self.epoll.delete(client.wake_fd());
        }
        match result {
            Ok(0) => {}
            Ok(_) => {
                // The fill waits on spaces with a retry time; parked faults are retried every
                // turn.
                for id in self.spaces.ids() {
                    if let Some(s) = self.spaces.get_mut(id) {
                        if s.restore.is_some() {
                            s.retry_at = None;
                        }
                    }
                }
            }
            Err(e) => {
                let url = self.restore.net.as_ref().map(|c| c.url().to_string());
                let url = url.unwrap_or_default();
                let needed = self.spaces.iter().any(|(_, s)| {
                    s.restore
                        .as_ref()
                        .is_some_and(|r| matches!(r.source, PageSource::Net(_)))
                });
                if needed || self.stats.restores == 0 {
                    self.fail_stop(&format!("page server {url}: {e}"));
                } else {
                    log::info!("page server {url}: {e} (every restore is complete)");
                }
            }
        }
    }

    /// Hand the page server what faults and the fill asked for this turn.
    pub(crate) fn pump_net_source(&mut self) {
        if let Some(client) = self.restore.net.as_mut() {
            client.pump();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urgent_first_then_background_in_order_and_never_twice() {
        let len = 40 * CHUNK_SIZE + 4096;
        let mut s = NetStore::new(len, true);
        s.want(20 * CHUNK_SIZE + 8192, 3 * 4096);
        assert_eq!(
            s.next_request(false),
            Some((20 * CHUNK_SIZE, CHUNK_SIZE, true))
        );
        let mut asked = CHUNK_SIZE;
        let mut last_end = 0;
        while let Some((off, l, urgent)) = s.next_request(false) {
            assert!(!urgent && off >= last_end && l <= BACKGROUND_CHUNKS * CHUNK_SIZE);
            last_end = off + l;
            asked += l;
        }
        assert_eq!(asked, len, "every byte asked once");
        assert_eq!(last_end, len, "the last request ends with the data");
    }

    #[test]
    fn a_fault_waits_for_a_near_background_request_and_asks_again_a_far_one() {
        let per = BACKGROUND_CHUNKS * CHUNK_SIZE;
        let mut s = NetStore::new(8 * per, true);
        for i in 0..6 {
            assert_eq!(s.next_request(false), Some((i * per, per, false)));
        }
        let near = NEAR_REQUESTS;
        // Request `near` of 6 is near the head of the server's queue: wait for its reply.
        s.want((near - 1) * per + 5 * CHUNK_SIZE, 4096);
        assert_eq!(s.next_request(true), None, "near: not asked again");
        // Request 6 is more than NEAR_REQUESTS behind: asked again, urgently, once.
        s.want(5 * per + 5 * CHUNK_SIZE, 4096);
        let far = Some((5 * per + 5 * CHUNK_SIZE, CHUNK_SIZE, true));
        assert_eq!(s.next_request(true), far);
        s.want(5 * per + 5 * CHUNK_SIZE, 4096);
        assert_eq!(s.next_request(true), None, "asked urgently once only");
        // Once the replies before it came, request 6 is near too.
        for _ in 0..6 - near {
            s.background_reply();
        }
        s.want(5 * per + 7 * CHUNK_SIZE, 4096);
        assert_eq!(s.next_request(true), None, "now near");
        s.arrived(0, &vec![1u8; per as usize]).unwrap();
        s.want(6 * CHUNK_SIZE, 4096);
        assert_eq!(s.next_request(true), None, "arrived already");
    }

    #[test]
    fn data_is_given_only_once_its_chunks_arrived() {
        let mut s = NetStore::new(4 * CHUNK_SIZE, false);
        assert_eq!(s.next_request(false), None, "no background");
        s.want(CHUNK_SIZE - 4096, 8192);
        assert_eq!(s.next_request(false), Some((0, 2 * CHUNK_SIZE, true)));
        assert!(s.data(CHUNK_SIZE - 4096, 8192).unwrap().is_none());
        s.arrived(0, &vec![7u8; 2 * CHUNK_SIZE as usize]).unwrap();
        assert_eq!(s.data(CHUNK_SIZE - 4096, 8192).unwrap().unwrap()[0], 7);
        assert!(s.data(4 * CHUNK_SIZE - 4096, 8192).is_err(), "past the end");
        assert!(s.arrived(4096, &[0; 4096]).is_err(), "unaligned");
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url("tcp://10.0.0.1:7000"), Ok("10.0.0.1:7000"));
        assert!(parse_url("http://x/").is_err());
        assert!(parse_url("tcp://nohost").is_err());
    }
}
