// A C entry point for librados' `list_snaps` operation, which only the C++ API offers
// (librados.h has no equivalent). librbd rebuilds and checks object maps from it: which
// clones of a data object exist and the newest snapshot the head has seen (snap_set.seq)
// tell whether the object was written since the image's newest snapshot.
//
// Built by daemon/build.rs with the `ceph` feature; the Rust side is snaps.rs. Everything
// here is plain data behind an opaque pointer, so no C++ type crosses the boundary and no
// exception escapes: every entry point catches.

#include <rados/librados.hpp>

#include <cerrno>
#include <cstdint>
#include <new>

extern "C" {

typedef void (*rnbd_done_t)(void *arg, int r);

struct rnbd_snaps {
  librados::snap_set_t set;
  int prval = 0;
  librados::AioCompletion *comp = nullptr;
  rnbd_done_t done = nullptr;
  void *arg = nullptr;
};

rnbd_snaps *rnbd_snaps_new() { return new (std::nothrow) rnbd_snaps(); }

void rnbd_snaps_free(rnbd_snaps *s) { delete s; }

static void rnbd_on_complete(librados::completion_t, void *p) {
  rnbd_snaps *s = static_cast<rnbd_snaps *>(p);
  int r = s->comp->get_return_value();
  if (r >= 0 && s->prval < 0) {
    r = s->prval;
  }
  // Ours is the only user reference; the operation holds its own for this callback.
  s->comp->release();
  s->comp = nullptr;
  // After `done` the Rust side owns (and may free) `s`: touch nothing after it.
  s->done(s->arg, r);
}

// Starts list_snaps of `oid` through `io`, which must read at LIBRADOS_SNAP_DIR (as
// librbd's C_VerifyObjectCallback does: at the head an object removed since a snapshot
// answers ENOENT though its clones live on). On success (0) `done(arg, r)` runs exactly
// once, on a librados thread, with r < 0 on failure (-ENOENT: no such object at all); on
// failure (< 0) it never runs.
int rnbd_aio_list_snaps(rados_ioctx_t io, const char *oid, rnbd_snaps *s, rnbd_done_t done,
                        void *arg) {
  try {
    librados::IoCtx ctx;
    // Shares (and references) the caller's handle; its destructor drops that reference.
    librados::IoCtx::from_rados_ioctx_t(io, ctx);
    s->done = done;
    s->arg = arg;
    s->prval = 0;
    s->comp = librados::Rados::aio_create_completion(s, rnbd_on_complete);
    if (s->comp == nullptr) {
      return -ENOMEM;
    }
    librados::ObjectReadOperation op;
    op.list_snaps(&s->set, &s->prval);
    // The operation's steps and output pointers are moved into the request here, so `op`
    // may go; `s` stays alive until the callback.
    int r = ctx.aio_operate(oid, s->comp, &op, nullptr);
    if (r < 0) {
      s->comp->release();
      s->comp = nullptr;
    }
    return r;
  } catch (const std::bad_alloc &) {
    return -ENOMEM;
  } catch (...) {
    return -EIO;
  }
}

// The snap set, read after a successful completion.
uint64_t rnbd_snaps_seq(const rnbd_snaps *s) { return s->set.seq; }

size_t rnbd_snaps_clones(const rnbd_snaps *s) { return s->set.clones.size(); }

// Clone `i`: its id (LIBRADOS_SNAP_HEAD for the head) and the snapshots it belongs to,
// ascending (`*snaps` stays valid until rnbd_snaps_free).
uint64_t rnbd_snaps_clone(const rnbd_snaps *s, size_t i, const uint64_t **snaps,
                          size_t *nsnaps) {
  const librados::clone_info_t &c = s->set.clones[i];
  *snaps = c.snaps.data();
  *nsnaps = c.snaps.size();
  return c.cloneid;
}

// Clone `i`'s size in bytes; `*noverlap`: how many ranges it shares with the next newer
// version (what was not written since it was made), read with rnbd_snaps_overlap.
uint64_t rnbd_snaps_clone_size(const rnbd_snaps *s, size_t i, size_t *noverlap) {
  const librados::clone_info_t &c = s->set.clones[i];
  *noverlap = c.overlap.size();
  return c.size;
}

// Overlap range `j` of clone `i`: offset and length.
void rnbd_snaps_overlap(const rnbd_snaps *s, size_t i, size_t j, uint64_t *off, uint64_t *len) {
  const std::pair<uint64_t, uint64_t> &p = s->set.clones[i].overlap[j];
  *off = p.first;
  *len = p.second;
}

}  // extern "C"
