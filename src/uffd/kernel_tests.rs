//! The uffd wrappers against the kernel: every ioctl does what its name says, on memory of
//! this very process (never touching a registered page that is missing: no handler runs here,
//! so such a touch would hang). These need root and /dev/userfaultfd, and say so otherwise.

use std::os::fd::AsRawFd;

use super::{CopyMode, Event, Features, RegisterMode, Uffd};

fn require_root_and_uffd() {
    assert!(
        nix::unistd::geteuid().is_root() && std::path::Path::new("/dev/userfaultfd").exists(),
        "these tests need root and /dev/userfaultfd (run `make test` as root)"
    );
}

const PAGE: usize = 4096;

/// A private anonymous mapping of `pages` pages, unmapped on drop.
struct Region {
    addr: u64,
    len: usize,
}

impl Region {
    fn new(pages: usize) -> Region {
        let len = pages * PAGE;
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                std::num::NonZeroUsize::new(len).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
            )
        }
        .expect("mmap");
        Region {
            addr: p.as_ptr() as u64,
            len,
        }
    }

    fn page(&self, i: usize) -> u64 {
        self.addr + (i * PAGE) as u64
    }

    /// Read a byte of a page known to be present.
    fn read(&self, i: usize, off: usize) -> u8 {
        let p = (self.page(i) as usize + off) as *const u8;
        // SAFETY: the page is inside this live mapping and present (the test copied it).
        unsafe { std::ptr::read_volatile(p) }
    }

    fn write(&self, i: usize, v: u8) {
        let p = self.page(i) as usize as *mut u8;
        // SAFETY: the page is inside this live mapping and not registered as missing.
        unsafe { std::ptr::write_volatile(p, v) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let p = std::ptr::NonNull::new(self.addr as usize as *mut std::ffi::c_void).unwrap();
        // SAFETY: unmapping the mapping this struct made, once.
        let _ = unsafe { nix::sys::mman::munmap(p, self.len) };
    }
}

/// Present pages of `r` per /proc/self/pagemap.
fn present(r: &Region, i: usize) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
    f.seek(SeekFrom::Start(r.page(i) / PAGE as u64 * 8))
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact(&mut b).unwrap();
    u64::from_le_bytes(b) & (1 << 63) != 0
}

fn uffd(features: Features) -> Uffd {
    require_root_and_uffd();
    let (u, _) = Uffd::open().expect("open a userfaultfd (root)");
    // SAFETY: the tests use the range operations only on mappings they made for them.
    let u = unsafe { u.into_uffd() };
    u.api(features).expect("UFFDIO_API");
    u
}

#[test]
fn copy_fills_missing_pages_and_reports_eexist_and_partial_copies() {
    let u = uffd(Features::NON_COOPERATIVE);
    let r = Region::new(6);
    r.write(2, 9); // present before registration
    r.write(4, 8);
    let io = u
        .register(r.addr, r.len as u64, RegisterMode::MISSING)
        .unwrap();
    assert!(io.copy() && io.zeropage() && io.wake());
    let src = vec![0x5au8; 2 * PAGE];
    assert_eq!(
        u.copy(r.page(0), &src, CopyMode::default()),
        Ok(2 * PAGE as u64)
    );
    assert_eq!((r.read(0, 0), r.read(1, PAGE - 1)), (0x5a, 0x5a));
    // The first page present: EEXIST, nothing copied, nothing overwritten.
    let e = u
        .copy(r.page(2), &src[..PAGE], CopyMode::default())
        .unwrap_err();
    assert_eq!((e.errno, e.done), (nix::errno::Errno::EEXIST, 0));
    assert_eq!(r.read(2, 0), 9);
    // A later page present: a partial copy, "copied N bytes, then failed" as one value.
    let e = u.copy(r.page(3), &src, CopyMode::DONTWAKE).unwrap_err();
    assert_eq!(
        (e.errno, e.done),
        (nix::errno::Errno::EAGAIN, PAGE as u64),
        "{e}"
    );
    assert_eq!((r.read(3, 0), r.read(4, 0)), (0x5a, 8));
    // ZEROPAGE on the last missing page; WAKE on a range with no waiter is fine.
    assert_eq!(u.zeropage(r.page(5), PAGE as u64, false), Ok(PAGE as u64));
    assert_eq!(r.read(5, 7), 0);
    u.wake(r.addr, r.len as u64).unwrap();
    u.unregister(r.addr, r.len as u64).unwrap();
}

