//! The userfaultfd kernel ABI: opening, feature negotiation, every ioctl, and batched reads
//! decoded into [`Event`]s. Nothing else lives here.
//!
//! Range operations keep the kernel's signed result: "copied N bytes, then failed with errno
//! E" is one [`UffdError`] value with `done = N` and `errno = E`.

pub mod abi;
mod event;
mod features;
#[cfg(test)]
mod kernel_tests;

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

pub use event::{Event, UnknownEvent};
pub use features::{Features, Ioctls, RegisterMode};

use abi::*;

/// Which operation failed (the name a person searches the kernel docs for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Api,
    Register,
    Unregister,
    Wake,
    Copy,
    Zeropage,
    Move,
    Writeprotect,
    Continue,
    Poison,
    IocNew,
    Read,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Open => "userfaultfd(2)",
            Op::Api => "UFFDIO_API",
            Op::Register => "UFFDIO_REGISTER",
            Op::Unregister => "UFFDIO_UNREGISTER",
            Op::Wake => "UFFDIO_WAKE",
            Op::Copy => "UFFDIO_COPY",
            Op::Zeropage => "UFFDIO_ZEROPAGE",
            Op::Move => "UFFDIO_MOVE",
            Op::Writeprotect => "UFFDIO_WRITEPROTECT",
            Op::Continue => "UFFDIO_CONTINUE",
            Op::Poison => "UFFDIO_POISON",
            Op::IocNew => "USERFAULTFD_IOC_NEW",
            Op::Read => "read(userfaultfd)",
        }
    }
}

/// A failed userfaultfd operation: which one, on which range, how far it got, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdError {
    pub op: Op,
    pub errno: Errno,
    pub start: u64,
    pub len: u64,
    /// Bytes the operation completed before failing (COPY/ZEROPAGE/MOVE/CONTINUE/POISON).
    pub done: u64,
}

impl UffdError {
    fn new(op: Op, errno: Errno) -> UffdError {
        UffdError {
            op,
            errno,
            start: 0,
            len: 0,
            done: 0,
        }
    }

    fn range(op: Op, errno: Errno, start: u64, len: u64, done: u64) -> UffdError {
        UffdError {
            op,
            errno,
            start,
            len,
            done,
        }
    }

    /// The target's address space is gone (process exited or exec'd): ESRCH, or ENOSPC on
    /// older kernels.
    pub fn mm_gone(&self) -> bool {
        matches!(self.errno, Errno::ESRCH | Errno::ENOSPC)
    }
}

impl fmt::Display for UffdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op.name())?;
        if self.len != 0 {
            write!(f, " [{:#x}, {:#x})", self.start, self.start + self.len)?;
        }
        if self.done != 0 {
            write!(f, " stopped after {} bytes", self.done)?;
        }
        write!(f, ": {}", self.errno.desc())?;
        write!(f, " ({})", self.errno)
    }
}

impl std::error::Error for UffdError {}

/// `UFFDIO_API` could not enable what was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub errno: Errno,
    pub wanted: Features,
    /// What the kernel offers, when a throwaway probe could tell.
    pub available: Option<Features>,
}

impl ApiError {
    /// Features asked for that the kernel does not offer (empty when unknown).
    pub fn missing(&self) -> Features {
        self.available
            .map(|a| self.wanted.difference(a))
            .unwrap_or_default()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UFFDIO_API asking for {} failed: {}",
            self.wanted,
            self.errno.desc()
        )?;
        if self.errno == Errno::EPERM && self.wanted.contains(Features::EVENT_FORK) {
            write!(
                f,
                " (EVENT_FORK needs CAP_SYS_PTRACE in the caller of UFFDIO_API)"
            )?;
        }
        let missing = self.missing();
        if !missing.is_empty() {
            write!(f, "; this kernel lacks {missing}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

/// What `UFFDIO_API` enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiInfo {
    /// Every feature the kernel offers (the kernel reports availability, not what it enabled).
    pub available: Features,
    pub ioctls: Ioctls,
}

/// Size of the `read(2)` batch: many messages per system call.
pub const READ_BATCH: usize = 64;

/// A userfaultfd. Owns its fd; every operation borrows it.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(u: Uffd) -> OwnedFd {
        u.fd
    }
}

