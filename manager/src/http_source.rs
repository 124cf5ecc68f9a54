//! `umm restore --source http://HOST[:PORT]/PATH/`: an image directory (umm-image(5):
//! `manifest.json`, `checksums.bin`, `pages.img`) read from any HTTP server that answers Range
//! requests (nginx, an object store's HTTP endpoint).
//!
//! The loop's side is [`crate::net_source::NetClient`] unchanged (its [`NetStore`], its
//! requests and replies); only the transport differs. The manifest and the checksum table are
//! fetched before anything is handed over. Then a dispatcher thread takes the loop's requests
//! and hands them to two pools of helper threads, each doing `GET pages.img` with a `Range`
//! header: [`URGENT_FETCHERS`] for faults' chunks (a path of their own: a fault never queues
//! behind background data) and [`BACKGROUND_FETCHERS`] for the background, so several requests
//! are in flight. Every chunk of a reply is checked against the manifest's checksum table on
//! the fetcher thread; a bad chunk, a wrong status or a short body fails the restore
//! (fail-stop), as for `tcp://`.
//!
//! Client: `ureq` 3 (rustls with the ring provider, shared with the page server's TLS). One
//! agent for every fetcher: its pool keeps connections alive and reuses them (an HTTP/1.1
//! connection per fetcher thread at most), so a request costs no new TCP or TLS handshake.
//! `https://` trusts the system's store (/etc/ssl/certs/ca-certificates.crt: the distro keeps
//! it current, and CAs an administrator added are in it) or, with `--tls-ca FILE`, only FILE.
//! `--http-header-file FILE` adds headers (e.g. `Authorization: Bearer ...`) to every request;
//! their values are never logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use nix::sys::eventfd::EventFd;

use umm::image::{Manifest, CHECKSUM_FILE, CHUNK_SIZE, DATA_FILE, MANIFEST_FILE};
use umm::netproto::{self as np, Frame};

use crate::net_source::Reply;

/// Helper threads fetching faults' chunks.
pub const URGENT_FETCHERS: usize = 2;
/// Helper threads fetching background chunks (requests in flight at once).
pub const BACKGROUND_FETCHERS: usize = 4;
/// Bound on one HTTP request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The system's CA store (Debian's ca-certificates).
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Largest header file accepted.
const MAX_HEADER_FILE: u64 = 64 * 1024;
/// Largest manifest accepted.
const MAX_MANIFEST: u64 = umm::image::MAX_MANIFEST_BYTES;

/// `--tls-ca` and `--http-header-file` of an http(s):// source.
#[derive(Clone, Debug, Default)]
pub struct HttpOptions {
    pub ca: Option<PathBuf>,
    pub header_file: Option<PathBuf>,
}

/// The HTTP client every fetcher shares (its connection pool), and the headers it sends.
#[derive(Clone)]
pub struct HttpAgent {
    agent: ureq::Agent,
    headers: Arc<Vec<(String, String)>>,
}

impl HttpOptions {
    /// The client for an image at a `https://` (`https`) or `http://` URL.
    pub fn agent(&self, https: bool) -> Result<HttpAgent, String> {
        if !https && self.header_file.is_some() {
            log::warn!(
                "--http-header-file with an http:// URL: the headers (credentials) travel \
                 unencrypted"
            );
        }
        let ca = self
            .ca
            .clone()
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE));
        let certs = crate::net_tls::read_certs(&ca).map_err(|e| match &self.ca {
            Some(_) => format!("--tls-ca: {e}"),
            None => format!("the system's CA store: {e} (give one with --tls-ca FILE)"),
        });
        // A missing system store only matters for https://: said when it is used.
        let roots = match certs {
            Ok(c) => c
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c).to_owned())
                .collect(),
            Err(e) if self.ca.is_some() => return Err(e),
            // Without it every https server is refused as "unknown issuer": said plainly.
            Err(e) if https => {
                log::warn!("{e}");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let fetchers = URGENT_FETCHERS + BACKGROUND_FETCHERS + 1;
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .max_redirects(0)
            .max_idle_connections(fetchers)
            .max_idle_connections_per_host(fetchers)
            .build();
        let headers = match &self.header_file {
            Some(f) => read_header_file(f)?,
            None => Vec::new(),
        };
        Ok(HttpAgent {
            agent: ureq::Agent::new_with_config(config),
            headers: Arc::new(headers),
        })
    }
}

