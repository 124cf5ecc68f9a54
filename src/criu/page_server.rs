//! CRIU's page-server protocol, the part a remote lazy-pages daemon speaks (issue 7).
//!
//! Facts (CRIU 4.2 source; checked against a real `criu dump --lazy-pages --port P`, see
//! tests/criu_e2e.rs):
//! - Every message is a `struct page_server_iov { u32 cmd; u64 nr_pages; u64 vaddr; u64
//!   dst_id; }` (criu/page-xfer.c), sent raw over TCP in native byte order and native C
//!   layout: on x86_64 that is **32 bytes**, `cmd` at 0, four bytes of padding, `nr_pages` at
//!   8, `vaddr` at 16, `dst_id` at 24. The server reads exactly that (`recv(MSG_WAITALL)` of
//!   `sizeof(pi)`), so a 24-byte header gets no answer at all, and a misread one can crash it.
//! - `cmd`: the low 16 bits are the command, the high 16 bits flags (`encode_ps_cmd`).
//!   Commands: PS_IOV_ADD 1, PS_IOV_HOLE 2, PS_IOV_OPEN 3, PS_IOV_OPEN2 4, PS_IOV_PARENT 5,
//!   PS_IOV_ADD_F 6, PS_IOV_GET 7, PS_IOV_CLOSE 0x1023, PS_IOV_FORCE_CLOSE 0x1024.
//! - No handshake: the client speaks first and the first message may be a PS_IOV_GET (CRIU's
//!   daemon, `connect_to_page_server_to_recv` in criu/page-xfer.c, sends nothing before its
//!   first `request_remote_pages`). Without TLS nothing else is on the wire.
//! - The lazy-pages daemon (`request_remote_pages`, criu/pagemap.c `maybe_read_page_remote`)
//!   sends PS_IOV_GET with `nr_pages`, `vaddr` (the address in the dumped task) and `dst_id` =
//!   the page read's `img_id`, which is the task's pid in the images (not `encode_pm`'s
//!   `id << 8 | type`: the dump side looks it up with `pstree_item_by_virt(dst_id)`, and an
//!   unknown pid there is a NULL dereference).
//! - The dump side (`page_server_get_pages`, `page_pipe_read` in criu/page-pipe.c) answers
//!   requests one at a time, in order, reusing the request: cmd = PS_IOV_ADD_F |
//!   PE_PRESENT << 16, the same vaddr and dst_id, and `nr_pages` clamped to the end of the
//!   page-pipe iovec holding `vaddr` (so the reply may carry fewer pages than asked:
//!   `page_server_read` in CRIU's daemon expects that), then the `nr_pages * PAGE_SIZE` bytes
//!   of data. Its pages stay in its page pipes (`tee`), so a page may be asked again. If no
//!   iovec holds `vaddr` it sends nothing and closes the connection: only lazy pages may be
//!   asked for. Several requests may be in flight (TCP buffers them; it reads the next one
//!   after answering).
//! - The dump side tees each reply through a pipe it sizes with `F_SETPIPE_SZ` to
//!   `PIPE_MAX_SIZE` pages (about 3.3 MB on x86_64). Without CAP_SYS_RESOURCE that fails when
//!   `fs.pipe-max-size` is smaller (1 MiB by default); CRIU ignores the failure and then every
//!   GET fails with `page-pipe: splice: -1: Bad file descriptor` and the connection is
//!   closed, for CRIU's own lazy-pages daemon too.
//! - To end (`disconnect_from_page_server`): PS_IOV_CLOSE with the other fields zero; the
//!   server answers with an `int32` status (0), waits for the client to close, and the dump
//!   finishes (the dumped tasks are killed then).
//! - CRIU's lazy-pages daemon connects to `--address`:`--port` (`setup_tcp_client`) after the
//!   restore side handed over the uffds. Its images directory holds what `criu dump
//!   --lazy-pages` wrote: the pagemaps mark the lazy runs PE_LAZY without PE_PRESENT (their
//!   data stays with the dump side; `ppb_xfer_flags`).

use crate::PAGE_SIZE;

pub const PS_IOV_ADD_F: u32 = 6;
pub const PS_IOV_GET: u32 = 7;
pub const PS_IOV_CLOSE: u32 = 0x1023;
/// Low bits of `cmd`: the command; high bits: flags.
const PS_CMD_BITS: u32 = 16;
/// `PE_PRESENT`, the flag a page reply carries.
const PE_PRESENT: u32 = super::PE_PRESENT;
/// The bytes of one `page_server_iov` (C layout: u32, 4 bytes of padding, three u64).
pub const IOV_LEN: usize = 32;

