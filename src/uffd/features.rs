//! Feature bits of `UFFDIO_API` and the ioctl masks it and `UFFDIO_REGISTER` return.

use std::fmt;

/// A set of `UFFD_FEATURE_*` bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u64);

impl Features {
    pub const PAGEFAULT_FLAG_WP: Features = Features(1 << 0);
    pub const EVENT_FORK: Features = Features(1 << 1);
    pub const EVENT_REMAP: Features = Features(1 << 2);
    pub const EVENT_REMOVE: Features = Features(1 << 3);
    pub const MISSING_HUGETLBFS: Features = Features(1 << 4);
    pub const MISSING_SHMEM: Features = Features(1 << 5);
    pub const EVENT_UNMAP: Features = Features(1 << 6);
    pub const SIGBUS: Features = Features(1 << 7);
    pub const THREAD_ID: Features = Features(1 << 8);
    pub const MINOR_HUGETLBFS: Features = Features(1 << 9);
    pub const MINOR_SHMEM: Features = Features(1 << 10);
    pub const EXACT_ADDRESS: Features = Features(1 << 11);
    pub const WP_HUGETLBFS_SHMEM: Features = Features(1 << 12);
    pub const WP_UNPOPULATED: Features = Features(1 << 13);
    pub const POISON: Features = Features(1 << 14);
    pub const WP_ASYNC: Features = Features(1 << 15);
    pub const MOVE: Features = Features(1 << 16);

    /// What a non-cooperative manager needs: every layout event, and the faulting thread's id
    /// (how a FORK child's pid becomes known).
    pub const NON_COOPERATIVE: Features = Features(
        Self::EVENT_FORK.0
            | Self::EVENT_REMAP.0
            | Self::EVENT_REMOVE.0
            | Self::EVENT_UNMAP.0
            | Self::THREAD_ID.0,
    );

    const NAMES: [(Features, &'static str); 17] = [
        (Self::PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
        (Self::EVENT_FORK, "EVENT_FORK"),
        (Self::EVENT_REMAP, "EVENT_REMAP"),
        (Self::EVENT_REMOVE, "EVENT_REMOVE"),
        (Self::MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
        (Self::MISSING_SHMEM, "MISSING_SHMEM"),
        (Self::EVENT_UNMAP, "EVENT_UNMAP"),
        (Self::SIGBUS, "SIGBUS"),
        (Self::THREAD_ID, "THREAD_ID"),
        (Self::MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
        (Self::MINOR_SHMEM, "MINOR_SHMEM"),
        (Self::EXACT_ADDRESS, "EXACT_ADDRESS"),
        (Self::WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
        (Self::WP_UNPOPULATED, "WP_UNPOPULATED"),
        (Self::POISON, "POISON"),
        (Self::WP_ASYNC, "WP_ASYNC"),
        (Self::MOVE, "MOVE"),
    ];

    pub const fn empty() -> Features {
        Features(0)
    }
    pub const fn bits(self) -> u64 {
        self.0
    }
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }
    /// The bits of `self` that `other` lacks.
    pub const fn difference(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Names of the set bits, unknown bits as hex.
    pub fn names(self) -> Vec<String> {
        let mut rest = self.0;
        let mut out = Vec::new();
        for (f, name) in Self::NAMES {
            if self.contains(f) {
                out.push(name.to_string());
                rest &= !f.0;
            }
        }
        if rest != 0 {
            out.push(format!("{rest:#x}"));
        }
        out
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        self.union(rhs)
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({:#x}: {})", self.0, self.names().join("|"))
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("none")
        } else {
            f.write_str(&self.names().join("|"))
        }
    }
}

/// A mask of ioctls (bit N = `_UFFDIO_*` number N), as `UFFDIO_API` and `UFFDIO_REGISTER`
/// return it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Ioctls(pub u64);

impl Ioctls {
    pub fn has(self, nr: u64) -> bool {
        nr < 64 && self.0 & (1 << nr) != 0
    }
    pub fn copy(self) -> bool {
        self.has(super::abi::NR_COPY)
    }
    pub fn zeropage(self) -> bool {
        self.has(super::abi::NR_ZEROPAGE)
    }
    pub fn wake(self) -> bool {
        self.has(super::abi::NR_WAKE)
    }

    /// Names of the ioctls in the mask (`UFFDIO_` left off), unknown bits as `#N`.
    pub fn names(self) -> Vec<String> {
        use super::abi::*;
        const NAMES: [(u64, &str); 10] = [
            (NR_API, "API"),
            (NR_REGISTER, "REGISTER"),
            (NR_UNREGISTER, "UNREGISTER"),
            (NR_WAKE, "WAKE"),
            (NR_COPY, "COPY"),
            (NR_ZEROPAGE, "ZEROPAGE"),
            (NR_MOVE, "MOVE"),
            (NR_WRITEPROTECT, "WRITEPROTECT"),
            (NR_CONTINUE, "CONTINUE"),
            (NR_POISON, "POISON"),
        ];
        let mut out: Vec<String> = NAMES
            .iter()
            .filter(|(nr, _)| self.has(*nr))
            .map(|(_, name)| name.to_string())
            .collect();
        for nr in 0..64 {
            if self.has(nr) && !NAMES.iter().any(|(n, _)| *n == nr) {
                out.push(format!("#{nr}"));
            }
        }
        out
    }
}

/// Modes of `UFFDIO_REGISTER`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RegisterMode(pub u64);

impl RegisterMode {
    pub const MISSING: RegisterMode = RegisterMode(super::abi::UFFDIO_REGISTER_MODE_MISSING);
    pub const WP: RegisterMode = RegisterMode(super::abi::UFFDIO_REGISTER_MODE_WP);
    pub const MINOR: RegisterMode = RegisterMode(super::abi::UFFDIO_REGISTER_MODE_MINOR);
}

impl std::ops::BitOr for RegisterMode {
    type Output = RegisterMode;
    fn bitor(self, rhs: RegisterMode) -> RegisterMode {
        RegisterMode(self.0 | rhs.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_seventeen_features_are_named() {
        assert_eq!(Features(0x1ffff).names().len(), 17);
        assert_eq!(Features(1 << 20).names(), vec!["0x100000".to_string()]);
    }

    #[test]
    fn ioctl_names_follow_the_bit_numbers() {
        let mask = Ioctls((1 << 0x3f) | (1 << 0x03) | (1 << 40));
        assert_eq!(mask.names(), vec!["API", "COPY", "#40"]);
    }

    #[test]
    fn difference_names_what_is_missing() {
        let wanted = Features::NON_COOPERATIVE;
        let have = Features::EVENT_FORK | Features::THREAD_ID;
        assert_eq!(
            wanted.difference(have).to_string(),
            "EVENT_REMAP|EVENT_REMOVE|EVENT_UNMAP"
        );
    }
}
