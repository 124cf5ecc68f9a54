//! `umm migrate-source PID --listen ADDR:PORT --key FILE`: post-copy live migration's source
//! side. The process is frozen (ptrace, [`umm::snapshot::describe`]) and its private anonymous
//! memory described as an image exactly as `umm snapshot` would write it; that image is then
//! served with the page-server protocol (`crate::net_server`, umm-protocol(5)) straight from
//! the frozen process's memory (`process_vm_readv`, `/proc/PID/mem` where it refuses), so the
//! destination's `umm restore --source tcp://` works unchanged. No image is written.
//!
//! Checksums: the protocol sends the per-chunk CRC-32C table in its Manifest frame, before any
//! data, so the table is computed up front, from one read of every data page while the process
//! is frozen. Every chunk read again to be sent is checked against it: memory that changed
//! under the freeze (another process sharing the address space) is never sent; the destination
//! gets an Error and stops.
//!
//! End: the destination says Complete → the process is killed (its memory now lives on the
//! destination). The destination fails before that (connection lost, an error, a signal to
//! this command) → the process is resumed untouched. `--kill-after SECS`: once every byte was
//! sent, the process is killed after SECS even without Complete.
//!
//! One destination: connections are taken one at a time; the first that authenticates is the
//! destination (a refused peer is logged and the next connection taken).

use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use crossbeam_channel::RecvTimeoutError;
use nix::errno::Errno;

use umm::image::{Manifest, CHUNK_SIZE};
use umm::netproto::Key;
use umm::snapshot::{self, Options};
use umm::sys::ptrace::{ProcessMemory, IOV_MAX};

use crate::abort_signals::AbortSignals;
use crate::net_server::{self, ServedData, REFUSED};
use crate::net_tls::{self, ServerTlsArgs};

#[derive(Args, Debug)]
#[command(
    long_about = "Post-copy live migration, source side: freeze the process (ptrace), describe \
    its private anonymous memory as umm snapshot would (no image is written) and serve it with \
    the page-server protocol to one `umm restore --source tcp://ADDR:PORT` on the destination, \
    straight from the frozen process. When the destination says its restore is complete, the \
    process is killed; if the destination fails first, the process is resumed untouched. umm \
    moves memory only: the destination's restorer recreates the rest of the process."
)]
pub struct MigrateSourceArgs {
    /// The process to migrate.
    #[arg(value_name = "PID")]
    pid: u32,
    /// Address and port to listen on (port 0: any free port; the one chosen is printed).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The pre-shared key file (as for umm page-server).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Once every byte of data was sent, kill the process after SECS seconds even if the
    /// destination never says Complete.
    #[arg(long, value_name = "SECS")]
    kill_after: Option<u64>,
    /// Only this address range (as umm snapshot --range); repeatable.
    #[arg(long = "range", value_name = "START-END", value_parser = snapshot::parse_range)]
    ranges: Vec<Range<u64>>,
    /// Seconds each thread may take to stop.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    stop_timeout: u64,
    #[command(flatten)]
    tls: ServerTlsArgs,
}

/// How often the main thread looks at signals and the --kill-after deadline.
const TICK: Duration = Duration::from_millis(100);

pub fn main(args: MigrateSourceArgs) -> i32 {
    match migrate(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("umm: migrate-source: {e}");
            1
        }
    }
}

/// A frozen process's memory, as the data of the image that describes it.
struct ProcessData {
    mem: ProcessMemory,
    manifest: Manifest,
    checksums: Vec<u32>,
    /// (data offset, address, length, readable) of every run, by data offset.
    runs: Vec<(u64, u64, u64, bool)>,
    /// Chunks sent at least once, and how many.
    sent: Mutex<Vec<bool>>,
    sent_count: AtomicU64,
    all_sent: AtomicBool,
}

