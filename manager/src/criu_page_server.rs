//! `umm criu-page-server -D DIR --port P`: the lazy pages of a CRIU image served with CRIU's
//! page-server protocol (issue 7, "the reverse too"): the dump side of a lazy migration for
//! images that are already written, for `criu lazy-pages --page-server` or `umm lazy-pages
//! --page-server` on another host.
//!
//! The protocol is the one `criu dump --lazy-pages --port P` speaks (facts and their CRIU
//! sources in `umm::criu::page_server`): the client sends 32-byte `PS_IOV_GET` requests (task
//! pid in the images, address, pages); each is answered in order with a `PS_IOV_ADD_F |
//! PE_PRESENT` header and the pages, clamped to the end of the lazy run holding the address
//! (a short reply, which clients expect); `PS_IOV_CLOSE` gets an `int32` 0 and ends the
//! server. A request for anything that is not a lazy page of the images (an unknown pid, an
//! address outside the lazy runs, an unaligned address, zero pages, another command) is
//! logged and the connection closed, as CRIU does: the client then stops its restore, never
//! reads wrong pages.
//!
//! Blocking I/O, one connection at a time (CRIU's lazy-pages daemon makes one); no event loop
//! and no userfaultfd here. The protocol has no authentication: the default address is
//! loopback, and `--address` exposes the images' memory to whoever can connect.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use umm::criu::page_server::{Iov, IOV_LEN, PS_IOV_CLOSE, PS_IOV_GET};
use umm::criu::{ImageDir, LazyRun, PagesFile};
use umm::PAGE_SIZE;

#[derive(Args, Debug)]
pub struct CriuPageServerArgs {
    /// The CRIU images directory (`criu dump -D`) whose lazy pages are served.
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub images_dir: PathBuf,
    /// The address to listen on (the protocol has no authentication: loopback by default).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub address: String,
    /// The TCP port to listen on.
    #[arg(long, value_name = "PORT")]
    pub port: u16,
}

/// One task's lazy pages: its runs (sorted, disjoint) and the pages file they are in.
struct TaskPages {
    runs: Vec<LazyRun>,
    pages: PagesFile,
}

/// Everything a client may ask for, by image pid.
struct Served {
    tasks: BTreeMap<u32, TaskPages>,
}

impl Served {
    fn open(dir: &std::path::Path) -> Result<Served, String> {
        let images = ImageDir::open(dir).map_err(|e| e.to_string())?;
        let mut tasks = BTreeMap::new();
        for pid in images.pstree().pids().collect::<Vec<_>>() {
            let mem = match images.task_memory(pid) {
                Ok(m) => m,
                // A zombie has no memory images.
                Err(e) if !dir.join(format!("mm-{pid}.img")).exists() => {
                    log::debug!("pid {pid}: no memory images ({e})");
                    continue;
                }
                Err(e) => return Err(format!("pid {pid}: {e}")),
            };
            let pages = mem.open_pages().map_err(|e| format!("pid {pid}: {e}"))?;
            tasks.insert(
                pid,
                TaskPages {
                    runs: mem.lazy_runs,
                    pages,
                },
            );
        }
        Ok(Served { tasks })
    }

    /// The reply to `req`: its header and the pages. Err: not a lazy page of the images.
    fn answer(&self, req: &Iov) -> Result<(Iov, &[u8]), String> {
        let pid = u32::try_from(req.dst_id)
            .ok()
            .filter(|p| self.tasks.contains_key(p))
            .ok_or_else(|| format!("no task with pid {} in the images", req.dst_id))?;
        let task = &self.tasks[&pid];
        if req.vaddr % PAGE_SIZE != 0 || req.nr_pages == 0 {
            return Err(format!(
                "pid {pid}: a request for {} pages at {:#x}",
                req.nr_pages, req.vaddr
            ));
        }
        let i = task.runs.partition_point(|r| r.end() <= req.vaddr);
        let run = task
            .runs
            .get(i)
            .filter(|r| r.start <= req.vaddr)
            .ok_or_else(|| format!("pid {pid}: no lazy page at {:#x}", req.vaddr))?;
        let pages = req.nr_pages.min((run.end() - req.vaddr) / PAGE_SIZE);
        let data = task
            .pages
            .data(
                run.pages_offset + (req.vaddr - run.start),
                pages * PAGE_SIZE,
            )
            .map_err(|e| format!("pid {pid}: {e}"))?;
        Ok((Iov::pages(pid, req.vaddr, pages), data))
    }
}

