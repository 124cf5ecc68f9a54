//! POSIX access ACLs, written as the `system.posix_acl_access` extended attribute (the format
//! the kernel reads: a version word, then sorted `tag perm id` entries; libacl writes the same).
//! Used to let exactly a few other uids reach the daemon's socket.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const XATTR_NAME: &std::ffi::CStr = c"system.posix_acl_access";
const ACL_VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

pub const READ: u16 = 4;
pub const WRITE: u16 = 2;
pub const EXECUTE: u16 = 1;

/// An access ACL: the owner's permissions, named users' permissions, nothing for the owning
/// group and others. The mask is the union of the named users' permissions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessAcl {
    pub owner: u16,
    pub users: Vec<(u32, u16)>,
}

impl AccessAcl {
    /// The xattr value.
    pub fn encode(&self) -> Vec<u8> {
        let mut users = self.users.clone();
        users.sort_unstable();
        users.dedup_by_key(|u| u.0);
        let mask = users.iter().fold(0, |m, u| m | u.1);
        let mut entries = vec![(USER_OBJ, self.owner & 7, UNDEFINED_ID)];
        entries.extend(users.iter().map(|&(uid, perm)| (USER, perm & 7, uid)));
        entries.push((GROUP_OBJ, 0, UNDEFINED_ID));
        if !users.is_empty() {
            entries.push((MASK, mask & 7, UNDEFINED_ID));
        }
        entries.push((OTHER, 0, UNDEFINED_ID));
        let mut v = ACL_VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    /// The named users of an xattr value (for checks); None if it is not an ACL.
    pub fn decode_users(value: &[u8]) -> Option<Vec<(u32, u16)>> {
        let version = u32::from_le_bytes(value.get(..4)?.try_into().ok()?);
        if version != ACL_VERSION || (value.len() - 4) % 8 != 0 {
            return None;
        }
        Some(
            value[4..]
                .chunks(8)
                .filter(|e| u16::from_le_bytes([e[0], e[1]]) == USER)
                .map(|e| {
                    (
                        u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                        u16::from_le_bytes([e[2], e[3]]),
                    )
                })
                .collect(),
        )
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

/// Replace the access ACL of `path` (the group and other mode bits follow it: the group bits
/// show the mask). EOPNOTSUPP: the file system has no POSIX ACLs.
pub fn set_access_acl(path: &Path, acl: &AccessAcl) -> io::Result<()> {
    let p = c_path(path)?;
    let value = acl.encode();
    // SAFETY: p and XATTR_NAME are NUL-terminated strings, value is a live buffer of the
    // length given; setxattr only reads them.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            XATTR_NAME.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The raw access ACL xattr of `path` (ENODATA: it has none beyond its mode bits).
pub fn get_access_acl(path: &Path) -> io::Result<Vec<u8>> {
    let p = c_path(path)?;
    let mut buf = vec![0u8; 1024];
    // SAFETY: p and XATTR_NAME are NUL-terminated; getxattr writes at most buf.len() bytes.
    let r = unsafe {
        libc::getxattr(
            p.as_ptr(),
            XATTR_NAME.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_kernel_format_with_a_mask() {
        let acl = AccessAcl {
            owner: READ | WRITE,
            users: vec![(65534, READ | WRITE)],
        };
        // What setfacl -m u:65534:rw,g::-,o::- writes (checked with getfattr on ext4).
        let want = "0200000001000600ffffffff02000600feff000004000000ffffffff10000600ffffffff\
                    20000000ffffffff";
        let got: String = acl.encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
        assert_eq!(
            AccessAcl::decode_users(&acl.encode()),
            Some(vec![(65534, 6)])
        );
    }

    #[test]
    fn a_file_gets_the_acl_and_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("umm-acl-{}", std::process::id()));
        std::fs::write(&dir, b"").unwrap();
        let acl = AccessAcl {
            owner: READ | WRITE,
            users: vec![(65534, READ), (65533, WRITE)],
        };
        let r = set_access_acl(&dir, &acl);
        if let Err(e) = &r {
            let _ = std::fs::remove_file(&dir);
            // A temp dir without ACL support is a machine fact, not a bug; say so loudly.
            panic!("setxattr on {}: {e}", dir.display());
        }
        let users = AccessAcl::decode_users(&get_access_acl(&dir).unwrap()).unwrap();
        assert_eq!(users, vec![(65533, WRITE), (65534, READ)]);
        let mode = std::fs::metadata(&dir).map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & 0o777
        });
        let _ = std::fs::remove_file(&dir);
        // group bits show the mask (r|w), others nothing
        assert_eq!(mode.unwrap(), 0o660);
    }
}
