//! Raw userfaultfd ABI from `include/uapi/linux/userfaultfd.h`: numbers, flags and the
//! `#[repr(C)]` argument structs of every ioctl. Nothing here makes a system call.

/// `UFFD_API`: the only read(2) protocol version the kernel speaks.
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: a uffd that only handles user-mode faults. umm never uses it for
/// memory it serves (kernel-mode accesses such as `read(2)` into a missing page get EFAULT).
pub const UFFD_USER_MODE_ONLY: i32 = 1;

const UFFDIO: u64 = 0xAA;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

// ioctl "nr" values (`_UFFDIO_*`). Also the bit numbers of the `ioctls` masks.
pub const NR_REGISTER: u64 = 0x00;
pub const NR_UNREGISTER: u64 = 0x01;
pub const NR_WAKE: u64 = 0x02;
pub const NR_COPY: u64 = 0x03;
pub const NR_ZEROPAGE: u64 = 0x04;
pub const NR_MOVE: u64 = 0x05;
pub const NR_WRITEPROTECT: u64 = 0x06;
pub const NR_CONTINUE: u64 = 0x07;
pub const NR_POISON: u64 = 0x08;
pub const NR_API: u64 = 0x3F;

pub const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, NR_API, size_of::<UffdioApi>());
pub const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    NR_REGISTER,
    size_of::<UffdioRegister>(),
);
pub const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, NR_UNREGISTER, size_of::<UffdioRange>());
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, NR_WAKE, size_of::<UffdioRange>());
pub const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, NR_COPY, size_of::<UffdioCopy>());
pub const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    NR_ZEROPAGE,
    size_of::<UffdioZeropage>(),
);
pub const UFFDIO_MOVE: u64 = ioc(IOC_READ | IOC_WRITE, NR_MOVE, size_of::<UffdioMove>());
pub const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    NR_WRITEPROTECT,
    size_of::<UffdioWriteprotect>(),
);
pub const UFFDIO_CONTINUE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    NR_CONTINUE,
    size_of::<UffdioContinue>(),
);
pub const UFFDIO_POISON: u64 = ioc(IOC_READ | IOC_WRITE, NR_POISON, size_of::<UffdioPoison>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xAA, 0x00)`.
pub const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

// Event codes (`uffd_msg.event`).
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

// `uffd_msg.arg.pagefault.flags`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

// Register modes.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

// Per-ioctl modes.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// Size of one `struct uffd_msg` on the read(2) protocol.
pub const UFFD_MSG_SIZE: usize = 32;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Bytes copied, or a negative errno. Signed in the kernel, signed here.
    pub copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    pub mapped: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioPoison {
    pub range: UffdioRange,
    pub mode: u64,
    pub updated: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioMove {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub moved: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values printed by a C program against this machine's <linux/userfaultfd.h> (Debian 12's
    // 6.1 headers); MOVE and POISON, newer than those headers, follow the same _IOWR rule with
    // their 6.18 struct sizes. A typo in a struct or a number cannot slip through.
    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_MOVE, 0xc028_aa05);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }
}