#[test]
fn writeprotect_sets_and_clears_protection_on_registered_pages() {
    let u = uffd(Features::PAGEFAULT_FLAG_WP);
    let r = Region::new(2);
    r.write(0, 1);
    r.write(1, 2);
    u.register(
        r.addr,
        r.len as u64,
        RegisterMode::MISSING | RegisterMode::WP,
    )
    .unwrap();
    u.writeprotect(r.addr, r.len as u64, true, false).unwrap();
    // Reads work while protected (a write would fault to us; not done here).
    assert_eq!(r.read(0, 0), 1);
    u.writeprotect(r.addr, r.len as u64, false, false).unwrap();
    r.write(1, 3);
    assert_eq!(r.read(1, 0), 3);
    u.unregister(r.addr, r.len as u64).unwrap();
}

#[test]
fn poison_marks_a_missing_page_without_populating_it() {
    let u = uffd(Features::POISON);
    let r = Region::new(2);
    u.register(r.addr, r.len as u64, RegisterMode::MISSING)
        .unwrap();
    assert_eq!(u.poison(r.page(1), PAGE as u64, false), Ok(PAGE as u64));
    // The marker is in place (a second POISON finds the entry taken) but no page is.
    let e = u.poison(r.page(1), PAGE as u64, false).unwrap_err();
    assert_eq!(e.errno, nix::errno::Errno::EEXIST);
    assert!(!present(&r, 1));
    // (On 6.18 a COPY replaces a poison marker, as it does a guard marker: not asserted.)
    u.unregister(r.addr, r.len as u64).unwrap();
}

#[test]
fn move_takes_a_page_from_one_place_to_another() {
    let u = uffd(Features::MOVE);
    let src = Region::new(1);
    src.write(0, 0x77);
    let dst = Region::new(1);
    u.register(dst.addr, dst.len as u64, RegisterMode::MISSING)
        .unwrap();
    assert_eq!(
        u.move_pages(dst.page(0), src.page(0), PAGE as u64, 0),
        Ok(PAGE as u64)
    );
    assert_eq!(dst.read(0, 0), 0x77);
    assert!(!present(&src, 0), "the page left its source");
    u.unregister(dst.addr, dst.len as u64).unwrap();
}

#[test]
fn continue_maps_a_page_already_in_the_page_cache() {
    let u = uffd(Features::MINOR_SHMEM);
    let fd = nix::sys::memfd::memfd_create(c"umm-continue", nix::sys::memfd::MFdFlags::empty())
        .expect("memfd");
    nix::unistd::ftruncate(&fd, PAGE as i64).unwrap();
    nix::sys::uio::pwrite(&fd, &[0x42u8; PAGE], 0).unwrap();
    // SAFETY: a new shared mapping of our own memfd; unmapped below.
    let p = unsafe {
        nix::sys::mman::mmap(
            None,
            std::num::NonZeroUsize::new(PAGE).unwrap(),
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &fd,
            0,
        )
    }
    .expect("mmap memfd");
    let addr = p.as_ptr() as u64;
    u.register(addr, PAGE as u64, RegisterMode::MINOR).unwrap();
    assert_eq!(u.continue_(addr, PAGE as u64, 0), Ok(PAGE as u64));
    // SAFETY: the page is mapped now (CONTINUE installed it).
    assert_eq!(
        unsafe { std::ptr::read_volatile(addr as usize as *const u8) },
        0x42
    );
    u.unregister(addr, PAGE as u64).unwrap();
    // SAFETY: unmapping the mapping made above, once.
    unsafe { nix::sys::mman::munmap(p, PAGE) }.unwrap();
}

