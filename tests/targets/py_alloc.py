"""py_alloc: allocate and checksum ~256 MiB through small python objects.

Small objects (<= 512 bytes) live in pymalloc arenas, which python maps with mmap(); under umm
those arenas are registered by the agent and every page of them is served by the manager.

1. build: a hash chain h_i = sha256(h_{i-1} || i) gives object i: bytes of 100..200 bytes
   taken from h_i (every 16th one a bytearray); the build digest hashes each object as built.
   List/tuple/dict work rides along: a tuple per 4th object, an index dict by first byte.
2. mutate every bytearray (first byte flipped) long after it was built.
3. re-read: digest of the stored objects, and each object compared with an independent,
   streaming regeneration of the chain (nothing stored); tuples and the dict checked too.
The build digest (adjusted for the mutation), the re-read digest and the regenerated digest
must agree. Finally, for a sample of objects, the VMA holding it must be registered with a
userfaultfd (`um` in VmFlags; natively 0 of them are): "registered=K/N".
Prints "OK py_alloc checksum=<hex> ..." or "FAIL py_alloc: ..." and exits 1.

usage: py_alloc.py [MiB=256]
tests/run_python.rs pins the checksums of 256 and 64 MiB: update them if the data changes.
"""

import gc
import hashlib
import sys

SEED = b"umm-py-alloc"


def fail(msg):
    print(f"FAIL py_alloc: {msg}", flush=True)
    sys.exit(1)


def chain(count):
    """Yield (i, data) for the first `count` objects, regenerated from scratch."""
    sha = hashlib.sha256
    h = sha(SEED).digest()
    for i in range(count):
        h = sha(h + i.to_bytes(8, "little")).digest()
        n = 100 + h[0] % 101
        yield i, (h * 7)[:n]


def expected_object(i, data):
    """What object i holds after the mutation step."""
    if i % 16 == 0:
        return bytes([data[0] ^ 0xFF]) + data[1:]
    return data


def registered(addresses):
    """How many of `addresses` lie in a VMA registered with a userfaultfd for missing faults
    (`um` in VmFlags of /proc/self/smaps). CPython's id() is the object's address."""
    vmas = []
    with open("/proc/self/smaps") as f:
        cur = None
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not line.startswith("VmFlags"):
                lo, _, hi = head.partition("-")
                try:
                    cur = [int(lo, 16), int(hi, 16), False]
                    vmas.append(cur)
                    continue
                except ValueError:
                    pass
            if line.startswith("VmFlags:") and cur is not None:
                cur[2] = "um" in line.split()[1:]
    k = 0
    for a in addresses:
        for lo, hi, um in vmas:
            if lo <= a < hi:
                k += um
                break
    return k


def main():
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    if not 1 <= mib <= 1024:
        fail("MiB must be in 1..1024")
    target = mib << 20
    gc.disable()

    # 1. build
    sha = hashlib.sha256
    objs = []
    meta = []
    by_first = {}
    build = sha()
    h = sha(SEED).digest()
    used = 0
    i = 0
    while used < target:
        h = sha(h + i.to_bytes(8, "little")).digest()
        n = 100 + h[0] % 101
        data = (h * 7)[:n]
        if i % 16 == 0:
            o = bytearray(data)
            used += n + 57 + 16  # object + separately allocated buffer
            build.update(bytes([data[0] ^ 0xFF]))  # digest of the value after the mutation
            build.update(o[1:])
        else:
            o = data
            used += n + 33
            build.update(o)
        objs.append(o)
        if i % 4 == 0:
            meta.append((i, n, data[0], data[-1]))
            by_first.setdefault(data[0], []).append(i)
        i += 1
    count = i

    # 2. mutate the bytearrays, long after they were built
    for j in range(0, count, 16):
        objs[j][0] ^= 0xFF

    # 3a. re-read the stored objects
    reread = sha()
    total_len = 0
    for o in objs:
        reread.update(o)
        total_len += len(o)

    # 3b. independent expectation: regenerate the chain, compare object by object
    regen = sha()
    regen_len = 0
    for j, data in chain(count):
        want = expected_object(j, data)
        got = objs[j]
        if got != want:
            fail(f"object {j} holds {bytes(got[:16]).hex()}.. (len {len(got)}), want {want[:16].hex()}.. (len {len(want)})")
        regen.update(want)
        regen_len += len(want)
        if j % 4 == 0:
            t = meta[j // 4]
            if t != (j, len(data), data[0], data[-1]):
                fail(f"tuple for object {j} is {t}, want {(j, len(data), data[0], data[-1])}")

    # 3c. the index dict agrees with the tuples
    indexed = 0
    for first, idxs in by_first.items():
        for j in idxs:
            if meta[j // 4][2] != first:
                fail(f"dict lists object {j} under first byte {first}, tuple says {meta[j // 4][2]}")
        indexed += len(idxs)
    if indexed != len(meta):
        fail(f"dict indexes {indexed} objects, {len(meta)} tuples exist")

    a, b, c = build.hexdigest(), reread.hexdigest(), regen.hexdigest()
    if not a == b == c:
        fail(f"digests differ: build {a}, re-read {b}, regenerated {c}")
    if total_len != regen_len:
        fail(f"stored length {total_len}, regenerated {regen_len}")
    meta_sum = sum(t[1] + t[2] + t[3] for t in meta)
    # where the objects live: under umm, in arenas registered before they were filled
    sample = [id(objs[j]) for j in range(0, count, max(1, count // 64))]
    k = registered(sample)
    print(
        f"OK py_alloc checksum={a[:16]} objects={count} bytes={total_len} "
        f"tuples={len(meta)} meta_sum={meta_sum} mib={mib} registered={k}/{len(sample)}",
        flush=True,
    )


if __name__ == "__main__":
    main()