/// How a uffd was obtained (for logs and the agent's hello).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenedVia {
    Syscall,
    DevUserfaultfd,
}

const OPEN_FLAGS: i32 = libc::O_CLOEXEC | libc::O_NONBLOCK;

impl Uffd {
    /// Wrap an fd known to be a userfaultfd of another process's mm (from a FORK event, or
    /// from a peer after checking it with [`crate::sys::fd::is_userfaultfd`]).
    ///
    /// The fd is made non-blocking whatever its creator chose: a blocking uffd would freeze
    /// the reader's loop in `read(2)`, and its FORK children inherit the creation flags.
    pub fn from_owned(fd: OwnedFd) -> Uffd {
        let _ = set_nonblocking(fd.as_fd());
        Uffd { fd }
    }

    /// Open a uffd for the calling process: `userfaultfd(2)`, else `/dev/userfaultfd`.
    /// Always O_CLOEXEC|O_NONBLOCK (a FORK child's uffd inherits these flags), never
    /// `UFFD_USER_MODE_ONLY` (kernel-mode accesses to served memory would fail with EFAULT).
    pub fn open() -> Result<(OwnUffd, OpenedVia), UffdError> {
        match Self::open_syscall() {
            Ok(u) => Ok((u, OpenedVia::Syscall)),
            Err(first) => match Self::open_dev() {
                Ok(u) => Ok((u, OpenedVia::DevUserfaultfd)),
                // Report the syscall's reason: it is the one a person can act on
                // (vm.unprivileged_userfaultfd, CAP_SYS_PTRACE).
                Err(_) => Err(first),
            },
        }
    }

    /// `userfaultfd(O_CLOEXEC|O_NONBLOCK)`.
    pub fn open_syscall() -> Result<OwnUffd, UffdError> {
        // SAFETY: userfaultfd(2) takes a flags int and returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, OPEN_FLAGS) };
        if r < 0 {
            return Err(UffdError::new(Op::Open, Errno::last()));
        }
        // SAFETY: a fresh fd from the kernel, owned by nobody else.
        Ok(OwnUffd(Uffd {
            fd: unsafe { OwnedFd::from_raw_fd(r as RawFd) },
        }))
    }

    /// Open `/dev/userfaultfd` (a grant: whoever holds it can make full uffds).
    pub fn open_device() -> Result<OwnedFd, UffdError> {
        nix::fcntl::open(
            "/dev/userfaultfd",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| UffdError::new(Op::Open, e))
    }

    /// A uffd from `/dev/userfaultfd`, opened here.
    pub fn open_dev() -> Result<OwnUffd, UffdError> {
        let dev = Self::open_device()?;
        Self::from_device(dev.as_fd())
    }

