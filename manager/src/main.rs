//! `umm` — a non-cooperative userfaultfd memory manager.

mod abort_signals;
mod attach;
mod control;
mod copier;
mod coverage;
mod criu_page_server;
mod daemon;
mod helper_thread;
mod http_source;
mod keeper;
mod lazy_pages;
mod live;
#[cfg(test)]
mod man_check;
mod manager;
mod migrate_source;
mod mm_check;
mod net_server;
mod net_source;
mod net_tls;
mod page_server;
mod page_source;
mod peers;
mod preflight;
mod progress;
mod readahead;
mod report_cmd;
mod report_svg;
mod restore;
mod restore_cmd;
mod run;
mod serve;
mod slab;
mod snapshot_cmd;
mod space;
mod stat_cmd;
mod stats;
mod strict;
mod trace;
mod version;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "umm",
    version,
    about = "A non-cooperative userfaultfd memory manager",
    long_about = "umm serves the anonymous memory of other processes through userfaultfd. \
                  A small agent (libumm_agent.so, loaded with LD_PRELOAD) hands each process's \
                  userfaultfd to the manager, which answers its page faults, follows fork, \
                  mremap, madvise and munmap, and counts what it served.\n\n\
                  Logging: RUST_LOG=info (or debug) for more detail."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command with its whole process tree's memory served by an embedded manager.
    Run(RunArgs),
    /// A long-running manager that processes opt in to with the agent.
    Daemon(DaemonArgs),
    /// Serve lazy restores from a memory image: restored processes run at once while their
    /// memory is filled behind them, faults first.
    Restore(RestoreArgs),
    /// Serve the lazy pages of a CRIU restore: a drop-in for `criu lazy-pages` (run it, then
    /// `criu restore --lazy-pages` with the same images directory).
    LazyPages(lazy_pages::LazyPagesArgs),
    /// Serve a CRIU image's lazy pages over TCP with CRIU's page-server protocol (for
    /// `criu lazy-pages --page-server` or `umm lazy-pages --page-server` on another host).
    CriuPageServer(criu_page_server::CriuPageServerArgs),
    /// Serve a memory image over TCP to `umm restore --source tcp://ADDR:PORT` (post-copy
    /// over the network; a pre-shared key authenticates both sides).
    PageServer(net_server::PageServerArgs),
    /// Post-copy live migration, source side: freeze a process and serve its memory straight
    /// from it to `umm restore --source tcp://ADDR:PORT`; killed on Complete, resumed if the
    /// destination fails first.
    MigrateSource(migrate_source::MigrateSourceArgs),
    /// Show a running manager's live status (through its control socket).
    Stat(stat_cmd::StatArgs),
    /// Manage a running process without the agent (ptrace): serve its memory until it exits
    /// or is detached.
    Attach(attach::AttachArgs),
    /// Let go of an attached process (through its manager's control socket).
    Detach(attach::DetachArgs),
    /// Write a memory image of a live process (its private anonymous memory).
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Draw a --trace file: `umm report TRACE --svg OUT.svg`.
    Report(report_cmd::ReportArgs),
    /// Print a shell completion script (e.g. `source <(umm completions bash)`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The fail-stop keeper of a restore (started by umm restore itself).
    #[command(name = "__keeper", hide = true)]
    Keeper {
        #[arg(long)]
        fd: i32,
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct RestoreArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The image directory (written by umm snapshot).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "source",
        conflicts_with = "source"
    )]
    image: Option<PathBuf>,
    /// Fetch the image over the network instead: tcp://HOST:PORT from `umm page-server` or
    /// `umm migrate-source` (needs --key), or http(s)://HOST[:PORT]/PATH/, an image directory
    /// on an HTTP server that answers Range requests. The restorer names this URL as its image
    /// (UMM_RESTORE_IMAGE).
    #[arg(long, value_name = "URL")]
    source: Option<String>,
    /// The pre-shared key file of the page server (--source tcp://).
    #[arg(long, value_name = "FILE", requires = "source")]
    key: Option<PathBuf>,
    /// Trust the certificates in FILE (PEM: a CA, or the server's own certificate). With
    /// tcp://: speak TLS to the page server. With https://: instead of the system's store
    /// (/etc/ssl/certs/ca-certificates.crt).
    #[arg(long, value_name = "FILE", requires = "source")]
    tls_ca: Option<PathBuf>,
    /// The name the page server's certificate must carry (default: the host in the URL).
    /// With tcp:// and --tls-ca only.
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
    /// Send the headers in FILE (lines "Name: value", e.g. "Authorization: Bearer TOKEN") with
    /// every HTTP request (http(s):// sources). Their values are never logged.
    #[arg(long, value_name = "FILE", requires = "source")]
    http_header_file: Option<PathBuf>,
    /// The unix socket restorers connect to (default with CMD: a private one, passed to CMD
    /// as UMM_RESTORE_SOCKET, with the image directory as UMM_RESTORE_IMAGE; without CMD this
    /// option is required).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Fill the pages of this recorded fault order first (a --trace file of umm run or of an
    /// earlier restore; each fault line's start address, in order).
    #[arg(long, value_name = "FILE")]
    prefetch: Option<PathBuf>,
    /// Serve faults only: no background fill (the restore completes only if every page is
    /// touched).
    #[arg(long)]
    no_background: bool,
    /// Bound the background fill to this many bytes per second.
    #[arg(long, value_name = "BYTES_PER_S")]
    fill_rate: Option<u64>,
    /// Background fill chunk, in bytes: it adapts between 256 KiB and this (at least 256 KiB).
    #[arg(long, value_name = "BYTES", default_value_t = 2 << 20, value_parser = parse_window)]
    fill_chunk_max: u64,
    /// Threads copying the background fill while no fault waits: 1 (the loop) or 2 (the
    /// loop and a second copier) [default: 2 when the manager may run on two or more CPUs,
    /// else 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=2))]
    fill_threads: Option<u8>,
    /// Verify every chunk of the image before serving anything (else each chunk is verified
    /// before its first use). With --image only.
    #[arg(long, conflicts_with = "source")]
    verify: bool,
    /// Do not put the restored processes in a cgroup of their own (the keeper then kills
    /// them by pid on fail-stop, which misses children it never heard of).
    #[arg(long)]
    no_cgroup: bool,
    /// Also accept restorers of this uid (repeatable; umm's own uid and root always).
    #[arg(long, value_name = "UID")]
    allow_uid: Vec<u32>,
    /// Keep serving restores until SIGTERM/SIGINT, instead of exiting once every restore
    /// handed over so far is complete. A signal stops unfinished restores (their processes are
    /// killed: they cannot run without their memory).
    #[arg(long)]
    keep_running: bool,
    /// Answer `umm stat` on this unix socket (root and umm's own uid only; off by default).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// No summary on stderr.
    #[arg(short, long)]
    quiet: bool,
    /// The restoring program and its arguments (run with UMM_SOCKET set, like umm run runs a
    /// command).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct CommonArgs {
    /// Write a JSON report of what was served to FILE at the end.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Write one JSON line per fault and layout event to FILE.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Smallest fault-around window in bytes (a fault is answered with at least this much).
    #[arg(long, value_name = "BYTES", default_value_t = 4096, value_parser = parse_window)]
    fault_around_min: u64,
    /// Largest fault-around window in bytes (sequential faults and filling blocks grow the
    /// window up to this).
    #[arg(long, value_name = "BYTES", default_value_t = 2 << 20, value_parser = parse_window)]
    fault_around_max: u64,
    /// How often (milliseconds) a changing process's maps are rescanned for new mappings.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    rescan_ms: u64,
    /// After activity, keep polling without sleeping for this many microseconds (0: always
    /// sleep). Shortens fault round trips in bursts at the cost of CPU time.
    #[arg(long, value_name = "US", default_value_t = 0)]
    spin_us: u64,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The agent library (default: $UMM_AGENT, else libumm_agent.so next to this binary or in
    /// ../lib/umm/).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Never give the command's processes a /dev/userfaultfd fd (by default, umm run as root
    /// grants it to processes of its own tree that cannot open a userfaultfd themselves, such
    /// as ones that switched to another uid).
    #[arg(long)]
    no_grant: bool,
    /// Answer `umm stat` on this unix socket (root and umm's own uid only; off by default).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// No summary on stderr.
    #[arg(short, long)]
    quiet: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Args, Debug)]
