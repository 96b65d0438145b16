//! `rados-nbd`: serve RBD format-2 images over NBD with the object map in memory.

mod error;
#[allow(dead_code)] // wired into cli.rs as the hidden `generate` subcommand once the CLI lands
mod generate;
// Called by the kernel attach (`map --foreground` under systemd) and `serve`, which land
// separately; until then only the tests use them (remove the allows when they do).
#[allow(dead_code)]
mod notify;
#[allow(dead_code)]
mod socket_activation;
mod spec;
mod store;

fn main() {
    eprintln!("rados-nbd: not built yet");
    std::process::exit(1);
}
