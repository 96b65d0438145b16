// A C entry point for librados' `sparse_read` operation, which only the C++ API offers
// (librados.h has no equivalent). librbd reads an ancestor's objects for a copy-up with
// it: the copy-up then writes only the extents the ancestor's object has allocated, so
// the child's object ends where the last of them ends, not where the read did.
//
// Built by daemon/build.rs with the `ceph` feature; the Rust side is sparse.rs. The
// asynchronous call and its callback are shim.hpp's.

#include "shim.hpp"

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

struct rnbd_sparse : rnbd_aio {
  std::map<uint64_t, uint64_t> m;
  std::vector<std::pair<uint64_t, uint64_t>> extents;
  librados::bufferlist bl;

  int finish() override {
    extents.assign(m.begin(), m.end());
    return 0;
  }
};

extern "C" {

rnbd_sparse *rnbd_sparse_new() { return new (std::nothrow) rnbd_sparse(); }

void rnbd_sparse_free(rnbd_sparse *s) { delete s; }

// Starts a sparse read of `len` bytes at `off` of `oid` through `io` (at the handle's read
// snapshot); calls back as rnbd_aio_start says.
int rnbd_aio_sparse_read(rados_ioctx_t io, const char *oid, uint64_t off, uint64_t len,
                         rnbd_sparse *s, rnbd_done_t done, void *arg) {
  try {
    librados::ObjectReadOperation op;
    op.sparse_read(off, len, &s->m, &s->bl, &s->prval);
    return rnbd_aio_start(io, oid, s, &op, done, arg);
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
