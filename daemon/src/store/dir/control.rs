//! The control socket, this store's stand-in for a Ceph header watch: the holder of an
//! image's exclusive lock takes requests (resize, snapshot) from other processes through it.

use super::{lock, Inner};
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::{OwnerAction, OwnerRequest, QuiesceMode};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

pub(super) struct ControlSocket {
    path: PathBuf,
    task: tokio::task::AbortHandle,
}

impl ControlSocket {
    /// Stops taking requests and removes the socket file.
    pub(super) fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Inner {
    /// Starts taking requests on the control socket: the exclusive lock holder only, once.
    pub(super) fn take_requests(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<OwnerRequest>> {
        if !self.exclusive || self.closed.load(Ordering::Acquire) {
            return None;
        }
        let mut ctl = lock(&self.ctl);
        if ctl.is_some() {
            return None;
        }
        let path = control_path(&self.pool_dir, &self.id);
        // We hold the exclusive lock: a socket file left here is a dead holder's.
        let _ = std::fs::remove_file(&path);
        let bound = std::os::unix::net::UnixListener::bind(&path).and_then(|l| {
            // Whoever may resize the image may also write it: the owner only.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        });
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "{}: no control socket, so `rados-nbd resize` cannot reach this process: {e}",
                    path.display()
                );
                return None;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(serve_control(listener, tx)).abort_handle();
        *ctl = Some(ControlSocket { path, task });
        Some(rx)
    }
}

/// Where the holder of image `id`'s exclusive lock listens for requests.
fn control_path(pool_dir: &Path, id: &str) -> PathBuf {
    pool_dir.join(format!("rbd_header.{id}.ctl"))
}

/// The control line's word for a quiesce mode (none for the default).
fn quiesce_word(m: QuiesceMode) -> &'static str {
    match m {
        QuiesceMode::Run => "",
        QuiesceMode::Skip => " skip-quiesce",
        QuiesceMode::IgnoreError => " ignore-quiesce-error",
    }
}

/// The longest request line taken.
const MAX_LINE: u64 = 1024;

/// A name as one word of a request line: `%`, white space and control characters
/// percent-encoded, byte by byte (names made only of letters, digits and `-_.+:`, all
/// that earlier versions took, are their own word, so either side may be older).
fn word(name: &str) -> String {
    crate::spec::one_word(name, &[])
}

/// The name a [`word`] stands for.
fn unword(w: &str) -> std::result::Result<String, String> {
    let bad = || format!("bad name {w:?}");
    let mut bytes = Vec::with_capacity(w.len());
    let mut rest = w.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = tail.get(..2).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

/// The control socket's protocol: one request line, one answer line.
/// `resize SIZE 0|1` (1: shrinking allowed), `snap-create NAME [skip-quiesce|
/// ignore-quiesce-error]`, `snap-rm NAME`, `snap-protect NAME`, `snap-unprotect NAME`,
/// `snap-rename ID NEW-NAME`, `rename NEW-NAME`, `flatten`, `object-map-rebuild`, `sparsify BYTES` or
/// `features MASK 0|1` (1: enable) → `ok` or `error MESSAGE`. NAME: see [`word`].
fn parse_control_request(line: &str) -> std::result::Result<OwnerAction, String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w[..] {
        ["snap-create", name] => Ok(OwnerAction::SnapCreate {
            name: unword(name)?,
            quiesce: QuiesceMode::Run,
        }),
        ["snap-create", name, mode] => Ok(OwnerAction::SnapCreate {
            name: unword(name)?,
            quiesce: match mode {
                "skip-quiesce" => QuiesceMode::Skip,
                "ignore-quiesce-error" => QuiesceMode::IgnoreError,
                _ => return Err(format!("bad quiesce mode {mode:?}")),
            },
        }),
        ["snap-rm", name] => Ok(OwnerAction::SnapRemove {
            name: unword(name)?,
        }),
        ["snap-protect", name] => Ok(OwnerAction::SnapProtect {
            name: unword(name)?,
            protected: true,
        }),
        ["snap-unprotect", name] => Ok(OwnerAction::SnapProtect {
            name: unword(name)?,
            protected: false,
        }),
        ["snap-rename", snap_id, new_name] => Ok(OwnerAction::SnapRename {
            snap_id: snap_id
                .parse::<u64>()
                .map_err(|_| format!("bad snapshot id {snap_id:?}"))?,
            new_name: unword(new_name)?,
        }),
        ["rename", new_name] => Ok(OwnerAction::Rename {
            new_name: unword(new_name)?,
        }),
        ["flatten"] => Ok(OwnerAction::Flatten),
        ["object-map-rebuild"] => Ok(OwnerAction::RebuildObjectMap),
        ["sparsify", n] => Ok(OwnerAction::Sparsify {
            sparse_size: n
                .parse::<u64>()
                .map_err(|_| format!("bad sparse size {n:?}"))?,
        }),
        ["features", f, on] => Ok(OwnerAction::UpdateFeatures {
            features: f
                .parse::<u64>()
                .map_err(|_| format!("bad features {f:?}"))?,
            enabled: match on {
                "0" => false,
                "1" => true,
                _ => return Err(format!("bad enable flag {on:?}")),
            },
        }),
        ["resize", size, shrink] => {
            let size = size
                .parse::<u64>()
                .map_err(|_| format!("bad size {size:?}"))?;
            let shrink = match shrink {
                "0" => false,
                "1" => true,
                _ => return Err(format!("bad allow-shrink {shrink:?}")),
            };
            Ok(OwnerAction::Resize {
                size,
                allow_shrink: shrink,
            })
        }
        _ => Err(format!("unknown request {:?}", line.trim_end())),
    }
}

async fn serve_control(
    listener: tokio::net::UnixListener,
    tx: tokio::sync::mpsc::UnboundedSender<OwnerRequest>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = conn.into_split();
            let mut line = String::new();
            // A request line is short (a name of 255 bytes is 765 encoded); a client that
            // sends more is not a client of ours.
            let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_LINE));
            if rd.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match parse_control_request(&line) {
                Err(e) => format!("error {e}\n"),
                Ok(r) => {
                    let (done, rx) = tokio::sync::oneshot::channel();
                    // The line protocol has no progress: the asker just waits.
                    let req = OwnerRequest::new(r, done);
                    match tx.send(req) {
                        Err(_) => "error the image is closing\n".to_string(),
                        Ok(()) => match rx.await {
                            Ok(Ok(())) => "ok\n".to_string(),
                            Ok(Err(e)) => format!("error {}\n", e.to_string().replace('\n', " ")),
                            Err(_) => "error the image closed first\n".to_string(),
                        },
                    }
                }
            };
            let _ = wr.write_all(answer.as_bytes()).await;
        });
    }
}

