//! `umm lazy-pages --page-server`: lazy pages fetched from CRIU's dump-side page server
//! (`criu dump --lazy-pages --port P`) instead of a local pages file. The protocol and the
//! CRIU facts it relies on are in `umm::criu::page_server`.
//!
//! Threads (DESIGN.md): a writer thread sends the requests the loop hands it (a channel), a
//! reader thread reads the replies (the server answers in order) and hands each finished
//! buffer to the loop through a channel plus an eventfd in the loop's poll set. Only the loop
//! touches uffds: it keeps each task's fetched pages in a [`RemoteStore`] (the `UFFDIO_COPY`
//! source, as a pages file is in local mode), and copies from there.
//!
//! Order: a fault's pages are asked before any queued background request; the rest of the
//! lazy memory is asked in the background from the handoff on, a few requests in flight
//! (pipelined), so the fill rarely waits. A reply with fewer pages than asked (the server
//! stops at the end of one of its buffers) is kept and the rest asked again. Any error (lost
//! connection, a reply that does not match its request) stops the restore: missing pages
//! must never read as zeros.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::sys::eventfd::{EfdFlags, EventFd};

use umm::criu::page_server::{Iov, IOV_LEN, PS_IOV_CLOSE};
use umm::criu::LazyRun;
use umm::PAGE_SIZE;

/// Largest request, in pages (a fault window is cut into requests this large).
const MAX_REQUEST_PAGES: u64 = 256;
/// Background requests are this large: small enough that a fault's request does not wait long
/// behind those in flight.
const BACKGROUND_PAGES: u64 = 64;
/// Requests in flight at once (the pipeline's depth).
const WINDOW: usize = 8;
/// How long the end of the conversation (PS_IOV_CLOSE and its status) may take.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One task's lazy pages as they arrive, by their address in the images. Shared (through
/// [`crate::page_source::PageSource`]) by the task and the children it forks during the fill.
pub struct RemoteStore {
    pid: u32,
    /// By start address; address-contiguous lazy runs are one segment, so any contiguous
    /// source range of lazy pages lies in one segment.
    segments: BTreeMap<u64, Segment>,
    /// Ranges faults need, asked first.
    urgent: VecDeque<Range<u64>>,
    /// Everything, in address order, asked when nothing is urgent.
    background: VecDeque<Range<u64>>,
}

struct Segment {
    data: Vec<u8>,
    arrived: Vec<bool>,
    requested: Vec<bool>,
}

impl RemoteStore {
    pub fn new(pid: u32, runs: &[LazyRun]) -> RemoteStore {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for r in runs {
            match ranges.last_mut() {
                Some(last) if last.end == r.pages_offset => last.end += r.len,
                _ => ranges.push(r.pages_offset..r.pages_offset + r.len),
            }
        }
        let mut background = VecDeque::new();
        let mut segments = BTreeMap::new();
        for range in ranges {
            let pages = ((range.end - range.start) / PAGE_SIZE) as usize;
            segments.insert(
                range.start,
                Segment {
                    // Zeroed lazily by the kernel: only what arrives is ever touched.
                    data: vec![0u8; pages * PAGE_SIZE as usize],
                    arrived: vec![false; pages],
                    requested: vec![false; pages],
                },
            );
            let mut at = range.start;
            while at < range.end {
                let end = (at + BACKGROUND_PAGES * PAGE_SIZE).min(range.end);
                background.push_back(at..end);
                at = end;
            }
        }
        RemoteStore {
            pid,
            segments,
            urgent: VecDeque::new(),
            background,
        }
    }

    /// The segment holding `addr`: (its start, it).
    fn segment(&self, addr: u64) -> Option<(u64, &Segment)> {
        let (&start, seg) = self.segments.range(..=addr).next_back()?;
        (addr < start + seg.data.len() as u64).then_some((start, seg))
    }

    fn segment_mut(&mut self, addr: u64) -> Option<(u64, &mut Segment)> {
        let (&start, seg) = self.segments.range_mut(..=addr).next_back()?;
        (addr < start + seg.data.len() as u64).then_some((start, seg))
    }

