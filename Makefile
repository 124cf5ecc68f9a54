# umm — build, test, install.
#   make                  build release binaries (installs missing build tools first)
#   make test             everything: fmt check, clippy -D warnings, unit + integration tests,
#                         fuzz-smoke
#   make install PREFIX=/usr/local   (binary, agent, man pages, systemd units)
#   make deb              target/deb/umm_VERSION_ARCH.deb (dpkg-deb from a staged install)
#   make deb-test         install that package with dpkg -i, check it, remove it (as root)
#   make bench            benchmarks (see benches/)
#   make soak             long chaos and fuzz runs (not part of make test)
#   make fuzz-smoke       build the fuzz targets (fuzz/) and run each briefly (part of make test)
#   make fuzz-soak        run every fuzz target, at least 10 minutes in all (for make soak)

PREFIX  ?= /usr/local
DESTDIR ?=
CARGO   ?= cargo
BINDIR   = $(DESTDIR)$(PREFIX)/bin
LIBDIR   = $(DESTDIR)$(PREFIX)/lib/umm
MANDIR   = $(DESTDIR)$(PREFIX)/share/man
UNITDIR  = $(DESTDIR)$(PREFIX)/lib/systemd/system

export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all build deps test-deps test check fmt-check clippy unit criu-fixture-test \
	lazy-pages-test criu-e2e-test bench soak \
	chaos-soak install uninstall deb deb-test clean fuzz-deps fuzz-build fuzz-smoke fuzz-soak fuzz-run

all: build

build: deps
	$(CARGO) build --release --workspace

# Build tools. Installs what is missing with apt-get (Debian), and Rust with rustup when there
# is no cargo at all (Debian's own cargo is too old for the dependencies).
deps:
	@missing=""; \
	for t in cc:gcc make:make; do \
	  command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo "no cargo: installing Rust with rustup"; \
	  command -v curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq curl ca-certificates; }; \
	  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt; }

# What the tests drive besides umm: python3 (a real interpreter), setpriv (an unprivileged
# target), coreutils (sort, sha256sum), systemd-analyze (verifies dist/ units; systemd need not
# run), redis-server and redis-cli (tests/coverage.rs), ip, tc and nsenter (tests/net.rs: network
# namespaces joined by a veth pair).
test-deps: deps
	@missing=""; \
	[ -x /usr/bin/python3 ] || missing="$$missing python3"; \
	command -v setpriv >/dev/null 2>&1 || missing="$$missing util-linux"; \
	command -v sha256sum >/dev/null 2>&1 || missing="$$missing coreutils"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null 2>&1 || missing="$$missing redis-tools"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v tc >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v nsenter >/dev/null 2>&1 || missing="$$missing util-linux"; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v go >/dev/null 2>&1 || missing="$$missing golang-go"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true

fmt-check: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Unit and integration tests. The integration tests drive target/release/umm and the agent, so
# the release build comes first; tests share its artifacts (--release).
unit: build test-deps criu-fixture-test lazy-pages-test criu-e2e-test
	$(CARGO) test --release --workspace -- --test-threads=2
	target/release/umm-bench --quick --out target/bench-smoke

# The CRIU reader checked against real CRIU 4.2 images (src/criu/fixture_tests.rs): its 29 MB
# pages-*.img are not committed; found in $UMM_CRIU_FIXTURE, /work/shared/fixtures/ or ../shared/.
# --workspace --lib: the same test binary (same features) as `unit` builds, so no extra compile.
CRIU_FIXTURE_DIRS = /work/shared/fixtures/criu-4.2-memtest $(CURDIR)/../shared/fixtures/criu-4.2-memtest
# $(call with_criu_fixture,NAME,COMMAND): COMMAND with UMM_CRIU_FIXTURE set to the first of
# those directories that holds the pages files; without one, NAME's SKIPPED line (an explicit
# UMM_CRIU_FIXTURE without them is an error).
with_criu_fixture = \
	if [ -n "$$UMM_CRIU_FIXTURE" ]; then dirs="$$UMM_CRIU_FIXTURE"; else dirs="$(CRIU_FIXTURE_DIRS)"; fi; \
	for d in $$dirs; do \
	  if [ -f "$$d/pages-1.img" ] && [ -f "$$d/pages-2.img" ]; then \
	    echo "CRIU fixture: $$d"; UMM_CRIU_FIXTURE="$$d" $(2); exit $$?; \
	  fi; \
	done; \
	if [ -n "$$UMM_CRIU_FIXTURE" ]; then \
	  echo "UMM_CRIU_FIXTURE=$$UMM_CRIU_FIXTURE has no pages-1.img and pages-2.img" >&2; exit 1; \
	fi; \
	echo "SKIPPED: $(1): CRIU fixture pages not found (set UMM_CRIU_FIXTURE)"

