//! `rados-nbd`: serve RBD format-2 images over NBD with the object map in memory.

mod error;
#[cfg(target_os = "linux")]
mod kernel;
mod spec;
mod store;

use clap::Parser;

/// Temporary command line (kernel commands only) until the main CLI lands.
#[derive(Parser, Debug)]
#[command(name = "rados-nbd")]
struct Cli {
    /// Store URI (dir:PATH); default dir:$RADOS_NBD_STORE or dir:/var/lib/rados-nbd.
    #[arg(long, global = true)]
    store: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    #[command(flatten)]
    Kernel(kernel::cli::KernelCommand),
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RADOS_NBD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let store = cli.store.unwrap_or_else(|| {
        format!(
            "dir:{}",
            std::env::var("RADOS_NBD_STORE").unwrap_or_else(|_| "/var/lib/rados-nbd".into())
        )
    });
    let r = match cli.cmd {
        Cmd::Kernel(k) => kernel::run(k, &store),
    };
    if let Err(e) = r {
        eprintln!("rados-nbd: {e}");
        std::process::exit(1);
    }
}
