# Figure 5's python workload: allocation-heavy, ~256 MiB of small objects for N = 1000000.
# usage: python3 alloc.py N   -- prints a digest of the data and N (the same under umm).
import hashlib
import sys

n = int(sys.argv[1])
rows = [bytes([i % 251]) * 200 for i in range(n)]
print(hashlib.sha256(b"".join(rows[::1000])).hexdigest()[:16], len(rows))