criu-fixture-test: deps
	@$(call with_criu_fixture,criu-fixture-test,$(CARGO) test --release --workspace --lib -- --ignored criu_fixture)

# umm lazy-pages serving the same fixture to tests/targets/criu_restorer.c (CRIU's side of
# `criu restore --lazy-pages`), and fail-stop (tests/lazy_pages.rs, the #[ignore]d tests; the
# protocol tests there run in `unit`). About 10 s.
lazy-pages-test: build test-deps
	@$(call with_criu_fixture,lazy-pages-test,$(CARGO) test --release --test lazy_pages -- --ignored --test-threads=2)

# A real CRIU end to end (tests/criu_e2e.rs, #[ignore]d): criu dump of the memtest workload,
# criu restore --lazy-pages served by umm lazy-pages; and remote mode (criu dump --lazy-pages
# --port in its own network + PID namespace, umm lazy-pages --page-server in another, a veth
# pair between; needs ip, tc, nsenter, unshare). Needs CRIU >= 4.0: $(CRIU), else `criu`
# on PATH; otherwise SKIPPED (Debian 12's criu is too old: build CRIU from source, README).
CRIU ?= criu
criu-e2e-test: build test-deps
	@v=$$($(CRIU) --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9]*\)\..*/\1/p'); \
	if [ -z "$$v" ] || [ "$$v" -lt 4 ]; then \
	  echo "SKIPPED: criu (>= 4.0) not found (CRIU=$(CRIU))"; exit 0; \
	fi; \
	echo "CRIU: $$(command -v $(CRIU)) version $$($(CRIU) --version | sed -n 's/^Version: *//p')"; \
	UMM_CRIU="$$(command -v $(CRIU))" $(CARGO) test --release --test criu_e2e -- --ignored \
	  --test-threads=1

test: fmt-check clippy unit fuzz-smoke deb-test

# Coverage-guided fuzzing of the decoders (fuzz/README.md): cargo-fuzz on the stable toolchain,
# without sanitizers (-s none needs no -Z flag), with debug assertions and overflow checks.
# Each run writes what it learns to fuzz/target/corpus/TARGET (the committed seeds in
# fuzz/corpus/ stay as they are) and a crashing input to fuzz/artifacts/TARGET/; a crash fails
# the run.
FUZZ_TARGETS        = protocol_stream netproto_stream image_manifest image_open proc_maps
FUZZ_SMOKE_SECONDS ?= 15
FUZZ_SOAK_SECONDS  ?= 155
FUZZ_BUILD_FLAGS    = --sanitizer none --debug-assertions
FUZZ_RUN_FLAGS      = -rss_limit_mb=1024 -timeout=10 -print_final_stats=1

# cargo-fuzz builds from crates.io (a few minutes on 2 cores, once).
fuzz-deps: deps
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked

fuzz-build: fuzz-deps
	cd fuzz && $(CARGO) fuzz build $(FUZZ_BUILD_FLAGS)

fuzz-smoke: fuzz-build
	@$(MAKE) --no-print-directory fuzz-run FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS)

fuzz-soak: fuzz-build
	@$(MAKE) --no-print-directory fuzz-run FUZZ_SECONDS=$(FUZZ_SOAK_SECONDS)

# libFuzzer's progress lines go to fuzz/target/TARGET.log; a failure prints its tail.
fuzz-run:
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/target/corpus/$$t; \
	  log=fuzz/target/$$t.log; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s (log: $$log)"; \
	  if (cd fuzz && $(CARGO) fuzz run $(FUZZ_BUILD_FLAGS) $$t target/corpus/$$t corpus/$$t -- \
	      -max_total_time=$(FUZZ_SECONDS) $(FUZZ_RUN_FLAGS)) >$$log 2>&1; then \
	    grep -E '^(Done|stat::number_of_executed_units)' $$log | head -1; \
	  else \
	    tail -n 60 $$log; \
	    echo "fuzz: $$t FAILED: crashing input in fuzz/artifacts/$$t/"; exit 1; \
	  fi; \
	done

# Long runs, not part of `make test`. chaos-soak: the chaos tests (tests/chaos.rs) with 1000
# random kills of targets and 10 000 attach/detach cycles against one daemon, and 1000 random
# kills of restored targets (tests/restore.rs).
soak: chaos-soak fuzz-soak

chaos-soak: build test-deps
	UMM_CHAOS_ITERATIONS=1000 UMM_ATTACH_CYCLES=10000 \
	  $(CARGO) test --release --test chaos -- --test-threads=2
	UMM_CHAOS_ITERATIONS=1000 \
	  $(CARGO) test --release --test restore -- --test-threads=2 killing_restored_targets_at_random_moments

# Benchmarks (benches/README.md): umm against the ceiling and the kernel, as root, under 15 minutes
# on 2 cores. A table per figure on stdout, target/bench/results.json, target/bench/chart.svg.
bench: build test-deps
	UMM_CRIU=$(CRIU) target/release/umm-bench --out target/bench