    /// A uffd for the calling process's mm from a `/dev/userfaultfd` fd (possibly handed over
    /// by the manager): `ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC|O_NONBLOCK)`.
    pub fn from_device(dev: BorrowedFd<'_>) -> Result<OwnUffd, UffdError> {
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd or -1.
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                USERFAULTFD_IOC_NEW as libc::c_ulong,
                OPEN_FLAGS as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(UffdError::new(Op::IocNew, Errno::last()));
        }
        // SAFETY: a fresh fd from the kernel, owned by nobody else.
        Ok(OwnUffd(Uffd {
            fd: unsafe { OwnedFd::from_raw_fd(r) },
        }))
    }

    /// What the kernel offers, learned from a throwaway uffd (UFFDIO_API succeeds once per uffd
    /// and reports availability, so the real one cannot be asked twice).
    pub fn probe_features() -> Result<ApiInfo, UffdError> {
        let (probe, _) = Self::open()?;
        probe.0.api_raw(0).map_err(|e| UffdError::new(Op::Api, e))
    }

    /// What this kernel's userfaultfd offers, for `umm --version`, asked with a throwaway
    /// uffd that serves nothing. Works without privileges where the kernel allows any uffd:
    /// when neither `userfaultfd(2)` nor `/dev/userfaultfd` gives a full one, a
    /// `UFFD_USER_MODE_ONLY` uffd answers the same question (`UFFDIO_API` reports what the
    /// kernel has, whoever asks). The range ioctls come from registering one fresh,
    /// never-touched anonymous page of this process and unregistering it at once.
    pub fn probe_kernel() -> Result<KernelProbe, UffdError> {
        let (uffd, via) = match Self::open() {
            Ok((u, OpenedVia::Syscall)) => (u.0, ProbeVia::Syscall),
            Ok((u, OpenedVia::DevUserfaultfd)) => (u.0, ProbeVia::DevUserfaultfd),
            Err(first) => match Self::open_user_mode_only() {
                Ok(u) => (u, ProbeVia::UserModeOnly),
                Err(_) => return Err(first),
            },
        };
        let api = uffd.api_raw(0).map_err(|e| UffdError::new(Op::Api, e))?;
        let mut mode = RegisterMode::MISSING;
        if api.available.contains(Features::PAGEFAULT_FLAG_WP) {
            mode = mode | RegisterMode::WP;
        }
        let range_ioctls = probe_register(&uffd, mode)?;
        Ok(KernelProbe {
            via,
            api,
            range_ioctls,
        })
    }

    /// `userfaultfd(UFFD_USER_MODE_ONLY|O_CLOEXEC|O_NONBLOCK)`: only for [`Self::probe_kernel`]
    /// (such a uffd must never serve memory: kernel-mode accesses would get EFAULT).
    fn open_user_mode_only() -> Result<Uffd, UffdError> {
        // SAFETY: userfaultfd(2) takes a flags int and returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, OPEN_FLAGS | UFFD_USER_MODE_ONLY) };
        if r < 0 {
            return Err(UffdError::new(Op::Open, Errno::last()));
        }
        // SAFETY: a fresh fd from the kernel, owned by nobody else.
        Ok(Uffd {
            fd: unsafe { OwnedFd::from_raw_fd(r as RawFd) },
        })
    }

    fn api_raw(&self, features: u64) -> Result<ApiInfo, Errno> {
        let mut arg = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`.
        let r = unsafe { libc::ioctl(self.raw(), UFFDIO_API as libc::c_ulong, &mut arg) };
        if r < 0 {
            return Err(Errno::last());
        }
        Ok(ApiInfo {
            available: Features(arg.features),
            ioctls: Ioctls(arg.ioctls),
        })
    }

    /// `UFFDIO_API`: enable `wanted`. On failure the error names what this kernel lacks.
    pub fn api(&self, wanted: Features) -> Result<ApiInfo, ApiError> {
        self.api_raw(wanted.bits()).map_err(|errno| ApiError {
            errno,
            wanted,
            available: Self::probe_features().ok().map(|i| i.available),
        })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `UFFDIO_REGISTER`: returns the ioctls usable on the range.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<Ioctls, UffdError> {
        let mut arg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: mode.0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one `struct uffdio_register`.
        let r = unsafe { libc::ioctl(self.raw(), UFFDIO_REGISTER as libc::c_ulong, &mut arg) };
        if r < 0 {
            return Err(UffdError::range(Op::Register, Errno::last(), start, len, 0));
        }
        Ok(Ioctls(arg.ioctls))
    }

    /// `UFFDIO_UNREGISTER`.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.range_ioctl(Op::Unregister, UFFDIO_UNREGISTER, start, len)
    }

    /// `UFFDIO_WAKE`: wake threads blocked on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.range_ioctl(Op::Wake, UFFDIO_WAKE, start, len)
    }

    fn range_ioctl(&self, op: Op, req: u64, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = UffdioRange { start, len };
        // SAFETY: UNREGISTER and WAKE take exactly one `struct uffdio_range`.
        let r = unsafe { libc::ioctl(self.raw(), req as libc::c_ulong, &mut arg) };
        if r < 0 {
            return Err(UffdError::range(op, Errno::last(), start, len, 0));
        }
        Ok(())
    }

    /// `UFFDIO_COPY` of `src` to `dst` in the target. `Ok(len)` when all of it was copied; a
    /// partial copy is `Err` with `done` set (and `errno` EAGAIN, the kernel's report).
    pub fn copy(&self, dst: u64, src: &[u8], mode: CopyMode) -> Result<u64, UffdError> {
        let len = src.len() as u64;
        let mut arg = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len,
            mode: mode.0,
            copy: 0,
        };
        // SAFETY: the kernel reads `len` bytes from `src`, a live borrowed slice of exactly that
        // length, and writes the result into `arg`.
        let r = unsafe { libc::ioctl(self.raw(), UFFDIO_COPY as libc::c_ulong, &mut arg) };
        Self::counted(Op::Copy, r, arg.copy, dst, len)
    }

    /// `UFFDIO_ZEROPAGE`: map the zero page (a later write costs another fault).
    pub fn zeropage(&self, start: u64, len: u64, dontwake: bool) -> Result<u64, UffdError> {
        let mut arg = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: if dontwake {
                UFFDIO_ZEROPAGE_MODE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes exactly one `struct uffdio_zeropage`.
        let r = unsafe { libc::ioctl(self.raw(), UFFDIO_ZEROPAGE as libc::c_ulong, &mut arg) };
        Self::counted(Op::Zeropage, r, arg.zeropage, start, len)
    }

    /// `UFFDIO_MOVE`: move pages from `src` to `dst`, both in the target's address space.
    pub fn move_pages(&self, dst: u64, src: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut arg = UffdioMove {
            dst,
            src,
            len,
            mode,
            moved: 0,
        };
        // SAFETY: UFFDIO_MOVE reads and writes exactly one `struct uffdio_move`; both addresses
        // are in the target's mm, not ours.
        let r = unsafe { libc::ioctl(self.raw(), UFFDIO_MOVE as libc::c_ulong, &mut arg) };
        Self::counted(Op::Move, r, arg.moved, dst, len)
    }

    /// `UFFDIO_WRITEPROTECT`: set (`protect`) or clear write protection on the range.
    pub fn writeprotect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        dontwake: bool,
    ) -> Result<(), UffdError> {
        let mut mode = 0;
        if protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_WP;
        }
        if dontwake {
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut arg = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads exactly one `struct uffdio_writeprotect`.
        let r = unsafe { libc::ioctl(self.raw(), UFFDIO_WRITEPROTECT as libc::c_ulong, &mut arg) };
        if r < 0 {
            return Err(UffdError::range(
                Op::Writeprotect,
                Errno::last(),
                start,
                len,
                0,
            ));
        }
        Ok(())
    }

    /// Whether the address space's mappings are being changed by a munmap, mremap, madvise
    /// or fork whose event the manager has not read yet (the kernel's `mmap_changing`, set
    /// before the change and cleared once its event is read). Until then the process's maps
    /// already show the change but the model does not: an ENOENT, or a VMA missing from
    /// /proc, is no proof that memory is gone (a moved range is only elsewhere).
    ///
    /// The probe is a `UFFDIO_WRITEPROTECT` that clears protection on the page at `addr`
    /// without waking anyone: EAGAIN exactly when mappings are changing, else ENOENT (no
    /// write-protect registration) or success (nothing was protected): no side effect.
    pub fn mappings_changing(&self, addr: u64) -> bool {
        let page = crate::PAGE_SIZE;
        matches!(
            self.writeprotect(addr & !(page - 1), page, false, true),
            Err(e) if e.errno == Errno::EAGAIN
        )
    }

    /// `UFFDIO_CONTINUE`: map pages already in the page cache (MINOR mode).
    pub fn continue_(&self, start: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut arg = UffdioContinue {
            range: UffdioRange { start, len },
            mode,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads and writes exactly one `struct uffdio_continue`.
        let r = unsafe { libc::ioctl(self.raw(), UFFDIO_CONTINUE as libc::c_ulong, &mut arg) };
        Self::counted(Op::Continue, r, arg.mapped, start, len)
    }

    /// `UFFDIO_POISON`: later accesses to the range raise SIGBUS.
    pub fn poison(&self, start: u64, len: u64, dontwake: bool) -> Result<u64, UffdError> {
        let mut arg = UffdioPoison {
            range: UffdioRange { start, len },
            mode: if dontwake {
                UFFDIO_POISON_MODE_DONTWAKE
            } else {
                0
            },
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON reads and writes exactly one `struct uffdio_poison`.
        let r = unsafe { libc::ioctl(self.raw(), UFFDIO_POISON as libc::c_ulong, &mut arg) };
        Self::counted(Op::Poison, r, arg.updated, start, len)
    }

    /// The result of an ioctl that reports a signed byte count beside its return value.
    fn counted(op: Op, ret: i32, count: i64, start: u64, len: u64) -> Result<u64, UffdError> {
        if ret >= 0 {
            return Ok(len);
        }
        let errno = Errno::last();
        let done = if count > 0 { count as u64 } else { 0 };
        Err(UffdError::range(op, errno, start, len, done))
    }

    /// Read every message the kernel has ready, in batches of [`READ_BATCH`], appending the
    /// decoded events to `out` in order. Returns `Ok` when the uffd would block.
    ///
    /// A read that fails after some messages were appended (EMFILE when a FORK fd cannot be
    /// installed) returns the error; the messages already in `out` stay valid.
    pub fn read_events(&self, out: &mut Vec<Result<Event, UnknownEvent>>) -> Result<(), UffdError> {
        let mut buf = [0u8; UFFD_MSG_SIZE * READ_BATCH];
        loop {
            match nix::unistd::read(self.fd.as_fd(), &mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    for chunk in buf[..n - n % UFFD_MSG_SIZE].chunks_exact(UFFD_MSG_SIZE) {
                        let msg: &[u8; UFFD_MSG_SIZE] = chunk.try_into().expect("exact chunk");
                        // SAFETY: the kernel just returned these bytes from read(2) on this
                        // uffd; a FORK message's fd was installed for us alone.
                        out.push(unsafe { event::decode(msg) });
                    }
                    if n < buf.len() {
                        // A short read means the queue was drained when we looked; the next
                        // read would most likely say EAGAIN, so spare the system call.
                        return Ok(());
                    }
                }
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(UffdError::new(Op::Read, e)),
            }
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    if !flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

/// How [`Uffd::probe_kernel`] got its throwaway uffd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVia {
    Syscall,
    DevUserfaultfd,
    /// Only a `UFFD_USER_MODE_ONLY` uffd was allowed (an unprivileged caller).
    UserModeOnly,
}

/// What the kernel's userfaultfd offers (see [`Uffd::probe_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelProbe {
    pub via: ProbeVia,
    /// Features and the `UFFDIO_API` ioctl mask.
    pub api: ApiInfo,
    /// The ioctls `UFFDIO_REGISTER` grants on a private anonymous range (MISSING mode, plus
    /// WP when the kernel has it).
    pub range_ioctls: Ioctls,
}

/// Register one fresh anonymous page of this process with `uffd` (no events enabled, so
/// nothing is ever read), note the ioctls granted, unregister it. The page is never touched,
/// so no fault can reach a uffd that nobody reads.
fn probe_register(uffd: &Uffd, mode: RegisterMode) -> Result<Ioctls, UffdError> {
    let len = crate::PAGE_SIZE as usize;
    // SAFETY: a new private anonymous mapping that nothing else refers to; it is only
    // registered, unregistered and unmapped, never read or written.
    let page = unsafe {
        nix::sys::mman::mmap_anonymous(
            None,
            std::num::NonZeroUsize::new(len).expect("page size"),
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_PRIVATE,
        )
    }
    .map_err(|e| UffdError::new(Op::Register, e))?;
    let addr = page.as_ptr() as u64;
    let granted = uffd.register(addr, len as u64, mode);
    if granted.is_ok() {
        let _ = uffd.unregister(addr, len as u64);
    }
    // SAFETY: unmapping the page mapped above, once; no reference to it exists.
    let _ = unsafe { nix::sys::mman::munmap(page, len) };
    granted
}

/// A userfaultfd for the calling process's own memory, as opened here. It is meant to be
/// handed to a manager (sent, or converted to an fd): the range operations of [`Uffd`] on
/// one's own memory could fill or move pages that safe code believes untouched or in place,
/// so they are only reachable through the `unsafe` [`OwnUffd::into_uffd`].
#[derive(Debug)]
pub struct OwnUffd(Uffd);

impl OwnUffd {
    /// `UFFDIO_API` (changes no memory).
    pub fn api(&self, wanted: Features) -> Result<ApiInfo, ApiError> {
        self.0.api(wanted)
    }

    /// The fd, to send to a manager.
    pub fn into_fd(self) -> OwnedFd {
        self.0.fd
    }

    /// The full API on this process's own memory.
    ///
    /// # Safety
    /// The caller must not use the range operations on memory that live Rust references or
    /// allocator invariants cover in a way that changes what they see (filling a page of a
    /// zeroed allocation, moving pages out from under a reference, ...): only on mappings it
    /// made for the purpose.
    pub unsafe fn into_uffd(self) -> Uffd {
        self.0
    }
}

impl AsFd for OwnUffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for OwnUffd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Modes of `UFFDIO_COPY`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CopyMode(pub u64);

impl CopyMode {
    /// Do not wake the faulting threads (a later `UFFDIO_WAKE` will).
    pub const DONTWAKE: CopyMode = CopyMode(UFFDIO_COPY_MODE_DONTWAKE);
    /// Install the pages write-protected.
    pub const WP: CopyMode = CopyMode(UFFDIO_COPY_MODE_WP);
}

impl std::ops::BitOr for CopyMode {
    type Output = CopyMode;
    fn bitor(self, rhs: CopyMode) -> CopyMode {
        CopyMode(self.0 | rhs.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_ioctl_range_and_progress() {
        let e = UffdError::range(Op::Copy, Errno::EAGAIN, 0x1000, 0x4000, 0x2000);
        let s = e.to_string();
        assert!(
            s.starts_with("UFFDIO_COPY [0x1000, 0x5000) stopped after 8192 bytes"),
            "{s}"
        );
        assert!(s.contains("EAGAIN"), "{s}");
        assert!(!e.mm_gone());
        assert!(UffdError::new(Op::Copy, Errno::ESRCH).mm_gone());
        assert!(UffdError::new(Op::Copy, Errno::ENOSPC).mm_gone());
    }

    #[test]
    fn api_error_names_missing_features_and_the_fork_privilege() {
        let e = ApiError {
            errno: Errno::EPERM,
            wanted: Features::NON_COOPERATIVE,
            available: Some(Features::NON_COOPERATIVE.difference(Features::EVENT_REMAP)),
        };
        let s = e.to_string();
        assert!(s.contains("CAP_SYS_PTRACE"), "{s}");
        assert!(s.contains("lacks EVENT_REMAP"), "{s}");
    }
}