struct DaemonArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The unix socket agents connect to (UMM_SOCKET).
    #[arg(long, value_name = "PATH", default_value = "/run/umm/umm.sock")]
    socket: PathBuf,
    /// Give a /dev/userfaultfd fd to agents that cannot open a userfaultfd themselves. This
    /// lets those processes create userfaultfds at will (what vm.unprivileged_userfaultfd=0
    /// forbids): enable it only for processes you trust.
    #[arg(long)]
    grant_device: bool,
    /// Also accept processes of this uid (repeatable; the daemon's own uid and root always).
    /// The socket (and a directory umm creates for it) gets a POSIX ACL entry for each such
    /// uid; the uid is also checked on each connection (SO_PEERCRED).
    #[arg(long, value_name = "UID")]
    allow_uid: Vec<u32>,
    /// The control socket `umm stat` asks (root and the daemon's uid only; --allow-uid does
    /// not apply) [default: the --socket path with `.ctl` appended].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Also serve Prometheus metrics over HTTP at ADDR:PORT (GET /metrics; no
    /// authentication: keep it on 127.0.0.1 or a trusted network).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
}

fn parse_window(s: &str) -> Result<u64, String> {
    let v: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if v < umm::PAGE_SIZE || v > umm::source::MAX_CHUNK as u64 || v % umm::PAGE_SIZE != 0 {
        return Err(format!(
            "must be a multiple of {} between {} and {}",
            umm::PAGE_SIZE,
            umm::PAGE_SIZE,
            umm::source::MAX_CHUNK
        ));
    }
    Ok(v)
}