/// One `page_server_iov`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iov {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl Iov {
    /// A request for `nr_pages` lazy pages of task `pid` from `vaddr`.
    pub fn get(pid: u32, vaddr: u64, nr_pages: u64) -> Iov {
        Iov {
            cmd: PS_IOV_GET,
            nr_pages,
            vaddr,
            dst_id: u64::from(pid),
        }
    }

    /// The end of the conversation.
    pub fn close() -> Iov {
        Iov {
            cmd: PS_IOV_CLOSE,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        }
    }

    /// The header of a reply carrying `nr_pages` pages of `pid` from `vaddr`.
    pub fn pages(pid: u32, vaddr: u64, nr_pages: u64) -> Iov {
        Iov {
            cmd: PE_PRESENT << PS_CMD_BITS | PS_IOV_ADD_F,
            nr_pages,
            vaddr,
            dst_id: u64::from(pid),
        }
    }

    pub fn command(&self) -> u32 {
        self.cmd & ((1 << PS_CMD_BITS) - 1)
    }

    pub fn flags(&self) -> u32 {
        self.cmd >> PS_CMD_BITS
    }

    pub fn encode(&self) -> [u8; IOV_LEN] {
        let mut b = [0u8; IOV_LEN];
        b[0..4].copy_from_slice(&self.cmd.to_ne_bytes());
        // b[4..8]: the C struct's padding, sent as zeros.
        b[8..16].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }

    pub fn decode(b: &[u8; IOV_LEN]) -> Iov {
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from_ne_bytes(std::array::from_fn(|k| b[i + k]));
        Iov {
            cmd: u32_at(0),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    /// Check `self` as the reply to `req`: pages of the same task from the same address, at
    /// least one and no more than asked. Ok: the number of pages that follow.
    pub fn check_reply_to(&self, req: &Iov) -> Result<u64, String> {
        if self.command() != PS_IOV_ADD_F || self.flags() & PE_PRESENT == 0 {
            return Err(format!(
                "reply to GET {:#x}+{} pages (pid {}) has cmd {:#x}, not PS_IOV_ADD_F with \
                 PE_PRESENT",
                req.vaddr, req.nr_pages, req.dst_id, self.cmd
            ));
        }
        if self.vaddr != req.vaddr || self.dst_id != req.dst_id {
            return Err(format!(
                "reply for {:#x} (pid {}) to a request for {:#x} (pid {})",
                self.vaddr, self.dst_id, req.vaddr, req.dst_id
            ));
        }
        if self.nr_pages == 0 || self.nr_pages > req.nr_pages {
            return Err(format!(
                "reply with {} pages to a request for {} at {:#x} (pid {})",
                self.nr_pages, req.nr_pages, req.vaddr, req.dst_id
            ));
        }
        Ok(self.nr_pages)
    }

    /// Bytes of page data following this header.
    pub fn data_len(&self) -> usize {
        self.nr_pages as usize * PAGE_SIZE as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iov_round_trips_and_reply_checks() {
        let req = Iov::get(26975, 0x7f00_0000_1000, 64);
        assert_eq!(Iov::decode(&req.encode()), req);
        assert_eq!(req.encode()[0..4], 7u32.to_ne_bytes());
        let short = Iov::pages(26975, 0x7f00_0000_1000, 3);
        assert_eq!(short.command(), PS_IOV_ADD_F);
        assert_eq!(short.check_reply_to(&req), Ok(3));
        assert!(Iov::pages(26976, req.vaddr, 3)
            .check_reply_to(&req)
            .is_err());
        assert!(Iov::pages(26975, req.vaddr, 65)
            .check_reply_to(&req)
            .is_err());
        assert!(Iov::pages(26975, req.vaddr, 0)
            .check_reply_to(&req)
            .is_err());
        assert!(Iov::close().check_reply_to(&req).is_err());
    }

    /// The bytes CRIU 4.2's `request_remote_pages` puts on the wire for a GET of 64 pages at
    /// 0x7f4d00e00000 of pid 1 (x86_64 `struct page_server_iov`, built field by field here,
    /// not with `encode`): a 24-byte header without the padding got no answer from a real
    /// `criu dump --lazy-pages`.
    #[test]
    fn iov_has_the_c_layout_of_criu() {
        let mut wire = Vec::new();
        wire.extend(7u32.to_ne_bytes()); // cmd
        wire.extend([0u8; 4]); // padding before the first u64
        wire.extend(64u64.to_ne_bytes()); // nr_pages
        wire.extend(0x7f4d_00e0_0000u64.to_ne_bytes()); // vaddr
        wire.extend(1u64.to_ne_bytes()); // dst_id
        assert_eq!(wire.len(), IOV_LEN);
        let get = Iov::get(1, 0x7f4d_00e0_0000, 64);
        assert_eq!(get.encode().as_slice(), wire.as_slice());
        let wire: [u8; IOV_LEN] = wire.try_into().unwrap();
        assert_eq!(Iov::decode(&wire), get);
        // A reply header (cmd = PS_IOV_ADD_F | PE_PRESENT << 16) decodes its page count from
        // the u64 at offset 8.
        let mut reply = wire;
        reply[0..4].copy_from_slice(&(6u32 | 4 << 16).to_ne_bytes());
        reply[8..16].copy_from_slice(&3u64.to_ne_bytes());
        assert_eq!(Iov::decode(&reply).check_reply_to(&get), Ok(3));
    }
}