impl ProcessData {
    fn new(mem: ProcessMemory, manifest: Manifest, checksums: Vec<u32>) -> ProcessData {
        let mut runs = Vec::new();
        for r in &manifest.regions {
            for run in &r.runs {
                runs.push((
                    run.data_offset,
                    r.start + run.offset,
                    run.len,
                    r.prot & 1 != 0,
                ));
            }
        }
        runs.sort_unstable();
        let chunks = checksums.len();
        ProcessData {
            mem,
            manifest,
            checksums,
            runs,
            sent: Mutex::new(vec![false; chunks]),
            sent_count: AtomicU64::new(0),
            all_sent: AtomicBool::new(chunks == 0),
        }
    }

    /// The process ranges holding data `offset..offset + len`, in order, with whether
    /// process_vm_readv may read them.
    fn segments(&self, offset: u64, len: u64) -> Result<Vec<(Range<u64>, bool)>, String> {
        let end = offset + len;
        let mut i = self.runs.partition_point(|r| r.0 + r.2 <= offset);
        let mut at = offset;
        let mut out = Vec::new();
        while at < end {
            let Some(&(data, addr, run_len, readable)) = self.runs.get(i) else {
                break;
            };
            if data > at {
                break;
            }
            let take = (data + run_len).min(end) - at;
            let a = addr + (at - data);
            out.push((a..a + take, readable));
            at += take;
            i += 1;
        }
        if at != end {
            return Err(format!(
                "data {offset:#x}+{len:#x} is not covered by the description (at {at:#x})"
            ));
        }
        Ok(out)
    }

    fn read_into(&self, segs: &[(Range<u64>, bool)], buf: &mut [u8]) -> Result<(), String> {
        let pid = self.mem.pid();
        let mut pos = 0usize;
        for batch in segs.chunks(IOV_MAX) {
            for (r, readable) in batch {
                let n = (r.end - r.start) as usize;
                let dst = &mut buf[pos..pos + n];
                let mut got = 0;
                if *readable {
                    match self.mem.read_vm(std::slice::from_ref(r), dst) {
                        Ok(k) => got = k,
                        Err(Errno::EFAULT | Errno::EPERM | Errno::EIO) => {}
                        Err(e) => {
                            return Err(format!(
                                "process_vm_readv of pid {pid} at {:#x}+{n:#x}: {e}",
                                r.start
                            ))
                        }
                    }
                }
                if got < n {
                    let k = self
                        .mem
                        .read_mem(r.start + got as u64, &mut dst[got..])
                        .map_err(|e| {
                            format!(
                                "reading /proc/{pid}/mem at {:#x}: {e}",
                                r.start + got as u64
                            )
                        })?;
                    if got + k < n {
                        return Err(format!(
                            "pid {pid}: {:#x} cannot be read any more (it could when the \
                             memory was described)",
                            r.start + (got + k) as u64
                        ));
                    }
                }
                pos += n;
            }
        }
        Ok(())
    }
}

impl ServedData for ProcessData {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn checksums(&self) -> &[u32] {
        &self.checksums
    }

    fn read(&self, offset: u64, len: u64) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        let segs = self.segments(offset, len)?;
        let mut buf = vec![0u8; len as usize];
        self.read_into(&segs, &mut buf)?;
        let first = offset / CHUNK_SIZE;
        for (i, chunk) in buf.chunks(CHUNK_SIZE as usize).enumerate() {
            let n = first + i as u64;
            let crc = crc32c::crc32c(chunk);
            let want = self.checksums.get(n as usize).copied();
            if want != Some(crc) {
                return Err(format!(
                    "chunk {n} of pid {}'s memory changed since it was described (CRC-32C \
                     {crc:#010x}, described {:#010x}): not sent",
                    self.mem.pid(),
                    want.unwrap_or(0)
                ));
            }
        }
        Ok(buf.into())
    }

    fn sent(&self, offset: u64, len: u64) {
        let chunks = offset / CHUNK_SIZE..(offset + len).div_ceil(CHUNK_SIZE);
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let mut new = 0;
        for c in chunks {
            if let Some(s) = sent.get_mut(c as usize) {
                new += u64::from(!*s);
                *s = true;
            }
        }
        let total = self.sent_count.fetch_add(new, Ordering::AcqRel) + new;
        if total == sent.len() as u64 {
            self.all_sent.store(true, Ordering::Release);
        }
    }
}