/// `Name: value` lines (blank lines and `#` comments skipped). Errors name the line and the
/// header's name, never a value.
pub fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut headers = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("line {}: expected \"Name: value\"", i + 1));
        };
        let name = name.trim();
        if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("line {}: {name:?} is not a header name", i + 1));
        }
        let value = value.trim();
        if ureq::http::HeaderValue::from_str(value).is_err() {
            return Err(format!("line {}: the value of {name} is not valid", i + 1));
        }
        headers.push((name.to_string(), value.to_string()));
    }
    Ok(headers)
}

fn read_header_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let what = |e: String| format!("--http-header-file {}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| what(e.to_string()))?;
    if meta.len() > MAX_HEADER_FILE {
        return Err(what(format!("larger than {MAX_HEADER_FILE} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| what(e.to_string()))?;
    let headers = parse_headers(&text).map_err(what)?;
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    log::info!("sending the headers {names:?} with every HTTP request (values not shown)");
    Ok(headers)
}

/// `http(s)://HOST[:PORT]/PATH/` → the base URL, ending in `/`.
pub fn parse_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("--source {url}: expected http(s)://HOST[:PORT]/PATH/"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains(['?', '#', ' ']) {
        return Err(format!(
            "--source {url}: expected http(s)://HOST[:PORT]/PATH/ (no query, no fragment)"
        ));
    }
    let mut base = url.to_string();
    if !base.ends_with('/') {
        base.push('/');
    }
    Ok(base)
}

/// GET `url` (with `range`, if any), the body read up to `max` bytes (more is an error).
fn get(
    http: &HttpAgent,
    url: &str,
    range: Option<(u64, u64)>,
    max: u64,
) -> Result<(u16, Vec<u8>, String), String> {
    let mut req = http.agent.get(url);
    for (name, value) in http.headers.iter() {
        req = req.header(name.as_str(), value.as_str());
    }
    if let Some((offset, len)) = range {
        req = req.header("Range", format!("bytes={}-{}", offset, offset + len - 1));
    }
    let mut resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let content_range = resp
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !(200..300).contains(&status) {
        // Not the data: a short error page, read so the connection can be reused.
        let _ = resp.body_mut().with_config().limit(64 * 1024).read_to_vec();
        return Ok((status, Vec::new(), content_range));
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(max)
        .read_to_vec()
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    Ok((status, body, content_range))
}

/// Why a status is not the one wanted: 401/403 say that credentials are missing or wrong.
fn status_error(url: &str, status: u16) -> String {
    match status {
        401 | 403 => format!(
            "GET {url}: HTTP status {status}: the server refused access (missing or wrong \
             credentials? --http-header-file FILE sends e.g. an Authorization header)"
        ),
        _ => format!("GET {url}: HTTP status {status}"),
    }
}

/// Fetch and check the manifest and the checksum table.
pub fn fetch_manifest(http: &HttpAgent, base: &str) -> Result<(Manifest, Vec<u32>), String> {
    let url = format!("{base}{MANIFEST_FILE}");
    let (status, json, _) = get(http, &url, None, MAX_MANIFEST)?;
    if status != 200 {
        return Err(status_error(&url, status));
    }
    let manifest = Manifest::parse(Path::new(&url), &json).map_err(|e| format!("{e}"))?;
    let url = format!("{base}{CHECKSUM_FILE}");
    let max = 20 + 4 * np::chunks_in(manifest.data_len);
    let (status, sums, _) = get(http, &url, None, max)?;
    if status != 200 {
        return Err(status_error(&url, status));
    }
    let table = umm::image::parse_checksums(Path::new(&url), &sums, manifest.data_len)
        .map_err(|e| format!("{e}"))?;
    Ok((manifest, table))
}

/// Whether a `Content-Range` header is `bytes OFFSET-LAST/TOTAL` for this request, TOTAL the
/// manifest's data length (or `*`, unknown).
fn content_range_matches(header: &str, offset: u64, len: u64, data_len: u64) -> bool {
    let Some((range, total)) = header
        .trim()
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
    else {
        return false;
    };
    let total_ok = total == "*" || total.parse::<u64>() == Ok(data_len);
    let range_ok = range.split_once('-').is_some_and(|(a, b)| {
        a.parse::<u64>() == Ok(offset) && b.parse::<u64>() == Ok(offset + len - 1)
    });
    total_ok && range_ok
}

/// `len` bytes of the data file at `offset`, every chunk checked against `table`.
fn fetch_range(
    http: &HttpAgent,
    data_url: &str,
    offset: u64,
    len: u64,
    data_len: u64,
    table: &[u32],
) -> Result<Vec<u8>, String> {
    let (status, bytes, content_range) = get(http, data_url, Some((offset, len)), len)?;
    if status == 401 || status == 403 {
        return Err(status_error(data_url, status));
    }
    if status != 206 {
        return Err(format!(
            "GET {data_url} bytes {offset}-{}: HTTP status {status} (206 Partial Content \
             expected: the server must answer Range requests)",
            offset + len - 1
        ));
    }
    if !content_range_matches(&content_range, offset, len, data_len) {
        return Err(format!(
            "GET {data_url}: Content-Range {content_range:?}, expected \"bytes {offset}-{}/\
             {data_len}\" (a different or changed data file?)",
            offset + len - 1
        ));
    }
    if bytes.len() as u64 != len {
        return Err(format!(
            "GET {data_url} bytes {offset}-{}: {} bytes arrived",
            offset + len - 1,
            bytes.len()
        ));
    }
    let first = offset / CHUNK_SIZE;
    for (i, chunk) in bytes.chunks(CHUNK_SIZE as usize).enumerate() {
        let n = first + i as u64;
        let crc = crc32c::crc32c(chunk);
        let want = table.get(n as usize).copied();
        if want != Some(crc) {
            return Err(format!(
                "refused data from {data_url}: chunk {n} (bytes {:#x}..{:#x}) arrived corrupt: \
                 CRC-32C {crc:#010x}, the image {:#010x}",
                n * CHUNK_SIZE,
                n * CHUNK_SIZE + chunk.len() as u64,
                want.unwrap_or(0)
            ));
        }
    }
    Ok(bytes)
}

/// Start the transport: the dispatcher and the fetchers. The loop sends Get frames (and
/// Complete) on the returned sender; replies come on `replies`, each followed by a `wake`.
pub fn start(
    http: HttpAgent,
    base: &str,
    data_len: u64,
    table: Vec<u32>,
    replies: Sender<Reply>,
    wake: Arc<EventFd>,
) -> Result<Sender<Frame>, String> {
    let data_url: Arc<str> = format!("{base}{DATA_FILE}").into();
    let table = Arc::new(table);
    let (req_tx, req_rx) = crossbeam_channel::unbounded::<Frame>();
    let (urgent_tx, urgent_rx) = crossbeam_channel::unbounded::<(u64, u64, u64)>();
    let (bg_tx, bg_rx) = crossbeam_channel::unbounded::<(u64, u64, u64)>();
    let pools = [
        ("umm-http-urgent", URGENT_FETCHERS, urgent_rx),
        ("umm-http-bg", BACKGROUND_FETCHERS, bg_rx),
    ];
    for (name, n, rx) in pools {
        for _ in 0..n {
            let (http, rx, replies, wake, url, table) = (
                http.clone(),
                rx.clone(),
                replies.clone(),
                wake.clone(),
                data_url.clone(),
                table.clone(),
            );
            crate::helper_thread::spawn(name, move || {
                fetcher(&http, &url, data_len, &table, &rx, &replies, &wake)
            })
            .map_err(|e| format!("cannot start an HTTP fetcher: {e}"))?;
        }
    }
    crate::helper_thread::spawn("umm-http-dispatch", move || {
        dispatch(&req_rx, &urgent_tx, &bg_tx, &replies, &wake)
    })
    .map_err(|e| format!("cannot start the HTTP dispatcher: {e}"))?;
    Ok(req_tx)
}

/// Route the loop's requests: faults' to the urgent fetchers, the rest to the background ones.
fn dispatch(
    requests: &Receiver<Frame>,
    urgent: &Sender<(u64, u64, u64)>,
    background: &Sender<(u64, u64, u64)>,
    replies: &Sender<Reply>,
    wake: &EventFd,
) {
    for f in requests.iter() {
        match f {
            Frame::Get {
                id,
                offset,
                len,
                flags,
            } => {
                let to = if flags & np::GET_URGENT != 0 {
                    urgent
                } else {
                    background
                };
                let _ = to.send((id, offset, u64::from(len)));
            }
            // Nothing to tell an HTTP server: the conversation is over.
            Frame::Complete => {
                let _ = replies.send(Reply::Closed);
                let _ = wake.write(1);
                return;
            }
            _ => {}
        }
    }
}

fn fetcher(
    http: &HttpAgent,
    data_url: &str,
    data_len: u64,
    table: &[u32],
    requests: &Receiver<(u64, u64, u64)>,
    replies: &Sender<Reply>,
    wake: &EventFd,
) {
    for (id, offset, len) in requests.iter() {
        let (reply, last) = match fetch_range(http, data_url, offset, len, data_len, table) {
            Ok(bytes) => (
                Reply::Data {
                    id,
                    offset,
                    bytes,
                    urgent_connection: false,
                },
                false,
            ),
            Err(e) => (Reply::Failed(e), true),
        };
        let sent = replies.send(reply).is_ok();
        let _ = wake.write(1);
        if !sent || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/img").unwrap(),
            "http://127.0.0.1:8080/img/"
        );
        assert_eq!(parse_url("http://h/a/b/").unwrap(), "http://h/a/b/");
        assert_eq!(parse_url("https://h/img").unwrap(), "https://h/img/");
        assert!(parse_url("http:///img/").is_err());
        assert!(parse_url("http://h/img/?x=1").is_err());
        assert!(parse_url("ftp://h/img/").is_err());
    }

    #[test]
    fn header_files_are_name_value_lines_and_errors_never_show_a_value() {
        let h = parse_headers("# token\nAuthorization: Bearer abc\r\n\nX-Amz-Date:  1 \n").unwrap();
        assert_eq!(
            h,
            vec![
                ("Authorization".to_string(), "Bearer abc".to_string()),
                ("X-Amz-Date".to_string(), "1".to_string())
            ]
        );
        let e = parse_headers("Authorization Bearer secret\n").unwrap_err();
        assert!(e.contains("line 1") && !e.contains("secret"), "{e}");
        let e = parse_headers("Bad Name: secret\n").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        let e = parse_headers("X: sec\u{1}ret\n").unwrap_err();
        assert!(!e.contains("sec"), "{e}");
    }

    #[test]
    fn content_range_must_be_the_range_asked_of_the_data_file() {
        assert!(content_range_matches(
            "bytes 65536-131071/200000",
            65536,
            65536,
            200000
        ));
        assert!(content_range_matches("bytes 0-9/*", 0, 10, 200000));
        assert!(!content_range_matches("bytes 0-9/300000", 0, 10, 200000));
        assert!(!content_range_matches("bytes 0-19/200000", 0, 10, 200000));
        assert!(!content_range_matches("", 0, 10, 200000));
    }
}