/// `action` as a control line ([`parse_control_request`] reads it back); `None` for
/// `ReleaseLock`, which the directory store's lock has no hand-over for, and group snapshots.
fn control_line(action: &OwnerAction) -> Option<String> {
    // Names take white space (spec.rs): each is one word of the line, through `word`.
    Some(match action {
        OwnerAction::Resize { size, allow_shrink } => {
            format!("resize {size} {}\n", u8::from(*allow_shrink))
        }
        OwnerAction::SnapCreate { name, quiesce } => {
            format!("snap-create {}{}\n", word(name), quiesce_word(*quiesce))
        }
        OwnerAction::SnapRemove { name } => format!("snap-rm {}\n", word(name)),
        OwnerAction::SnapProtect { name, protected } => format!(
            "snap-{}protect {}\n",
            if *protected { "" } else { "un" },
            word(name)
        ),
        OwnerAction::SnapRename { snap_id, new_name } => {
            format!("snap-rename {snap_id} {}\n", word(new_name))
        }
        OwnerAction::Rename { new_name } => format!("rename {}\n", word(new_name)),
        OwnerAction::Flatten => "flatten\n".into(),
        OwnerAction::RebuildObjectMap => "object-map-rebuild\n".into(),
        OwnerAction::Sparsify { sparse_size } => format!("sparsify {sparse_size}\n"),
        OwnerAction::UpdateFeatures { features, enabled } => {
            format!("features {features} {}\n", u8::from(*enabled))
        }
        // Ceph's group snapshots come from `rbd group snap`, never through this socket;
        // this store has no snapshot trash.
        OwnerAction::ReleaseLock
        | OwnerAction::NsSnapCreate { .. }
        | OwnerAction::NsSnapRemove { .. }
        | OwnerAction::TrashSnapRemove { .. } => return None,
    })
}

/// Asks the process holding `spec`'s exclusive lock (a `serve` or `map` daemon), whose
/// image has the id `id`, to perform `action` through its control socket, and waits for
/// the outcome.
pub(super) async fn ask_holder(
    pool_dir: &Path,
    id: &str,
    spec: &ImageSpec,
    action: &OwnerAction,
) -> Result<()> {
    let what = action.describe();
    let Some(line) = control_line(action) else {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what} is not a request the holder of {spec} takes"),
        ));
    };
    send_line(pool_dir, id, spec, &line, &what).await
}