/// What the serving thread tells the main thread.
enum Event {
    /// A peer authenticated: it is the destination.
    Destination(String),
    /// The destination's conversation ended: Ok(true) Complete, Ok(false) closed, Err failed.
    Ended(Result<bool, String>),
}

fn migrate(args: MigrateSourceArgs) -> Result<i32, String> {
    let key = Key::from_file(&args.key)?;
    let tls = args.tls.load()?;
    // Before the freeze (helper threads inherit the mask): a signal resumes the process.
    let signals = AbortSignals::block();
    let interrupted = || signals.interrupted();
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("listening socket: {e}"))?;
    let pid = args.pid;
    let t0 = Instant::now();
    let mut opts = Options::new(pid, PathBuf::new());
    opts.ranges = args.ranges.clone();
    opts.stop_timeout = Duration::from_secs(args.stop_timeout.max(1));
    opts.interrupted = Some(&interrupted);
    let described =
        snapshot::describe(&opts).map_err(|e| format!("cannot describe pid {pid}: {e}"))?;
    let frozen = described.frozen;
    let mem = ProcessMemory::open(pid).map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
    let data_len = described.manifest.data_len;
    let regions = described.manifest.regions.len();
    let data = Arc::new(ProcessData::new(
        mem,
        described.manifest,
        described.checksums,
    ));
    eprintln!(
        "umm: migrate-source: pid {pid} frozen ({} threads), {regions} regions, {} of data \
         described in {:.3} s; serving on {local}",
        frozen.threads(),
        umm::human_bytes(data_len),
        t0.elapsed().as_secs_f64()
    );
    if described.unreadable_pages > 0 {
        log::warn!(
            "pid {pid}: {} populated pages could not be read and are holes",
            described.unreadable_pages
        );
    }

    let (tx, rx) = crossbeam_channel::unbounded::<Event>();
    {
        let data: Arc<dyn ServedData> = data.clone();
        crate::helper_thread::spawn("umm-migrate-serve", move || {
            serve_one_destination(listener, &data, &key, tls, &tx)
        })
        .map_err(|e| format!("cannot start the server thread: {e}"))?;
    }

    let kill_after = args.kill_after.map(Duration::from_secs);
    let mut all_sent_at: Option<Instant> = None;
    let mut destination: Option<String> = None;
    let outcome = loop {
        if interrupted() {
            break Outcome::Resume(format!(
                "signal {} before the destination completed",
                signals.caught().unwrap_or(0)
            ));
        }
        if all_sent_at.is_none() && data.all_sent.load(Ordering::Acquire) {
            all_sent_at = Some(Instant::now());
        }
        if let (Some(limit), Some(at)) = (kill_after, all_sent_at) {
            if at.elapsed() >= limit {
                break Outcome::Kill(format!(
                    "every byte was sent {} s ago (--kill-after) without Complete",
                    limit.as_secs()
                ));
            }
        }
        match rx.recv_timeout(TICK) {
            Ok(Event::Destination(peer)) => {
                eprintln!("umm: migrate-source: destination {peer} authenticated");
                destination = Some(peer);
            }
            Ok(Event::Ended(Ok(true))) => {
                break Outcome::Kill("the destination completed its restore".into())
            }
            Ok(Event::Ended(Ok(false))) => {
                break Outcome::Resume(
                    "the destination closed the connection before completing".into(),
                )
            }
            Ok(Event::Ended(Err(e))) => {
                break Outcome::Resume(format!("the destination failed: {e}"))
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                break Outcome::Resume("the server thread ended".into())
            }
        }
    };
    let dest = destination.unwrap_or_else(|| "no destination".into());
    match outcome {
        Outcome::Kill(why) => {
            frozen
                .kill(opts.stop_timeout)
                .map_err(|e| format!("{why}, but killing pid {pid} failed: {e}"))?;
            eprintln!(
                "umm: migrate-source: {why} ({dest}, {} of {} chunks sent); pid {pid} killed",
                data.sent_count.load(Ordering::Acquire),
                data.checksums.len()
            );
            Ok(0)
        }
        Outcome::Resume(why) => {
            frozen
                .resume()
                .map_err(|e| format!("{why}; resuming pid {pid} failed: {e}"))?;
            eprintln!("umm: migrate-source: {why} ({dest}); pid {pid} resumed untouched");
            Ok(signals.caught().map_or(1, |s| 128 + s))
        }
    }
}

