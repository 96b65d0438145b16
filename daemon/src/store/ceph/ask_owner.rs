//! The asking side of the lock owner's requests, as librbd's ImageWatcher::
//! notify_async_request: how `rados-nbd snap create|rm`, `flatten` and `resize` reach an
//! image that another process (another rados-nbd, or a librbd client) serves. A watch of
//! our own on the header, so the owner's AsyncProgress and AsyncComplete reach us; the
//! request, with an AsyncRequestId naming that watch; the owner's ack (0: started, or its
//! errno); then its AsyncComplete, waited for as long as progress keeps coming.

use super::cls::AsyncRequestId;
use super::header::header_oid;
use super::owner_msgs::{self, OwnerNews};
use super::rados::{rados_error, WatchEvent};
use super::store::CephStore;
use super::NOTIFY_TIMEOUT_MS;
use crate::error::{Error, ErrorKind, Result};
use crate::spec::ImageSpec;
use crate::store::OwnerAction;
use tokio::sync::mpsc;

/// How long we wait without a word (progress or completion) from the owner: librbd's
/// `rbd_request_timed_out_seconds` is 30; an owner of ours sends progress every 10 s.
const SILENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// The request that asks `spec`'s owner to do `action`, given the request's id; refused
/// with a message for an action no owner is asked for by a request: the lock (asked for
/// by opening the image) and group snapshots (`rbd group snap`'s own).
pub(super) fn request_builder<'a>(
    spec: &ImageSpec,
    action: &'a OwnerAction,
) -> Result<impl Fn(AsyncRequestId) -> Vec<u8> + 'a> {
    let probe = AsyncRequestId {
        gid: 0,
        handle: 0,
        request_id: 0,
    };
    if owner_msgs::request_for(probe, action).is_none() {
        let msg = if *action == OwnerAction::ReleaseLock {
            format!(
                "the lock of {spec} is asked for by opening it (--wait-for-lock), not by a request"
            )
        } else {
            format!(
                "{} of {spec} is not a request to its owner",
                action.describe()
            )
        };
        return Err(Error::new(ErrorKind::InvalidInput, msg));
    }
    // Some for every id once it is for one: the id only fills fields.
    Ok(move |id| owner_msgs::request_for(id, action).unwrap_or_default())
}

/// Sends the request `build(id)` (`what`, for messages) to the holder of `spec`'s lock and
/// waits for the outcome. `on_progress(done, total)` as the owner reports it.
pub(super) async fn ask_owner(
    store: &CephStore,
    spec: &ImageSpec,
    what: &str,
    build: impl Fn(AsyncRequestId) -> Vec<u8>,
    on_progress: impl FnMut(u64, u64),
) -> Result<()> {
    let io = store.pool(&spec.pool, &spec.namespace).await?;
    let id = store.image_id(&io, spec).await?;
    ask_owner_of(&io, &id, spec, what, build, on_progress).await
}

/// `ask_owner` for image `id` of `io`'s pool and namespace, known by id (a clone's parent,
/// which may be in the image trash, where its name no longer leads to it).
pub(super) async fn ask_owner_of(
    io: &std::sync::Arc<super::rados::IoCtx>,
    id: &str,
    spec: &ImageSpec,
    what: &str,
    build: impl Fn(AsyncRequestId) -> Vec<u8>,
    mut on_progress: impl FnMut(u64, u64),
) -> Result<()> {
    let oid = header_oid(id);
    let ctx = |e: Error| e.context(format!("asking the holder of {spec} to {what}"));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watch = io
        .watch(
            &oid,
            Box::new(|_, _| super::rados::Reply::Now(Vec::new())),
            tx,
        )
        .await
        .map_err(ctx)?;
    let mut req = AsyncRequestId {
        gid: io.cluster().instance_id(),
        handle: watch.cookie,
        request_id: 0,
    };
    // The owner may hand the lock over mid-way (another client asked for it): it stops
    // and answers ERESTART, and the request goes again to the new owner, as librbd's
    // asker sends it (objects done so far stay done).
    let mut restarts = 0;
    let mut same_again = false;
    let r = loop {
        if !same_again {
            req.request_id += 1;
        }
        same_again = false;
        // Once restarted, the new holder may be a passing client that closes the image
        // with our request in hand: librbd's asker waits rbd_request_timed_out_seconds
        // (30) for it, then starts again.
        let silence = if restarts == 0 { SILENCE } else { SILENCE / 2 };
        let r = ask_once(
            io,
            &oid,
            spec,
            what,
            &build,
            req,
            &mut rx,
            &mut on_progress,
            silence,
        )
        .await;
        match r {
            Err(e) if e.kind == ErrorKind::Interrupted && restarts < MAX_RESTARTS => {
                restarts += 1;
                tracing::info!("{e}: asking again");
            }
            // Silence: the holder may have closed the image with our request in hand.
            // Sent again under the same id, as librbd's asker does (a holder still at it
            // answers that it is; another starts it).
            Err(e) if e.kind == ErrorKind::TimedOut && restarts < MAX_RESTARTS => {
                restarts += 1;
                same_again = true;
                tracing::info!("{e}: asking again");
            }
            // After a hand-over the lock may be free, or its new holder gone before it
            // answered: the caller starts again from the top (here, or with whoever
            // holds the lock by then).
            Err(e)
                if restarts > 0
                    && !matches!(e.kind, ErrorKind::InvalidInput | ErrorKind::NotFound) =>
            {
                break Err(Error::new(
                    ErrorKind::Interrupted,
                    format!(
                        "the holder of {spec} handed its lock over during the request to \
                         {what}, and the request could not go on with a new holder ({}): \
                         run the command again",
                        e.message
                    ),
                ));
            }
            r => break r,
        }
    };
    let _ = io.unwatch(watch).await;
    r
}

