//! TLS for the page-server protocol (umm-protocol(5), PAGE SERVER, TLS): one stream type,
//! [`NetStream`], plain or TLS, built by [`accept`] on the server side (`umm page-server`,
//! `umm migrate-source`) and by [`connect`] on the client side (`umm restore --source tcp://`).
//!
//! TLS (rustls, ring provider, TLS 1.2/1.3) wraps the whole conversation; the PSK handshake and
//! the sealed frames inside it stay required (defence in depth: a certificate alone does not
//! get memory, and a leaked key alone does not read a TLS link).
//!
//! The protocol's two threads per side (a reader and a writer on clones of one socket) share
//! one rustls connection: [`TlsStream`] reads ciphertext from its own clone of the socket
//! without a lock, then decrypts under the connection's lock; a writer encrypts under that
//! lock and sends under a second one, so records leave in the order they were sealed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

use umm::netproto::{self as np, Frame};

/// Bound on the TLS handshake (and on a plain client's first bytes).
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
const WRITE_WAIT: Duration = Duration::from_secs(120);
/// Ciphertext read from the socket at once: about one TLS record, so the plaintext a read
/// releases stays within rustls' receive buffer.
const READ_BUF: usize = 16 * 1024;

/// `--tls-cert FILE --tls-key FILE` of umm page-server and umm migrate-source.
#[derive(Args, Debug, Clone)]
pub struct ServerTlsArgs {
    /// Speak TLS with this certificate chain (PEM; the server's certificate first). Plain
    /// clients are then refused. The pre-shared key stays required.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The server's TLS configuration, if TLS was asked for.
    pub fn load(&self) -> Result<Option<Arc<ServerConfig>>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let chain = read_certs(cert)?;
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("--tls-key {}: no PEM private key ({e})", key.display()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| {
                format!(
                    "--tls-cert {} with --tls-key {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?;
        Ok(Some(Arc::new(config)))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// What `umm restore --source tcp:// --tls-ca FILE` checks the server against.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl ClientTls {
    /// Trust the certificates in `ca` (a CA, or the server's own certificate) for a server
    /// named `server_name` (a DNS name or an IP address, as in the certificate's SAN).
    pub fn new(ca: &Path, server_name: &str) -> Result<ClientTls, String> {
        let mut roots = RootCertStore::empty();
        for cert in read_certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("TLS server name {server_name:?}: {e}"))?;
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// The host of `HOST:PORT` (`[v6]:PORT` too): the name a server's certificate must carry.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A page-server connection: plain TCP or TLS. Clones (for a reader and a writer thread)
/// share the socket and the TLS state.
pub enum NetStream {
    Plain(TcpStream),
    Tls(TlsStream),
}

pub struct TlsStream {
    socket: TcpStream,
    shared: Arc<TlsShared>,
    inbuf: Box<[u8]>,
    /// The part of `inbuf` read from the socket and not yet given to rustls.
    pending: Range<usize>,
}

struct TlsShared {
    conn: Mutex<Connection>,
    /// Held from encrypting to the end of the socket write: records leave in order.
    send: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NetStream {
    fn socket(&self) -> &TcpStream {
        match self {
            NetStream::Plain(s) => s,
            NetStream::Tls(t) => &t.socket,
        }
    }

    pub fn try_clone(&self) -> io::Result<NetStream> {
        Ok(match self {
            NetStream::Plain(s) => NetStream::Plain(s.try_clone()?),
            // Ciphertext read but not yet given to rustls stays with this value: a clone that
            // becomes the reader would never see it (and wait for bytes that came already).
            // The protocol clones only between frames the peer sends after an answer, so this
            // is an error, not a state to handle.
            NetStream::Tls(t) if !t.pending.is_empty() => {
                return Err(io::Error::other(
                    "a TLS stream with unread ciphertext cannot be cloned",
                ))
            }
            NetStream::Tls(t) => NetStream::Tls(TlsStream {
                socket: t.socket.try_clone()?,
                shared: t.shared.clone(),
                inbuf: vec![0u8; READ_BUF].into_boxed_slice(),
                pending: 0..0,
            }),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.socket().shutdown(how)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_write_timeout(t)
    }
}

impl TlsStream {
    fn new(socket: TcpStream, conn: Connection) -> TlsStream {
        TlsStream {
            socket,
            shared: Arc::new(TlsShared {
                conn: Mutex::new(conn),
                send: Mutex::new(()),
            }),
            inbuf: vec![0u8; READ_BUF].into_boxed_slice(),
            pending: 0..0,
        }
    }

    /// Send what rustls has queued (records, alerts), in order.
    fn send_queued(&self) -> io::Result<()> {
        let _send = lock(&self.shared.send);
        let mut out = Vec::new();
        {
            let mut conn = lock(&self.shared.conn);
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
        }
        (&self.socket).write_all(&out)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut conn = lock(&self.shared.conn);
            match conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Ok(0): the peer's close_notify; an error: closed without it.
                done => return done,
            }
            if self.pending.is_empty() {
                // No plaintext waits: more ciphertext, read without the lock (a writer may
                // encrypt meanwhile).
                drop(conn);
                let n = self.socket.read(&mut self.inbuf)?;
                self.pending = 0..n;
                conn = lock(&self.shared.conn);
            }
            // One read_tls at a time, only when the plaintext was all taken: rustls refuses
            // more ciphertext while its plaintext buffer is full. Ciphertext left over waits
            // in `pending`. (An empty slice tells rustls the socket's EOF.)
            let mut fresh = &self.inbuf[self.pending.clone()];
            let used = conn.read_tls(&mut fresh)?;
            self.pending.start += used;
            let processed = conn.process_new_packets();
            let wants_write = conn.wants_write();
            if let Err(e) = processed {
                // The alert rustls queued tells the peer why, before the connection ends.
                drop(conn);
                let _ = self.send_queued();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            drop(conn);
            if wants_write {
                self.send_queued()?;
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _send = lock(&self.shared.send);
        let mut out = Vec::with_capacity(buf.len() + 1024);
        let n = {
            let mut conn = lock(&self.shared.conn);
            let n = conn.writer().write(buf)?;
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
            n
        };
        (&self.socket).write_all(&out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for NetStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NetStream::Plain(s) => s.read(buf),
            NetStream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for NetStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NetStream::Plain(s) => s.write(buf),
            NetStream::Tls(t) => t.write(buf),
        }
    }

    /// Plain: one `writev` (a Data frame's header, data and MAC without a copy).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            NetStream::Plain(s) => s.write_vectored(bufs),
            NetStream::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            NetStream::Plain(s) => s.flush(),
            NetStream::Tls(t) => t.flush(),
        }
    }
}

/// Whether `bytes` begin like a TLS record (handshake, alert, change cipher spec or data of
/// TLS 1.x). A protocol frame cannot: its first bytes are a small length.
fn looks_like_tls(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && (0x14..=0x17).contains(&bytes[0]) && bytes[1] == 0x03
}

/// Drive a handshake to its end on the blocking socket. `first` gets the first bytes the
/// peer sent (to say clearly what a peer that is not TLS is).
fn handshake(conn: &mut Connection, socket: &mut TcpStream, first: &mut Vec<u8>) -> io::Result<()> {
    let mut buf = vec![0u8; READ_BUF];
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(socket)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        let n = socket.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection during the TLS handshake (does it speak TLS?)",
            ));
        }
        if first.len() < 2 {
            first.extend_from_slice(&buf[..n.min(2 - first.len())]);
        }
        let mut fresh = &buf[..n];
        while !fresh.is_empty() {
            conn.read_tls(&mut fresh)?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (an alert), best effort.
                while conn.wants_write() {
                    if conn.write_tls(socket).is_err() {
                        break;
                    }
                }
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
    while conn.wants_write() {
        conn.write_tls(socket)?;
    }
    Ok(())
}

/// The server side of a fresh connection: TLS if `tls` is set, else plain. A peer that
/// speaks the other is refused with one log line (and, when it speaks the plain protocol, an
/// Error frame that says why); the error then starts with `crate::net_server::REFUSED`.
pub fn accept(
    socket: TcpStream,
    peer: &str,
    tls: Option<&Arc<ServerConfig>>,
) -> Result<NetStream, String> {
    use crate::net_server::REFUSED;
    let _ = socket.set_nodelay(true);
    let _ = socket.set_read_timeout(Some(HANDSHAKE_WAIT));
    let _ = socket.set_write_timeout(Some(WRITE_WAIT));
    let mut first = [0u8; 2];
    let seen = peek_exact(&socket, &mut first);
    let refuse = |mut socket: TcpStream, why: &str, tell: Option<&str>| {
        log::warn!("refused {peer}: {why}");
        if let Some(msg) = tell {
            let error = Frame::Error {
                code: np::ERR_AUTH,
                msg: msg.into(),
            };
            let _ = np::write_frame(&mut socket, &error);
        }
        let _ = socket.shutdown(Shutdown::Both);
        Err(format!("{REFUSED}{why}"))
    };
    match (tls, seen) {
        (_, Err(e)) => refuse(socket, &format!("sent nothing ({e})"), None),
        (None, Ok(())) if looks_like_tls(&first) => refuse(
            socket,
            "it speaks TLS; this server does not (start it with --tls-cert and --tls-key, or \
             drop --tls-ca on the client)",
            // Plain bytes the client's TLS handshake shows as "does not speak TLS".
            Some("this page server does not speak TLS"),
        ),
        (None, Ok(())) => Ok(NetStream::Plain(socket)),
        (Some(_), Ok(())) if !looks_like_tls(&first) => refuse(
            socket,
            "not a TLS client; this server requires TLS",
            Some("this page server requires TLS (umm restore --tls-ca FILE)"),
        ),
        (Some(config), Ok(())) => {
            let server =
                rustls::ServerConnection::new(config.clone()).map_err(|e| format!("TLS: {e}"))?;
            let mut conn = Connection::from(server);
            let mut socket = socket;
            let mut seen = Vec::new();
            if let Err(e) = handshake(&mut conn, &mut socket, &mut seen) {
                return refuse(socket, &format!("TLS handshake failed: {e}"), None);
            }
            log::info!("{peer}: TLS established ({:?})", conn.protocol_version());
            Ok(NetStream::Tls(TlsStream::new(socket, conn)))
        }
    }
}

/// Peek exactly `buf.len()` bytes (bounded by the socket's read timeout).
fn peek_exact(socket: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let deadline = std::time::Instant::now() + HANDSHAKE_WAIT;
    loop {
        let n = socket.peek(buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        if n == buf.len() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "too few bytes"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The client side: connect to `sock` (for `url`), then the TLS handshake if `tls` is set.
/// A server that does not speak TLS (or that does, to a plain client) is named clearly.
pub fn connect(
    sock: &SocketAddr,
    url: &str,
    tls: Option<&ClientTls>,
    connect_wait: Duration,
    handshake_wait: Duration,
) -> Result<NetStream, String> {
    let mut socket = TcpStream::connect_timeout(sock, connect_wait)
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let _ = socket.set_nodelay(true);
    let _ = socket.set_read_timeout(Some(handshake_wait));
    let _ = socket.set_write_timeout(Some(WRITE_WAIT));
    let Some(tls) = tls else {
        return Ok(NetStream::Plain(socket));
    };
    let client = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
        .map_err(|e| format!("{url}: TLS: {e}"))?;
    let mut conn = Connection::from(client);
    let mut first = Vec::new();
    if let Err(e) = handshake(&mut conn, &mut socket, &mut first) {
        if !first.is_empty() && !looks_like_tls(&first) {
            return Err(format!(
                "{url}: the server does not speak TLS (it answered the TLS handshake with \
                 something else: a page server started without --tls-cert?)"
            ));
        }
        return Err(format!("{url}: TLS handshake failed: {e}"));
    }
    log::info!("{url}: TLS established ({:?})", conn.protocol_version());
    Ok(NetStream::Tls(TlsStream::new(socket, conn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_records_and_protocol_frames_are_told_apart() {
        assert!(looks_like_tls(&[0x16, 0x03, 0x01]));
        assert!(looks_like_tls(&[0x15, 0x03]));
        let hello = Frame::Hello {
            features: np::FEATURES,
        }
        .encode();
        assert!(!looks_like_tls(&hello));
        assert!(!looks_like_tls(&[0x16]));
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("10.0.0.1:7000"), "10.0.0.1");
        assert_eq!(host_of("server.example:7000"), "server.example");
        assert_eq!(host_of("[::1]:7000"), "::1");
    }
}