#[test]
fn events_are_read_in_batches_and_decoded() {
    let u = uffd(Features::NON_COOPERATIVE);
    let r = Region::new(8);
    for i in 0..8 {
        r.write(i, 1);
    }
    u.register(r.addr, r.len as u64, RegisterMode::MISSING)
        .unwrap();
    // Three MADV_DONTNEEDs raise three REMOVE events; each blocks this thread until read, so
    // they are raised from helper threads and read here in one go.
    let addrs: Vec<u64> = (0..3).map(|i| r.page(2 * i)).collect();
    let threads: Vec<_> = addrs
        .iter()
        .map(|&a| {
            std::thread::spawn(move || {
                let p = std::ptr::NonNull::new(a as usize as *mut std::ffi::c_void).unwrap();
                // SAFETY: dropping one page of the test's own mapping.
                unsafe {
                    nix::sys::mman::madvise(p, PAGE, nix::sys::mman::MmapAdvise::MADV_DONTNEED)
                }
                .unwrap();
            })
        })
        .collect();
    let mut got = Vec::new();
    let mut polls = 0;
    while got.len() < 3 && polls < 2000 {
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&u),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u16));
        u.read_events(&mut got).unwrap();
        polls += 1;
    }
    for t in threads {
        t.join().unwrap();
    }
    let mut removed: Vec<u64> = got
        .into_iter()
        .map(|e| match e {
            Ok(Event::Remove { start, end }) => {
                assert_eq!(end - start, PAGE as u64);
                start
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    removed.sort();
    assert_eq!(removed, addrs);
    assert!(u.as_raw_fd() >= 0);
    u.unregister(r.addr, r.len as u64).unwrap();
}

/// `mappings_changing`: true from the moment a non-cooperative change begins until its event
/// is read (the MADV_DONTNEED here waits in the kernel for that), false before and after.
#[test]
fn mappings_changing_is_true_exactly_while_an_event_waits_to_be_read() {
    let u = uffd(Features::NON_COOPERATIVE);
    let r = Region::new(4);
    u.register(r.addr, r.len as u64, RegisterMode::MISSING)
        .unwrap();
    assert!(!u.mappings_changing(r.page(1)), "nothing is changing yet");
    let a = r.page(2);
    let t = std::thread::spawn(move || {
        let p = std::ptr::NonNull::new(a as usize as *mut std::ffi::c_void).unwrap();
        // SAFETY: dropping one page of the test's own mapping.
        unsafe { nix::sys::mman::madvise(p, PAGE, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }
            .unwrap();
    });
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&u),
        nix::poll::PollFlags::POLLIN,
    )];
    let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap();
    assert_eq!(ready, 1, "no REMOVE event within 10 s");
    // Queued, not read: the madvise is still waiting, mappings are changing (also at
    // another page of the process).
    assert!(u.mappings_changing(r.page(0)));
    let mut got = Vec::new();
    u.read_events(&mut got).unwrap();
    assert!(
        matches!(got.as_slice(), [Ok(Event::Remove { .. })]),
        "{got:?}"
    );
    t.join().unwrap();
    assert!(!u.mappings_changing(r.page(0)), "the event was read");
    u.unregister(r.addr, r.len as u64).unwrap();
}

/// A userfaultfd made in another process (a fresh python, its own ASLR layout), received
/// here over a socketpair; the process waits until `keep` (its stdin) closes.
fn foreign_uffd() -> (
    std::os::fd::OwnedFd,
    std::process::Child,
    std::os::unix::net::UnixStream,
) {
    use std::os::unix::net::UnixStream;
    let (ours, theirs) = UnixStream::pair().unwrap();
    let child = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import ctypes, os, socket\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)\n\
             assert fd >= 0, ctypes.get_errno()\n\
             s = socket.socket(fileno=0)\n\
             socket.send_fds(s, [b'u'], [fd])\n\
             s.recv(1)\n",
        )
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            theirs,
        )))
        .spawn()
        .expect("spawn /usr/bin/python3");
    let mut buf = [0u8; 4];
    let got = crate::sys::socket::recv_with_fds_blocking(std::os::fd::AsFd::as_fd(&ours), &mut buf)
        .expect("receive the foreign uffd");
    assert_eq!(got.fds.len(), 1, "python sent no fd");
    (got.fds.into_iter().next().unwrap(), child, ours)
}