    /// The bytes at `addr..addr + len` if they all arrived. Err: some are not lazy pages of
    /// this task (a bug or a bad image); Ok(None): not all arrived yet.
    pub fn data(&self, addr: u64, len: u64) -> Result<Option<&[u8]>, String> {
        let (start, seg) = self.segment(addr).ok_or_else(|| self.not_lazy(addr, len))?;
        let (first, end) = (addr - start, addr - start + len);
        if end > seg.data.len() as u64 {
            return Err(self.not_lazy(addr, len));
        }
        let pages = (first / PAGE_SIZE) as usize..end.div_ceil(PAGE_SIZE) as usize;
        if seg.arrived[pages].iter().all(|&a| a) {
            return Ok(Some(&seg.data[first as usize..end as usize]));
        }
        Ok(None)
    }

    fn not_lazy(&self, addr: u64, len: u64) -> String {
        format!(
            "pid {}: {addr:#x}+{len:#x} is not a lazy range of the images",
            self.pid
        )
    }

    /// A fault needs `addr..addr + len`: ask for it before the background.
    pub fn want(&mut self, addr: u64, len: u64) {
        self.urgent.push_back(addr..addr + len);
    }

    /// The next request (urgent first): the first pages of a queued range not asked yet,
    /// marked asked. None: nothing left to ask.
    pub fn next_request(&mut self) -> Option<Iov> {
        loop {
            let (range, urgent) = match self.urgent.pop_front() {
                Some(r) => (r, true),
                None => (self.background.pop_front()?, false),
            };
            let Some((start, seg)) = self.segment_mut(range.start) else {
                continue;
            };
            let seg_end = start + seg.data.len() as u64;
            let end = range.end.min(seg_end);
            let mut first = (range.start - start) / PAGE_SIZE;
            let last = (end - start).div_ceil(PAGE_SIZE);
            while first < last && seg.requested[first as usize] {
                first += 1;
            }
            if first == last {
                continue;
            }
            let mut stop = first;
            while stop < last && stop - first < MAX_REQUEST_PAGES && !seg.requested[stop as usize] {
                seg.requested[stop as usize] = true;
                stop += 1;
            }
            if stop < last {
                let rest = start + stop * PAGE_SIZE..end;
                if urgent {
                    self.urgent.push_front(rest);
                } else {
                    self.background.push_front(rest);
                }
            }
            return Some(Iov::get(self.pid, start + first * PAGE_SIZE, stop - first));
        }
    }

    /// `data` arrived for `addr`; the pages of `asked` it does not cover are asked again, first.
    fn arrived(&mut self, addr: u64, data: &[u8], asked: Range<u64>) -> Result<(), String> {
        let len = data.len() as u64;
        let pid = self.pid;
        let (start, seg) = self
            .segment_mut(addr)
            .filter(|(s, seg)| addr + len <= s + seg.data.len() as u64)
            .ok_or_else(|| format!("pid {pid}: reply for {addr:#x}+{len:#x}, not a lazy range"))?;
        let off = (addr - start) as usize;
        seg.data[off..off + data.len()].copy_from_slice(data);
        let first = off / PAGE_SIZE as usize;
        seg.arrived[first..first + data.len() / PAGE_SIZE as usize].fill(true);
        if addr + len < asked.end {
            let rest = addr + len..asked.end;
            let (a, b) = (
                ((rest.start - start) / PAGE_SIZE) as usize,
                ((rest.end - start) / PAGE_SIZE) as usize,
            );
            seg.requested[a..b].fill(false);
            self.urgent.push_front(rest);
        }
        Ok(())
    }
}

/// What the reader thread hands the loop.
enum Reply {
    Pages { asked: Iov, got: Iov, data: Vec<u8> },
    Closed(i32),
    Failed(String),
}

/// The loop's side of the connection.
pub struct PageServerClient {
    peer: String,
    requests: Option<Sender<Iov>>,
    replies: Receiver<Reply>,
    wake: Arc<EventFd>,
    stores: Vec<Rc<RefCell<RemoteStore>>>,
    in_flight: usize,
    pub requests_sent: u64,
    pub short_replies: u64,
    pub bytes_fetched: u64,
}

