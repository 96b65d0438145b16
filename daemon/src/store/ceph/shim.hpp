// What the C++ shims (list_snaps.cc, sparse_read.cc, write.cc) share: starting one
// asynchronous operation through the caller's C handle and calling the Rust side back once (the
// Rust side is shim.rs). Everything crossing the boundary is plain data behind an opaque
// pointer, and no exception escapes: every entry point catches.

#pragma once

#include <rados/librados.hpp>

#include <cerrno>
#include <new>
#include <type_traits>

extern "C" typedef void (*rnbd_done_t)(void *arg, int r);

// One call in flight: the operation's own return code, the completion, the callback.
// Each shim's result object derives from it.
struct rnbd_aio {
  int prval = 0;
  librados::AioCompletion *comp = nullptr;
  rnbd_done_t done = nullptr;
  void *arg = nullptr;

  virtual ~rnbd_aio() = default;
  // Runs after a successful operation, before the callback, on a librados thread: turns
  // the result into what the accessors read. Returns 0 or a negative errno.
  virtual int finish() { return 0; }
};

inline void rnbd_aio_on_complete(librados::completion_t, void *p) {
  rnbd_aio *a = static_cast<rnbd_aio *>(p);
  int r = a->comp->get_return_value();
  if (r >= 0 && a->prval < 0) {
    r = a->prval;
  }
  // Ours is the only user reference; the operation holds its own for this callback.
  a->comp->release();
  a->comp = nullptr;
  if (r >= 0) {
    try {
      r = a->finish();
    } catch (...) {
      r = -ENOMEM;
    }
  }
  // After `done` the Rust side owns (and may free) `a`: touch nothing after it.
  a->done(a->arg, r);
}

// Starts `op` (whose output pointers point into `a`) on `oid` through `io`: a read at the
// handle's read snapshot, a write with its write snapshot context. On success (0)
// `done(arg, r)` runs exactly once, on a librados thread, with r < 0 on failure (-ENOENT:
// no such object); on failure (< 0) it never runs.
template <typename Op>
inline int rnbd_aio_start(rados_ioctx_t io, const char *oid, rnbd_aio *a, Op *op,
                          rnbd_done_t done, void *arg) {
  try {
    librados::IoCtx ctx;
    // Shares (and references) the caller's handle; its destructor drops that reference.
    librados::IoCtx::from_rados_ioctx_t(io, ctx);
    a->done = done;
    a->arg = arg;
    a->comp = librados::Rados::aio_create_completion(a, rnbd_aio_on_complete);
    if (a->comp == nullptr) {
      return -ENOMEM;
    }
    // The operation's steps and output pointers are moved into the request here, so `op`
    // may go; `a` stays alive until the callback.
    int r;
    if constexpr (std::is_same_v<Op, librados::ObjectReadOperation>) {
      r = ctx.aio_operate(oid, a->comp, op, nullptr);
    } else {
      r = ctx.aio_operate(oid, a->comp, op);
    }
    if (r < 0) {
      a->comp->release();
      a->comp = nullptr;
    }
    return r;
  } catch (const std::bad_alloc &) {
    return -ENOMEM;
  } catch (...) {
    return -EIO;
  }
}