/// How many times a request interrupted by a hand-over goes again to the new owner.
const MAX_RESTARTS: u32 = 10;

/// One round of `ask_owner`: the request, the owner's ack, its progress and completion.
/// An owner that stopped for a hand-over answers ERESTART: `ErrorKind::Interrupted`.
#[allow(clippy::too_many_arguments)]
async fn ask_once(
    io: &super::rados::IoCtx,
    oid: &str,
    spec: &ImageSpec,
    what: &str,
    build: &impl Fn(AsyncRequestId) -> Vec<u8>,
    req: AsyncRequestId,
    rx: &mut mpsc::UnboundedReceiver<WatchEvent>,
    on_progress: &mut impl FnMut(u64, u64),
    silence: std::time::Duration,
) -> Result<()> {
    let ctx = |e: Error| e.context(format!("asking the holder of {spec} to {what}"));
    let reply = io
        .notify(oid, &build(req), NOTIFY_TIMEOUT_MS)
        .await
        .map_err(ctx)?;
    // Every watcher acks; only the lock owner answers with a ResponseMessage.
    let answer = reply
        .acks
        .iter()
        .filter(|a| !a.2.is_empty())
        .find_map(|a| owner_msgs::response_result(&a.2).ok());
    match answer {
        None => {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "image {spec} is in use, but no lock owner answered the request to {what} \
                     (it may have just closed the image: try again)"
                ),
            ))
        }
        Some(r) if r < 0 => return Err(refused(spec, what, r)),
        Some(_) => {}
    }
    loop {
        let ev = match tokio::time::timeout(silence, rx.recv()).await {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the holder of {spec} took the request to {what} but has said nothing \
                         for {} s; it may still complete",
                        silence.as_secs()
                    ),
                ))
            }
            Ok(None) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("waiting for the holder of {spec} to {what}: our watch ended"),
                ))
            }
            Ok(Some(ev)) => ev,
        };
        match ev {
            WatchEvent::Notify { data, .. } => match owner_msgs::owner_news(&data) {
                Some(OwnerNews::Progress { id, offset, total }) if id == req => {
                    on_progress(offset, total)
                }
                Some(OwnerNews::Complete { id, result }) if id == req => {
                    return if result == -libc::ERESTART {
                        Err(Error::new(
                            ErrorKind::Interrupted,
                            format!("the holder of {spec} handed its lock over during the request to {what}"),
                        ))
                    } else if result < 0 {
                        Err(refused(spec, what, result))
                    } else {
                        Ok(())
                    };
                }
                _ => {}
            },
            WatchEvent::Error { err, .. } => {
                return Err(rados_error(
                    &format!("waiting for the holder of {spec} to {what}: header watch lost"),
                    "",
                    err,
                ))
            }
        }
    }
}

/// The holder's errno as an error of ours: the kind librados' errno maps to, and a message
/// that says who refused what.
fn refused(spec: &ImageSpec, what: &str, r: i32) -> Error {
    let e = rados_error("", "", r);
    let why = e
        .message
        .strip_prefix("rados : ")
        .unwrap_or(&e.message)
        .to_string();
    Error::new(
        e.kind,
        format!("image {spec} is in use; the process holding its lock could not {what}: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_an_owner_answers_are_built() {
        let spec: ImageSpec = "rbd/img".parse().unwrap();
        let id = AsyncRequestId {
            gid: 4123,
            handle: 7,
            request_id: 2,
        };
        let rm = OwnerAction::SnapRemove { name: "s1".into() };
        let build = request_builder(&spec, &rm).unwrap();
        assert_eq!(build(id), owner_msgs::request_for(id, &rm).unwrap());
        let e = request_builder(&spec, &OwnerAction::ReleaseLock)
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.to_string().contains("--wait-for-lock"), "{e}");
        let group = OwnerAction::NsSnapRemove {
            name: "g".into(),
            namespace_type: 1,
        };
        let e = request_builder(&spec, &group).err().unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(
            e.to_string()
                .contains("snap rm g of rbd/img is not a request"),
            "{e}"
        );
    }
}