#[derive(Default)]
struct Counts {
    requests: u64,
    short_replies: u64,
    pages: u64,
}

/// How a connection ended.
enum End {
    /// PS_IOV_CLOSE: the client is done; so is the server.
    Closed,
    /// The client went away, or broke the protocol (logged): wait for the next one.
    Dropped,
}

fn serve(conn: &mut TcpStream, served: &Served, counts: &mut Counts) -> End {
    let peer = conn
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let mut hdr = [0u8; IOV_LEN];
    loop {
        if let Err(e) = conn.read_exact(&mut hdr) {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                log::warn!("{peer}: {e}");
            }
            return End::Dropped;
        }
        let req = Iov::decode(&hdr);
        match req.command() {
            PS_IOV_GET => {}
            PS_IOV_CLOSE => {
                // The status CRIU's client waits for, then its close.
                let _ = conn.write_all(&0i32.to_ne_bytes());
                let _ = conn.read(&mut hdr);
                return End::Closed;
            }
            other => {
                log::error!("{peer}: command {other:#x} is not served here; closing");
                return End::Dropped;
            }
        }
        counts.requests += 1;
        let (reply, data) = match served.answer(&req) {
            Ok(r) => r,
            Err(e) => {
                log::error!("{peer}: {e}; closing the connection");
                return End::Dropped;
            }
        };
        if reply.nr_pages < req.nr_pages {
            counts.short_replies += 1;
        }
        if let Err(e) = conn
            .write_all(&reply.encode())
            .and_then(|()| conn.write_all(data))
        {
            log::warn!("{peer}: {e}");
            return End::Dropped;
        }
        counts.pages += reply.nr_pages;
    }
}

pub fn main(args: CriuPageServerArgs) -> i32 {
    match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("umm: criu-page-server: {e}");
            1
        }
    }
}

fn run(args: &CriuPageServerArgs) -> Result<(), String> {
    let served = Served::open(&args.images_dir)
        .map_err(|e| format!("{}: {e}", args.images_dir.display()))?;
    let lazy: u64 = served
        .tasks
        .values()
        .flat_map(|t| t.runs.iter().map(|r| r.len))
        .sum();
    let addr = format!("{}:{}", args.address, args.port);
    let listener = TcpListener::bind(&addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    log::info!(
        "serving {} of lazy pages of {} task(s) from {} on {addr}",
        crate::stats::human_bytes(lazy),
        served.tasks.len(),
        args.images_dir.display()
    );
    let started = Instant::now();
    let mut counts = Counts::default();
    loop {
        let (mut conn, peer) = listener
            .accept()
            .map_err(|e| format!("accept on {addr}: {e}"))?;
        let _ = conn.set_nodelay(true);
        if let Err(e) = umm::sys::socket::detect_dead_tcp_peer(&conn) {
            log::warn!("{peer}: keep-alive: {e}");
        }
        log::info!("{peer} connected");
        if let End::Closed = serve(&mut conn, &served, &mut counts) {
            eprintln!(
                "umm: criu-page-server: {} requests ({} short), {} pages ({}) served in {:.3} \
                 s; the client closed",
                counts.requests,
                counts.short_replies,
                counts.pages,
                crate::stats::human_bytes(counts.pages * PAGE_SIZE),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        log::warn!("{peer}: connection ended without PS_IOV_CLOSE; waiting for another");
    }
}
