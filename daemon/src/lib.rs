//! `rados-nbd`: serve RBD format-2 images over NBD with the object map in memory.
//! The library holds everything; `main.rs` only parses arguments and runs `cli`.

pub mod cli;
pub mod cmd;
pub mod config;
pub mod error;
pub mod generate;
pub mod image;
#[cfg(target_os = "linux")]
pub mod kernel;
pub mod notify;
pub mod parse;
pub mod progress;
pub mod quiesce;
pub mod serve;
pub mod socket_activation;
pub mod spec;
pub mod store;