impl PageServerClient {
    /// Connect to the page server at `addr` and start the helper threads.
    pub fn connect(addr: &str) -> Result<PageServerClient, String> {
        let stream =
            TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        // A dump host that vanishes must stop the restore (fail-stop), not leave its faults
        // waiting for hours.
        umm::sys::socket::detect_dead_tcp_peer(&stream)
            .map_err(|e| format!("{addr}: keep-alive: {e}"))?;
        let reader = stream
            .try_clone()
            .map_err(|e| format!("page server socket: {e}"))?;
        let wake = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| format!("eventfd: {e}"))?,
        );
        let (req_tx, req_rx) = crossbeam_channel::unbounded::<Iov>();
        let (order_tx, order_rx) = crossbeam_channel::unbounded::<Iov>();
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded::<Reply>();
        let peer = addr.to_string();
        {
            let (reply_tx, wake) = (reply_tx.clone(), wake.clone());
            crate::helper_thread::spawn("umm-ps-writer", move || {
                write_requests(stream, req_rx, order_tx, reply_tx, wake)
            })
            .map_err(|e| format!("cannot start the page server writer: {e}"))?;
        }
        {
            let wake = wake.clone();
            crate::helper_thread::spawn("umm-ps-reader", move || {
                read_replies(reader, order_rx, reply_tx, wake)
            })
            .map_err(|e| format!("cannot start the page server reader: {e}"))?;
        }
        Ok(PageServerClient {
            peer,
            requests: Some(req_tx),
            replies: reply_rx,
            wake,
            stores: Vec::new(),
            in_flight: 0,
            requests_sent: 0,
            short_replies: 0,
            bytes_fetched: 0,
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The eventfd the loop polls: readable when replies wait.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub fn add_store(&mut self, store: Rc<RefCell<RemoteStore>>) {
        self.stores.push(store);
    }

    /// Hand the writer requests until the window is full: every store's urgent ones first.
    pub fn pump(&mut self) {
        let Some(tx) = &self.requests else { return };
        while self.in_flight < WINDOW {
            let urgent = self.stores.iter().find(|s| !s.borrow().urgent.is_empty());
            let next = match urgent {
                Some(s) => s.borrow_mut().next_request(),
                None => self
                    .stores
                    .iter()
                    .find_map(|s| s.borrow_mut().next_request()),
            };
            let Some(req) = next else { return };
            if tx.send(req).is_err() {
                return; // the writer stopped: its reason is on the reply channel
            }
            self.in_flight += 1;
            self.requests_sent += 1;
        }
    }

    /// Take the replies that arrived into their stores. Err: the connection failed.
    pub fn on_readable(&mut self) -> Result<usize, String> {
        let _ = self.wake.read();
        let mut got = 0;
        while let Ok(reply) = self.replies.try_recv() {
            match reply {
                Reply::Pages {
                    asked,
                    got: hdr,
                    data,
                } => {
                    self.in_flight -= 1;
                    got += 1;
                    if hdr.nr_pages < asked.nr_pages {
                        self.short_replies += 1;
                    }
                    self.bytes_fetched += data.len() as u64;
                    let store = self
                        .stores
                        .iter()
                        .find(|s| u64::from(s.borrow().pid) == asked.dst_id)
                        .ok_or_else(|| format!("a reply for unknown pid {}", asked.dst_id))?;
                    let asked_range = asked.vaddr..asked.vaddr + asked.nr_pages * PAGE_SIZE;
                    store.borrow_mut().arrived(hdr.vaddr, &data, asked_range)?;
                }
                Reply::Closed(status) => {
                    return Err(format!("the page server ended the connection ({status})"))
                }
                Reply::Failed(e) => return Err(e),
            }
        }
        self.pump();
        Ok(got)
    }

    /// What was fetched, for the report.
    pub fn report(&self) -> crate::stats::PageServerReport {
        crate::stats::PageServerReport {
            peer: self.peer.clone(),
            requests: self.requests_sent,
            short_replies: self.short_replies,
            pages_fetched: self.bytes_fetched / PAGE_SIZE,
            bytes_fetched: self.bytes_fetched,
        }
    }

    /// End the conversation as CRIU does (PS_IOV_CLOSE, then the server's status), bounded.
    /// Replies still in flight are read (and counted) first.
    pub fn close(&mut self) -> Result<(), String> {
        drop(self.requests.take());
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(Reply::Closed(0)) => return Ok(()),
                Ok(Reply::Closed(s)) => return Err(format!("the page server ended with {s}")),
                Ok(Reply::Failed(e)) => return Err(e),
                Ok(Reply::Pages { asked, got, data }) => {
                    if got.nr_pages < asked.nr_pages {
                        self.short_replies += 1;
                    }
                    self.bytes_fetched += data.len() as u64;
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no answer to PS_IOV_CLOSE in {CLOSE_WAIT:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => return Err("connection gone".into()),
            }
        }
    }
}

/// The writer thread: send each request (telling the reader what to expect first); when the
/// loop drops its sender, send PS_IOV_CLOSE.
fn write_requests(
    mut stream: TcpStream,
    requests: Receiver<Iov>,
    order: Sender<Iov>,
    replies: Sender<Reply>,
    wake: Arc<EventFd>,
) {
    let mut send = |iov: Iov| -> bool {
        let _ = order.send(iov);
        if let Err(e) = stream.write_all(&iov.encode()) {
            let _ = replies.send(Reply::Failed(format!(
                "sending a request to the page server: {e}"
            )));
            let _ = wake.write(1);
            return false;
        }
        true
    };
    for req in requests.iter() {
        if !send(req) {
            return;
        }
    }
    send(Iov::close());
}

/// The reader thread: read the reply to each request in order, check it, hand it over.
fn read_replies(
    mut stream: TcpStream,
    order: Receiver<Iov>,
    replies: Sender<Reply>,
    wake: Arc<EventFd>,
) {
    let hand = |r: Reply| {
        let ok = replies.send(r).is_ok();
        let _ = wake.write(1);
        ok
    };
    for asked in order.iter() {
        if asked.cmd == PS_IOV_CLOSE {
            let mut status = [0u8; 4];
            let r = match stream.read_exact(&mut status) {
                Ok(()) => Reply::Closed(i32::from_ne_bytes(status)),
                Err(e) => Reply::Failed(format!("reading the close status: {e}")),
            };
            hand(r);
            return;
        }
        let what = || {
            format!(
                "the reply to GET {:#x}+{} pages of pid {}",
                asked.vaddr, asked.nr_pages, asked.dst_id
            )
        };
        let mut hdr = [0u8; IOV_LEN];
        if let Err(e) = stream.read_exact(&mut hdr) {
            hand(Reply::Failed(format!(
                "page server connection lost reading {}: {e}",
                what()
            )));
            return;
        }
        let got = Iov::decode(&hdr);
        if let Err(e) = got.check_reply_to(&asked) {
            hand(Reply::Failed(format!("bad page server reply: {e}")));
            return;
        }
        let mut data = vec![0u8; got.data_len()];
        if let Err(e) = stream.read_exact(&mut data) {
            hand(Reply::Failed(format!(
                "page server connection lost reading the data of {}: {e}",
                what()
            )));
            return;
        }
        if !hand(Reply::Pages { asked, got, data }) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> RemoteStore {
        let run = |start: u64, pages: u64| LazyRun {
            start,
            len: pages * PAGE_SIZE,
            pages_offset: start,
            vma: 0,
        };
        RemoteStore::new(7, &[run(0x10000, 100), run(0x10000 + 100 * PAGE_SIZE, 50)])
    }

    #[test]
    fn urgent_first_then_background_and_never_twice() {
        let mut s = store();
        s.want(0x10000 + 70 * PAGE_SIZE, 2 * PAGE_SIZE);
        let r = s.next_request().unwrap();
        assert_eq!((r.vaddr, r.nr_pages), (0x10000 + 70 * PAGE_SIZE, 2));
        let mut asked = 2;
        while let Some(r) = s.next_request() {
            assert!(r.nr_pages <= BACKGROUND_PAGES);
            asked += r.nr_pages;
        }
        assert_eq!(asked, 150, "every page asked once");
    }

    #[test]
    fn a_short_reply_asks_the_rest_again() {
        let mut s = store();
        let r = s.next_request().unwrap();
        assert_eq!(r.nr_pages, 64);
        let asked = r.vaddr..r.vaddr + 64 * PAGE_SIZE;
        s.arrived(r.vaddr, &vec![1u8; 10 * PAGE_SIZE as usize], asked)
            .unwrap();
        assert_eq!(s.data(r.vaddr, 10 * PAGE_SIZE).unwrap().unwrap()[0], 1);
        assert!(s.data(r.vaddr, 11 * PAGE_SIZE).unwrap().is_none());
        let again = s.next_request().unwrap();
        assert_eq!(
            (again.vaddr, again.nr_pages),
            (r.vaddr + 10 * PAGE_SIZE, 54)
        );
        assert!(s.data(0x1000, PAGE_SIZE).is_err(), "not lazy");
    }
}