/// Sends one request line to the holder's control socket and waits for its answer.
async fn send_line(
    pool_dir: &Path,
    id: &str,
    spec: &ImageSpec,
    request: &str,
    what: &str,
) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let path = control_path(pool_dir, id);
    let busy = |why: String| {
        Error::new(
            ErrorKind::Busy,
            format!("image {spec} is in use and its holder takes no requests ({why}); stop it and {what} again"),
        )
    };
    let conn = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| busy(format!("{}: {e}", path.display())))?;
    let (rd, mut wr) = conn.into_split();
    wr.write_all(request.as_bytes())
        .await
        .map_err(|e| busy(format!("{}: {e}", path.display())))?;
    let mut line = String::new();
    BufReader::new(rd)
        .read_line(&mut line)
        .await
        .map_err(|e| Error::io(format!("reading the answer on {}", path.display()), e))?;
    match line.trim_end().split_once(' ') {
        _ if line.trim_end() == "ok" => Ok(()),
        Some(("error", msg)) => Err(Error::new(ErrorKind::Io, msg.to_string())),
        _ => Err(Error::new(
            ErrorKind::Io,
            format!(
                "the holder of {spec} ended without an answer (it may have exited); check `rados-nbd info {spec}`"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_reads_back_from_its_line() {
        use OwnerAction as A;
        let all = [
            A::Resize {
                size: 1 << 30,
                allow_shrink: true,
            },
            A::Resize {
                size: 7,
                allow_shrink: false,
            },
            A::SnapCreate {
                name: "a".into(),
                quiesce: QuiesceMode::Skip,
            },
            A::SnapRemove { name: "b".into() },
            // Names as rbd takes them: white space, '%', control characters, Unicode.
            A::SnapCreate {
                name: "s ü 1 \"x\" 100%\t\u{3000}\n".into(),
                quiesce: QuiesceMode::Run,
            },
            A::SnapRemove {
                name: " lead and trail ".into(),
            },
            A::SnapProtect {
                name: "%41".into(),
                protected: false,
            },
            A::Rename {
                new_name: "vm 1 'q\" ü名\t#=%,<&>".into(),
            },
            A::SnapRename {
                snap_id: 9,
                new_name: "c".into(),
            },
            A::SnapProtect {
                name: "d".into(),
                protected: true,
            },
            A::SnapProtect {
                name: "d".into(),
                protected: false,
            },
            A::Flatten,
            A::RebuildObjectMap,
            A::Sparsify { sparse_size: 65536 },
            A::UpdateFeatures {
                features: 0x18,
                enabled: false,
            },
        ];
        for a in all {
            let line = control_line(&a).unwrap();
            assert_eq!(parse_control_request(&line), Ok(a), "{line:?}");
        }
        assert_eq!(control_line(&A::ReleaseLock), None);
        assert!(parse_control_request("features 24 2\n").is_err());
        assert!(parse_control_request("sparsify x\n").is_err());
        // One word, one line, and the longest name fits the line limit.
        let line = control_line(&A::Rename {
            new_name: "\n".repeat(255),
        })
        .unwrap();
        assert_eq!(line.lines().count(), 1);
        assert_eq!(line.split_whitespace().count(), 2);
        assert!(line.len() as u64 <= MAX_LINE, "{}", line.len());
        // Names earlier versions took are their own word; a bad escape is refused.
        assert_eq!(word("a-b_c.d+e:F9"), "a-b_c.d+e:F9");
        for bad in ["rename %4", "rename %zz", "rename %FF"] {
            assert!(parse_control_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snap_create_lines_carry_the_quiesce_mode() {
        for m in [
            QuiesceMode::Run,
            QuiesceMode::Skip,
            QuiesceMode::IgnoreError,
        ] {
            let line = format!("snap-create s1{}\n", quiesce_word(m));
            assert_eq!(
                parse_control_request(&line),
                Ok(OwnerAction::SnapCreate {
                    name: "s1".into(),
                    quiesce: m
                })
            );
        }
        assert!(parse_control_request("snap-create s1 freeze\n").is_err());
        assert!(parse_control_request("snap-create\n").is_err());
        assert_eq!(
            parse_control_request("snap-rm old\n"),
            Ok(OwnerAction::SnapRemove { name: "old".into() })
        );
        assert_eq!(parse_control_request("flatten\n"), Ok(OwnerAction::Flatten));
        assert!(parse_control_request("snap-rm\n").is_err());
        assert!(parse_control_request("flatten now\n").is_err());
        assert_eq!(
            parse_control_request("snap-unprotect a\n"),
            Ok(OwnerAction::SnapProtect {
                name: "a".into(),
                protected: false
            })
        );
        assert_eq!(
            parse_control_request("snap-rename 7 b\n"),
            Ok(OwnerAction::SnapRename {
                snap_id: 7,
                new_name: "b".into()
            })
        );
        assert!(parse_control_request("snap-rename x b\n").is_err());
        assert_eq!(
            parse_control_request("rename b\n"),
            Ok(OwnerAction::Rename {
                new_name: "b".into()
            })
        );
        assert!(parse_control_request("rename\n").is_err());
        assert!(parse_control_request("snap-protect\n").is_err());
    }
}
