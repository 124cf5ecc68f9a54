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
//! Client: `minreq` without TLS features (no dependencies of its own). It opens a connection
//! per request (no keep-alive pool): one more round trip per request, which the large
//! background requests and the parallel fetchers hide. `https://` is refused: no small TLS
//! stack fits here (see README).

use std::path::Path;
use std::sync::Arc;

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
const REQUEST_TIMEOUT_SECS: u64 = 30;
/// Largest manifest accepted.
const MAX_MANIFEST: u64 = umm::image::MAX_MANIFEST_BYTES;

/// `http://HOST[:PORT]/PATH/` → the base URL, ending in `/`. `https://` is refused.
pub fn parse_url(url: &str) -> Result<String, String> {
    if url.starts_with("https://") {
        return Err(format!(
            "--source {url}: https:// is not supported (this build's HTTP client has no TLS); \
             use http:// on a trusted network, or tcp:// with umm page-server (authenticated \
             with a pre-shared key)"
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--source {url}: expected http://HOST[:PORT]/PATH/"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains(['?', '#', ' ']) {
        return Err(format!(
            "--source {url}: expected http://HOST[:PORT]/PATH/ (no query, no fragment)"
        ));
    }
    let mut base = url.to_string();
    if !base.ends_with('/') {
        base.push('/');
    }
    Ok(base)
}

/// GET `url` (with `range`, if any), the body read up to `max` bytes (more is an error).
fn get(url: &str, range: Option<(u64, u64)>, max: u64) -> Result<(i32, Vec<u8>, String), String> {
    let mut req = minreq::get(url).with_timeout(REQUEST_TIMEOUT_SECS);
    if let Some((offset, len)) = range {
        req = req.with_header("Range", format!("bytes={}-{}", offset, offset + len - 1));
    }
    let resp = req.send_lazy().map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status_code;
    let content_range = resp
        .headers
        .get("content-range")
        .cloned()
        .unwrap_or_default();
    let mut body = Vec::with_capacity(range.map_or(0, |r| r.1 as usize));
    for byte in resp {
        let (b, _) = byte.map_err(|e| format!("GET {url}: reading the body: {e}"))?;
        if body.len() as u64 == max {
            return Err(format!("GET {url}: body longer than {max} bytes"));
        }
        body.push(b);
    }
    Ok((status, body, content_range))
}

/// Fetch and check the manifest and the checksum table.
pub fn fetch_manifest(base: &str) -> Result<(Manifest, Vec<u32>), String> {
    let url = format!("{base}{MANIFEST_FILE}");
    let (status, json, _) = get(&url, None, MAX_MANIFEST)?;
    if status != 200 {
        return Err(format!("GET {url}: HTTP status {status}"));
    }
    let manifest = Manifest::parse(Path::new(&url), &json).map_err(|e| format!("{e}"))?;
    let url = format!("{base}{CHECKSUM_FILE}");
    let max = 20 + 4 * np::chunks_in(manifest.data_len);
    let (status, sums, _) = get(&url, None, max)?;
    if status != 200 {
        return Err(format!("GET {url}: HTTP status {status}"));
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
    data_url: &str,
    offset: u64,
    len: u64,
    data_len: u64,
    table: &[u32],
) -> Result<Vec<u8>, String> {
    let (status, bytes, content_range) = get(data_url, Some((offset, len)), len)?;
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
            let (rx, replies, wake, url, table) = (
                rx.clone(),
                replies.clone(),
                wake.clone(),
                data_url.clone(),
                table.clone(),
            );
            crate::helper_thread::spawn(name, move || {
                fetcher(&url, data_len, &table, &rx, &replies, &wake)
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
    data_url: &str,
    data_len: u64,
    table: &[u32],
    requests: &Receiver<(u64, u64, u64)>,
    replies: &Sender<Reply>,
    wake: &EventFd,
) {
    for (id, offset, len) in requests.iter() {
        let (reply, last) = match fetch_range(data_url, offset, len, data_len, table) {
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
        assert!(parse_url("https://h/img/")
            .unwrap_err()
            .contains("https:// is not supported"));
        assert!(parse_url("http:///img/").is_err());
        assert!(parse_url("http://h/img/?x=1").is_err());
        assert!(parse_url("ftp://h/img/").is_err());
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
