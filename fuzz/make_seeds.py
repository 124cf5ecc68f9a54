#!/usr/bin/python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (small valid inputs; see fuzz/README.md).
Run from anywhere: /usr/bin/python3 fuzz/make_seeds.py"""
import hashlib
import hmac
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# ---- protocol (src/protocol/mod.rs): len:u32 version:u16 kind:u16 payload ----
def frame(kind, payload, version=1):
    return struct.pack("<IHH", 4 + len(payload), version, kind) + payload


def text(s):
    b = s.encode()
    return struct.pack("<H", len(b)) + b


def hello(pid, flags, exe):
    return frame(0x0001, struct.pack("<II", pid, flags) + text(exe))


def restore(pid, image, regions):
    body = struct.pack("<II", pid, 0) + text(image) + struct.pack("<I", len(regions))
    for start, length in regions:
        body += struct.pack("<QQ", start, length)
    return frame(0x0004, body)


HANDOFF = frame(0x0002, b"")
REGISTER = frame(0x0003, struct.pack("<QQ", 0x7F0000000000, 1 << 20))
ACK = frame(0x0101, struct.pack("<Q", 123 << 12))
NACK = frame(0x0102, struct.pack("<H", 2) + text("uid 1000 may not attach"))
GRANT = frame(0x0103, b"")

# First byte: the read size (0: the manager's whole buffer).
put("protocol_stream", "hello_has_uffd", b"\x00" + hello(4242, 1, "/usr/bin/python3"))
put("protocol_stream", "grant_then_handoff", b"\x07" + hello(7, 2 | 4, "/bin/sh") + GRANT + HANDOFF)
put("protocol_stream", "forked_registers", b"\x03" + hello(8, 8, "a") + REGISTER + REGISTER + ACK)
put("protocol_stream", "nack", b"\x01" + NACK)
put("protocol_stream", "restore_small", b"\x10" + restore(99, "/tmp/img", [(0x10000, 0x4000), (0x20000, 0x1000)]))
# Longer than MAX_FRAME: only a Restore may be.
put("protocol_stream", "restore_long", b"\xff" + restore(99, "/img", [(i << 16, 0x1000) for i in range(260)]))
put("protocol_stream", "bad_version", b"\x00" + frame(0x0003, struct.pack("<QQ", 0, 0), version=2))

# ---- image manifest (umm-image(5)) ----
MAN_EXAMPLE = """{"format":"umm-image","version":1,"page_size":4096,"chunk_size":65536,"data_len":90112,
"source":{"pid":4242,"exe":"/usr/bin/python3","created_unix":1764158400},
"regions":[
{"start":"0x55d0c2a1e000","len":"0x21000","prot":"rw-","flags":["private","anonymous","heap"],"name":"[heap]","runs":[["0x0","0x3000","0x0"],["0x5000","0x10000","0x3000"]]},
{"start":"0x7f3a1c000000","len":"0x4000","prot":"---","flags":["private","anonymous","reservation"],"name":"","runs":[]},
{"start":"0x7ffd4b1f0000","len":"0x21000","prot":"rw-","flags":["private","anonymous","stack","growsdown"],"name":"[stack]","runs":[["0x1e000","0x3000","0x13000"]]}
]}
"""
EMPTY = """{"format":"umm-image","version":1,"page_size":4096,"chunk_size":65536,"data_len":0,
"source":{"pid":1,"exe":"","created_unix":0},
"regions":[]}
"""
SMALL = """{"format":"umm-image","version":1,"page_size":4096,"chunk_size":65536,"data_len":8192,
"source":{"pid":2,"exe":"x","created_unix":5},
"regions":[
{"start":"0x1000","len":"0x2000","prot":"r--","flags":[],"name":"","runs":[["0x0","0x1000","0x0"]]},
{"start":"0x3000","len":"0x1000","prot":"rwx","flags":["noreserve"],"name":"[anon:x]","runs":[["0x0","0x1000","0x1000"]]}
]}
"""
put("image_manifest", "man_example", MAN_EXAMPLE)
put("image_manifest", "empty", EMPTY)
put("image_manifest", "small", SMALL)

# ---- image opener: mode:u8 tweak:u16 manifest [0 sums_len:u16 sums pages] ----
put("image_open", "man_example", b"\x00\x00\x00" + MAN_EXAMPLE.encode())
put("image_open", "small", b"\x00\x00\x00" + SMALL.encode())
put("image_open", "small_flipped", b"\x04\x05\x00" + SMALL.encode())
put("image_open", "empty", b"\x00\x00\x00" + EMPTY.encode())
no_data_sums = b"UMMCSUM1" + struct.pack("<IQ", 65536, 0)
put("image_open", "empty_raw_files", b"\x03\x00\x00" + EMPTY.encode() + b"\x00" + struct.pack("<H", len(no_data_sums)) + no_data_sums)

# ---- /proc maps and smaps (src/sys/proc.rs) ----
put("proc_maps", "maps", """55d0c8a00000-55d0c8a21000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7f0000021000-7f0004000000 ---p 00000000 00:00 0 
7f1000000000-7f1000001000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
7f2000000000-7f2000010000 r--p 00000000 08:01 5678                       /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
""")
put("proc_maps", "smaps", """7f0000000000-7f0000021000 rw-p 00000000 00:00 0
Size:                132 kB
Anonymous:           100 kB
VmFlags: rd wr mr mw me ac um
7f1000000000-7f1000021000 rw-p 00000000 00:00 0
Anonymous:            28 kB
VmFlags: rd wr mr mw me ac
""")


# ---- page-server protocol (src/netproto/mod.rs): len:u32 version:u16 kind:u16 payload ----
def nframe(kind, payload, version=3):
    return struct.pack("<IHH", 4 + len(payload), version, kind) + payload


# Sealed frames (every frame after Welcome): frame ‖ HMAC-SHA256(session, dir ‖ seq ‖ frame),
# with the fuzz target's fixed key and nonces.
SEED_KEY = b"umm fuzz seed key, 32 bytes long"
SEED_SESSION = hmac.new(SEED_KEY, b"umm session" + b"\x11" * 32 + b"\x22" * 32,
                        hashlib.sha256).digest()


def sealed(frames, direction=b"umm-net-2 s2c"):
    out = b""
    for seq, f in enumerate(frames):
        out += f + hmac.new(SEED_SESSION, direction + struct.pack("<Q", seq) + f,
                            hashlib.sha256).digest()
    return out


put("netproto_stream", "handshake",
    nframe(1, struct.pack("<I", 1)) + nframe(2, struct.pack("<I", 1) + b"\x11" * 32)
    + nframe(3, b"\x22" * 64) + nframe(4, b"\x33" * 32))
put("netproto_stream", "manifest_get_data",
    nframe(5, struct.pack("<QI", 4096, 1) + struct.pack("<I", 0) + struct.pack("<I", 2) + b"{}")
    + nframe(6, struct.pack("<QQII", 1, 0, 4096, 1))
    + nframe(7, struct.pack("<QQI", 1, 0, 1) + struct.pack("<I", 0) + b"\x00" * 4096))
put("netproto_stream", "error_complete_close",
    nframe(8, struct.pack("<HH", 1, 5) + b"wrong") + nframe(9, b"") + nframe(10, b""))
put("netproto_stream", "sealed_manifest_data_close", sealed([
    nframe(5, struct.pack("<QI", 4096, 1) + struct.pack("<I", 0) + struct.pack("<I", 2) + b"{}"),
    nframe(7, struct.pack("<QQI", 1, 0, 1) + struct.pack("<I", 0) + b"\x00" * 4096),
    nframe(10, b"")]))
put("netproto_stream", "version2_hello", nframe(1, struct.pack("<I", 1), version=2))
# The urgent connection: Join (session id), the handshake, the server's sealed Join back.
put("netproto_stream", "urgent_join",
    nframe(11, struct.pack("<I", 3) + b"\x44" * 32) + nframe(2, struct.pack("<I", 3) + b"\x11" * 32)
    + nframe(3, b"\x22" * 64) + nframe(4, b"\x33" * 32))
put("netproto_stream", "sealed_join_data", sealed([
    nframe(11, struct.pack("<I", 3) + b"\x44" * 32),
    nframe(7, struct.pack("<QQI", 1, 0, 1) + struct.pack("<I", 0) + b"\x00" * 4096)]))
