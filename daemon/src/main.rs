//! `rados-nbd`: serve RBD format-2 images over NBD with the object map in memory.

use clap::Parser;
use rados_nbd::cli;
use rados_nbd::error::{Error, ErrorKind};

/// Exit status 2: the command can never succeed as given (bad arguments, or an image, pool,
/// namespace, snapshot or device it names does not exist), so retrying it is pointless;
/// rados-nbd@.service stops restarting on it (RestartPreventExitStatus=2). 1: anything else,
/// which may pass on a retry (a cluster not reachable yet, a lock held, a device busy).
const EXIT_PERMANENT: i32 = 2;

fn fail(e: &Error) -> ! {
    eprintln!("rados-nbd: {e}");
    std::process::exit(if e.kind == ErrorKind::NotFound {
        EXIT_PERMANENT
    } else {
        1
    });
}

fn main() {
    // One line, never a backtrace: a panic is a bug, but the user still gets a sentence.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("rados-nbd: internal error: {}{at}", msg.replace('\n', " "));
    }));

    // A read served from Ceph may finish on the librados thread that completes it and send
    // its reply from there (nbd_protocol's inline.rs says why).
    #[cfg(feature = "ceph")]
    rados_nbd::store::ceph::set_completion_hook(nbd_protocol::inline::completing);

    let mut cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                let _ = e.print();
                std::process::exit(if e.use_stderr() { EXIT_PERMANENT } else { 0 });
            }
            // clap's message spans lines; keep the part before the usage, on one line.
            let text = e.render().to_string();
            let msg = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("tip:")
                        && !l.starts_with("For more information")
                })
                .collect::<Vec<_>>()
                .join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("rados-nbd: {msg} (see rados-nbd --help)");
            std::process::exit(EXIT_PERMANENT);
        }
    };
    if let Err(e) = cli.resolve_rbd_spellings() {
        // Bad arguments, as clap's own errors above.
        eprintln!("rados-nbd: {e}");
        std::process::exit(EXIT_PERMANENT);
    }
    if !cli.command.serves() {
        // Commands that print and exit end quietly on a closed pipe (`| head`,
        // `| grep -q`), like any Unix tool. Servers keep SIGPIPE ignored: a client that
        // vanishes must be an EPIPE on its socket, never the death of the daemon.
        // SAFETY: restoring a default signal disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // A foreground `map --log-file` logs to that file: stderr must point there before the
    // logger decides whether it writes to a terminal.
    #[cfg(target_os = "linux")]
    if let cli::Command::Kernel(k) = &cli.command {
        if let Err(e) = rados_nbd::kernel::log_to_file(k) {
            eprintln!("rados-nbd: {e}");
            std::process::exit(1);
        }
    }
    init_logging(cli.verbose, cli.command.serves());
    tune_malloc();
    // Kernel commands own their process: the serving daemon sets itself up (mlockall,
    // netlink from the main thread) before it builds its own runtime.
    #[cfg(target_os = "linux")]
    let ceph = cli.ceph_access();
    #[cfg(target_os = "linux")]
    if let cli::Command::Kernel(k) = cli.command {
        let r = rados_nbd::store::StoreUri::parse(cli.store.as_deref())
            .and_then(|store| rados_nbd::kernel::run(k, &store, ceph));
        if let Err(e) = r {
            fail(&e);
        }
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rados-nbd: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let r = rt.block_on(rados_nbd::cmd::dispatch(cli));
    // Blocking store work may still be queued for a failed command; don't wait on it.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    if let Err(e) = r {
        fail(&e);
    }
}

/// Request buffers (up to 32 MiB, typically 4 KiB to 1 MiB) come and go at a high rate.
/// With glibc's defaults each large one is a fresh mmap: page faults and zeroed pages on
/// every request, then munmap. Serving them from the heap and keeping freed memory around
/// (bounded by what connections may buffer) makes them reuse warm pages.
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator tunables; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

/// Logging to stderr. A daemon (`serve`, `map`, `attach`) logs what it does at info; a
/// command that does one thing and ends says only what goes wrong, and its own progress
/// (flatten, listings: `cmd` and `progress`), not the image layer's notes on the way
/// (opened, closed with its counters, snapshot created), which `-v` shows.
fn init_logging(verbose: u8, serves: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 if serves => "rados_nbd=info,nbd_protocol=warn",
        0 => "rados_nbd=warn,rados_nbd::cmd=info,rados_nbd::progress=info,nbd_protocol=warn",
        1 => "rados_nbd=debug,nbd_protocol=debug",
        _ => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => EnvFilter::try_new(s).unwrap_or_else(|_| EnvFilter::new(default)),
        _ => EnvFilter::new(default),
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
