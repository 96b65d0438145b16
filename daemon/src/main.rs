//! `rados-nbd`: serve RBD format-2 images over NBD with the object map in memory.

mod error;
mod spec;
mod store;

fn main() {
    eprintln!("rados-nbd: not built yet");
    std::process::exit(1);
}
