//! Where page contents come from. Track mode serves zeros; images and remote sources arrive
//! with the lazy-restore work and plug in beside [`Zeros`].

/// Largest single copy any source hands out (the fault-around window's ceiling).
pub const MAX_CHUNK: usize = 2 << 20;

/// A read-only buffer of zeros to copy from (`UFFDIO_COPY` needs a source; zero pages via
/// `UFFDIO_ZEROPAGE` would cost a second fault on the first write).
///
/// The buffer is never written, so its pages stay the kernel's shared zero page: it costs no
/// resident memory.
pub struct Zeros {
    buf: Vec<u8>,
}

impl Zeros {
    pub fn new() -> Zeros {
        Zeros {
            buf: vec![0u8; MAX_CHUNK],
        }
    }

    /// `len` bytes of zeros (`len` ≤ [`MAX_CHUNK`]).
    pub fn slice(&self, len: usize) -> &[u8] {
        &self.buf[..len.min(MAX_CHUNK)]
    }
}

impl Default for Zeros {
    fn default() -> Self {
        Self::new()
    }
}