impl CommonArgs {
    fn config(&self, policy: manager::Policy, grant_device: bool) -> manager::Config {
        manager::Config {
            policy,
            grant_device,
            fault_around_min: self.fault_around_min,
            fault_around_max: self.fault_around_max.max(self.fault_around_min),
            rescan_interval: Duration::from_millis(self.rescan_ms.max(1)),
            trace: self.trace.clone(),
            spin: Duration::from_micros(self.spin_us),
            ..manager::Config::default()
        }
    }
}

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, rec| {
            writeln!(
                buf,
                "umm: {}: {}",
                rec.level().as_str().to_lowercase(),
                rec.args()
            )
        })
        .init();
}

/// `Cli::parse()`, with `--version` showing the kernel probe (run only when asked for).
fn parse_cli() -> Cli {
    let mut cmd = Cli::command();
    if std::env::args_os().nth(1).is_some_and(|a| a == "--version") {
        cmd = cmd.long_version(&*Box::leak(version::long_version().into_boxed_str()));
    }
    Cli::from_arg_matches_mut(&mut cmd.get_matches())
        .unwrap_or_else(|e| e.format(&mut Cli::command()).exit())
}

fn main() {
    let cli = parse_cli();
    if let Command::LazyPages(a) = &cli.command {
        // CRIU's -v: more detail, unless RUST_LOG chose already.
        if let (Some(level), None) = (
            lazy_pages::log_filter(a.verbose),
            std::env::var_os("RUST_LOG"),
        ) {
            std::env::set_var("RUST_LOG", level);
        }
    }
    init_logging();
    let code = match cli.command {
        Command::Run(args) => run::main(args),
        Command::Daemon(args) => daemon::main(args),
        Command::Snapshot(args) => snapshot_cmd::main(args),
        Command::Attach(args) => attach::main(args),
        Command::Detach(args) => attach::detach_main(args),
        Command::Stat(args) => stat_cmd::main(args),
        Command::Report(args) => report_cmd::main(args),
        Command::Restore(args) => restore_cmd::main(args),
        Command::LazyPages(args) => lazy_pages::main(args),
        Command::CriuPageServer(args) => criu_page_server::main(args),
        Command::PageServer(args) => net_server::main(args),
        Command::MigrateSource(args) => migrate_source::main(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "umm", &mut std::io::stdout());
            0
        }
        Command::Keeper { fd, cgroup } => keeper::main(fd, cgroup),
    };
    std::process::exit(code);
}
