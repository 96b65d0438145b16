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

// On an erasure-coded pool the OSD (Ceph 16) answers a sparse read that starts at or past
// the object's end with the extent map alone, without the data part a replicated pool
// sends; librados' C++ decoder then fails it with EIO (librbd, through neorados, reads it
// as no extents). So the read goes with a `stat` of the object in the same operation, and
// an EIO there is taken for "no extents" only when the read starts at or past the end.
struct rnbd_sparse : rnbd_aio {
  std::map<uint64_t, uint64_t> m;
  std::vector<std::pair<uint64_t, uint64_t>> extents;
  librados::bufferlist bl;
  uint64_t off = 0;
  int read_prval = 0;
  uint64_t size = 0;
  int stat_prval = 0;

  int finish() override {
    if (read_prval < 0) {
      if (read_prval == -EIO && stat_prval == 0 && off >= size) {
        m.clear();
        bl.clear();
      } else {
        return read_prval;
      }
    }
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
    s->off = off;
    op.stat(&s->size, nullptr, &s->stat_prval);
    op.sparse_read(off, len, &s->m, &s->bl, &s->read_prval);
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