enum Outcome {
    Kill(String),
    Resume(String),
}

/// Take connections one at a time until one authenticates; serve it to its end.
fn serve_one_destination(
    listener: TcpListener,
    data: &Arc<dyn ServedData>,
    key: &Key,
    tls: Option<Arc<rustls::ServerConfig>>,
    events: &crossbeam_channel::Sender<Event>,
) {
    for conn in listener.incoming() {
        let socket = match conn {
            Ok(s) => s,
            Err(e) => {
                net_server::accept_failed(&e);
                continue;
            }
        };
        let peer = socket
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        // The source stays frozen while this runs: a slow peer must not hold it up for long.
        let deadline = match net_server::HandshakeDeadline::start(
            &socket,
            &peer,
            net_server::handshake_deadline(),
        ) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("{peer}: cannot bound its handshake ({e}); closed");
                continue;
            }
        };
        let mut stream = match net_tls::accept(socket, &peer, tls.as_ref()) {
            Ok(s) => s,
            // Said in one line already.
            Err(e) if e.starts_with(REFUSED) => continue,
            Err(e) => {
                log::warn!("{peer}: {e}");
                continue;
            }
        };
        let sessions = net_server::Sessions::default();
        let hooks = net_server::TestHooks::default();
        let session =
            match net_server::handshake(&mut stream, &peer, data.as_ref(), key, hooks, &sessions) {
                Ok(net_server::Opened::Restore(s)) => s,
                Ok(net_server::Opened::Urgent(_)) => continue, // not joined: no session yet
                Err(e) if e.starts_with(REFUSED) => continue,
                Err(e) => {
                    log::warn!("{peer}: {e}");
                    continue;
                }
            };
        drop(deadline);
        // The one destination: from now on only its urgent connection.
        {
            let (data, key, sessions) = (data.clone(), key.clone(), sessions.clone());
            let spawned = std::thread::Builder::new()
                .name("umm-ms-urgent".into())
                .spawn(move || net_server::accept_urgent(listener, data, key, sessions, tls));
            if let Err(e) = spawned {
                log::warn!("no urgent connection for the destination: {e}");
            }
        }
        let _ = events.send(Event::Destination(peer));
        let ended = net_server::answer(stream, session, data, hooks, &sessions);
        let _ = events.send(Event::Ended(ended));
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use umm::image::{DataRun, Region};

    #[test]
    fn data_offsets_map_to_the_runs_addresses() {
        let region = |start, runs: Vec<DataRun>| Region {
            start,
            len: 0x10000,
            prot: 3,
            flags: vec!["private".into(), "anonymous".into()],
            name: String::new(),
            runs,
        };
        let manifest = Manifest {
            version: 1,
            page_size: 4096,
            chunk_size: CHUNK_SIZE,
            data_len: 0x4000,
            source_pid: 1,
            source_exe: String::new(),
            created_unix: 0,
            regions: vec![
                region(
                    0x10000,
                    vec![DataRun {
                        offset: 0x1000,
                        len: 0x2000,
                        data_offset: 0,
                    }],
                ),
                region(
                    0x40000,
                    vec![DataRun {
                        offset: 0,
                        len: 0x2000,
                        data_offset: 0x2000,
                    }],
                ),
            ],
        };
        let mem = ProcessMemory::open(std::process::id()).unwrap();
        let d = ProcessData::new(mem, manifest, vec![0]);
        let segs = d.segments(0x1000, 0x2000).unwrap();
        assert_eq!(
            segs,
            vec![(0x12000..0x13000, true), (0x40000..0x41000, true)]
        );
        assert!(d.segments(0x3000, 0x2000).is_err(), "past the data");
    }
}