/// The check that a handed-over uffd belongs to the peer's mm: UFFDIO_UNREGISTER over a
/// range succeeds when the uffd's mm has a (userfault-capable) VMA there, registered or not,
/// and changes nothing when it was not registered; it fails with EINVAL over a hole. A uffd
/// of another mm therefore fails over our private mappings and succeeds over its own.
#[test]
fn unregister_probe_tells_whose_mm_a_uffd_belongs_to() {
    use nix::errno::Errno;
    let own = uffd(Features::empty());
    let r = Region::new(4);
    r.write(1, 7);
    // Our mapping, not registered: Ok, and still not registered afterwards (REGISTER works,
    // the page written before is intact).
    own.unregister(r.addr, PAGE as u64).unwrap();
    own.unregister(r.page(1), PAGE as u64).unwrap();
    assert_eq!(r.read(1, 0), 7);
    // A hole: EINVAL.
    let hole = Region::new(1);
    let hole_addr = hole.addr;
    drop(hole);
    let e = own.unregister(hole_addr, PAGE as u64).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL, "{e}");

    // Before UFFDIO_API every range ioctl is EINVAL: the probe needs the API done first.
    let (fd, mut child, keep) = foreign_uffd();
    let foreign = Uffd::from_owned(fd);
    let e = foreign.unregister(r.addr, PAGE as u64).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL, "{e}");
    foreign.api(Features::NON_COOPERATIVE).expect("UFFDIO_API");
    // Our mapping is not in python's mm: EINVAL.
    let e = foreign.unregister(r.addr, PAGE as u64).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL, "{e}");
    // Python's own stack is.
    let maps = crate::sys::proc::read_maps(child.id()).unwrap();
    let stack = maps.iter().find(|m| m.path == "[stack]").expect("[stack]");
    foreign.unregister(stack.start, PAGE as u64).unwrap();
    // Our uffd over python's stack address: EINVAL unless our own layout has a VMA there.
    let ours_there = crate::sys::proc::read_maps(std::process::id())
        .unwrap()
        .iter()
        .any(|m| m.start < stack.start + PAGE as u64 && stack.start < m.end);
    if !ours_there {
        let e = own.unregister(stack.start, PAGE as u64).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL, "{e}");
    }
    // Once the other process is gone: ENOMEM (its mm cannot be pinned), not ESRCH.
    drop(keep);
    assert!(child.wait().unwrap().success());
    let e = foreign.unregister(stack.start, PAGE as u64).unwrap_err();
    assert_eq!(e.errno, Errno::ENOMEM, "{e}");
}

#[test]
fn kernel_probe_reports_the_features_and_the_range_ioctls_registration_grants() {
    require_root_and_uffd();
    let probe = Uffd::probe_kernel().expect("probe");
    assert_eq!(
        probe.via,
        super::ProbeVia::Syscall,
        "root opens uffds directly"
    );
    // The same answer as the throwaway probe the manager uses to explain API errors.
    assert_eq!(probe.api, Uffd::probe_features().unwrap());
    assert!(probe.api.available.contains(Features::NON_COOPERATIVE));
    // What a registered anonymous range grants: the manager's copy path needs these.
    let ioctls = probe.range_ioctls;
    assert!(
        ioctls.copy() && ioctls.zeropage() && ioctls.wake(),
        "{ioctls:?}"
    );
    // WP was asked for only because the kernel offers it, so it must be granted.
    if probe.api.available.contains(Features::PAGEFAULT_FLAG_WP) {
        assert!(
            ioctls.names().iter().any(|n| n == "WRITEPROTECT"),
            "{ioctls:?}"
        );
    }
}
