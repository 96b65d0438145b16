// A C entry point for librados' `sparse_read` operation, which only the C++ API offers
// (librados.h has no equivalent). librbd reads an ancestor's objects for a copy-up with
// it: the copy-up then writes only the extents the ancestor's object has allocated, so
// the child's object ends where the last of them ends, not where the read did.
//
// Built by daemon/build.rs with the `ceph` feature; the Rust side is sparse.rs. As in
// list_snaps.cc, everything here is plain data behind an opaque pointer and no exception
// escapes.

#include <rados/librados.hpp>

#include <cerrno>
#include <cstdint>
#include <map>
#include <new>
#include <utility>
#include <vector>

extern "C" {

typedef void (*rnbd_done_t)(void *arg, int r);

struct rnbd_sparse {
  std::map<uint64_t, uint64_t> m;
  std::vector<std::pair<uint64_t, uint64_t>> extents;
  librados::bufferlist bl;
  int prval = 0;
  librados::AioCompletion *comp = nullptr;
  rnbd_done_t done = nullptr;
  void *arg = nullptr;
};

rnbd_sparse *rnbd_sparse_new() { return new (std::nothrow) rnbd_sparse(); }

void rnbd_sparse_free(rnbd_sparse *s) { delete s; }

static void rnbd_sparse_on_complete(librados::completion_t, void *p) {
  rnbd_sparse *s = static_cast<rnbd_sparse *>(p);
  int r = s->comp->get_return_value();
  if (r >= 0 && s->prval < 0) {
    r = s->prval;
  }
  s->comp->release();
  s->comp = nullptr;
  if (r >= 0) {
    try {
      s->extents.assign(s->m.begin(), s->m.end());
    } catch (...) {
      r = -ENOMEM;
    }
  }
  // After `done` the Rust side owns (and may free) `s`: touch nothing after it.
  s->done(s->arg, r);
}

// Starts a sparse read of `len` bytes at `off` of `oid` through `io` (at the handle's read
// snapshot). On success (0) `done(arg, r)` runs exactly once, on a librados thread, with
// r < 0 on failure (-ENOENT: no such object); on failure (< 0) it never runs.
int rnbd_aio_sparse_read(rados_ioctx_t io, const char *oid, uint64_t off, uint64_t len,
                         rnbd_sparse *s, rnbd_done_t done, void *arg) {
  try {
    librados::IoCtx ctx;
    librados::IoCtx::from_rados_ioctx_t(io, ctx);
    s->done = done;
    s->arg = arg;
    s->prval = 0;
    s->comp = librados::Rados::aio_create_completion(s, rnbd_sparse_on_complete);
    if (s->comp == nullptr) {
      return -ENOMEM;
    }
    librados::ObjectReadOperation op;
    op.sparse_read(off, len, &s->m, &s->bl, &s->prval);
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

// After a successful completion: the extents (offset, length within the object,
// ascending), and their bytes one after the other.
size_t rnbd_sparse_extents(const rnbd_sparse *s) { return s->extents.size(); }

void rnbd_sparse_extent(const rnbd_sparse *s, size_t i, uint64_t *off, uint64_t *len) {
  *off = s->extents[i].first;
  *len = s->extents[i].second;
}

size_t rnbd_sparse_data_len(const rnbd_sparse *s) { return s->bl.length(); }

// Copies the bytes into `out` (rnbd_sparse_data_len of them).
void rnbd_sparse_copy_data(const rnbd_sparse *s, char *out) {
  s->bl.begin().copy(s->bl.length(), out);
}

}  // extern "C"