install: build
	install -d $(BINDIR) $(LIBDIR) $(MANDIR)/man1 $(MANDIR)/man5 $(MANDIR)/man7
	install -m 0755 target/release/umm $(BINDIR)/umm
	install -m 0755 target/release/libumm_agent.so $(LIBDIR)/libumm_agent.so
	install -m 0644 man/umm.1 $(MANDIR)/man1/umm.1
	install -m 0644 man/umm-agent.7 $(MANDIR)/man7/umm-agent.7
	install -m 0644 man/umm-protocol.5 $(MANDIR)/man5/umm-protocol.5
	install -m 0644 man/umm-image.5 $(MANDIR)/man5/umm-image.5
	install -d $(UNITDIR)
	sed 's#/usr/local/bin/umm#$(PREFIX)/bin/umm#' dist/umm.service > $(UNITDIR)/umm.service
	chmod 0644 $(UNITDIR)/umm.service
	install -m 0644 dist/umm.socket $(UNITDIR)/umm.socket

uninstall:
	rm -f $(BINDIR)/umm $(LIBDIR)/libumm_agent.so $(MANDIR)/man1/umm.1 \
	  $(MANDIR)/man7/umm-agent.7 $(MANDIR)/man5/umm-protocol.5 \
	  $(MANDIR)/man5/umm-image.5 $(UNITDIR)/umm.service $(UNITDIR)/umm.socket
	-rmdir $(LIBDIR)

# A Debian package of what `make install PREFIX=/usr` installs, built with dpkg-deb from a
# staged tree (no cargo-deb needed). Package `umm`; libc6 is its only run-time dependency.
DEB_VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
DEB_ARCH    = $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB_STAGE   = target/deb/stage
DEB_FILE    = target/deb/umm_$(DEB_VERSION)_$(DEB_ARCH).deb
deb: build
	rm -rf $(DEB_STAGE)
	$(MAKE) --no-print-directory install PREFIX=/usr DESTDIR=$(CURDIR)/$(DEB_STAGE)
	gzip -9n $(DEB_STAGE)/usr/share/man/man*/*.[0-9]
	install -d $(DEB_STAGE)/DEBIAN
	printf '%s\n' 'Package: umm' 'Version: $(DEB_VERSION)' 'Architecture: $(DEB_ARCH)' \
	  'Maintainer: umm developers <umm@localhost>' 'Section: admin' 'Priority: optional' \
	  'Depends: libc6' \
	  "Installed-Size: $$(du -sk $(DEB_STAGE)/usr | cut -f1)" \
	  'Description: non-cooperative userfaultfd memory manager' \
	  ' umm serves the anonymous memory of other processes through userfaultfd:' \
	  ' umm run, umm daemon (with systemd units), lazy restores of memory images.' \
	  > $(DEB_STAGE)/DEBIAN/control
	dpkg-deb --root-owner-group --build $(DEB_STAGE) $(DEB_FILE)
	@echo "built $(DEB_FILE)"

# Installs the package into this system (root), checks it, removes it (part of `make test`);
# skipped, with a SKIPPED line, when a package `umm` is installed already (it would replace it).
# About 5 s after `make deb`.
deb-test: deb
	@if dpkg-query -W -f='$${Status}' umm 2>/dev/null | grep -q 'install ok'; then \
	  echo "SKIPPED: deb-test: a package umm is installed already; not touching it"; exit 0; fi; \
	dpkg -i $(DEB_FILE); \
	set -e; trap 'dpkg -r umm >/dev/null 2>&1 || true' EXIT; \
	  /usr/bin/umm --version | head -1 | grep -q '^umm $(DEB_VERSION)'; \
	  test -x /usr/lib/umm/libumm_agent.so; \
	  test -f /usr/lib/systemd/system/umm.service; test -f /usr/lib/systemd/system/umm.socket; \
	  if command -v man >/dev/null 2>&1; then man -w umm | grep -q '^/usr/share/man/man1/umm.1'; \
	  else test -f /usr/share/man/man1/umm.1.gz; fi; \
	  for f in $$(dpkg -L umm | grep -v '/$$'); do [ -d "$$f" ] || test -e "$$f"; done; \
	  dpkg -L umm | grep -v -e '^/\.$$' > target/deb/files; \
	  dpkg -r umm; trap - EXIT; \
	  left=""; for f in $$(cat target/deb/files); do [ -d "$$f" ] || ! test -e "$$f" || left="$$left $$f"; done; \
	  if [ -n "$$left" ]; then echo "deb-test: left after dpkg -r:$$left" >&2; exit 1; fi; \
	  echo "deb-test: installed, checked (umm --version, man -w umm, agent, units), removed: OK"

clean:
	$(CARGO) clean
	rm -rf fuzz/target
