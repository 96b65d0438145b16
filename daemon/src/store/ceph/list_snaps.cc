// A C entry point for librados' `list_snaps` operation, which only the C++ API offers
// (librados.h has no equivalent). librbd rebuilds and checks object maps from it: which
// clones of a data object exist and the newest snapshot the head has seen (snap_set.seq)
// tell whether the object was written since the image's newest snapshot.
//
// Built by daemon/build.rs with the `ceph` feature; the Rust side is snaps.rs. The
// asynchronous call and its callback are shim.hpp's.

#include "shim.hpp"

#include <cstdint>

struct rnbd_snaps : rnbd_aio {
  librados::snap_set_t set;
};

extern "C" {

rnbd_snaps *rnbd_snaps_new() { return new (std::nothrow) rnbd_snaps(); }

void rnbd_snaps_free(rnbd_snaps *s) { delete s; }

// Starts list_snaps of `oid` through `io`, which must read at LIBRADOS_SNAP_DIR (as
// librbd's C_VerifyObjectCallback does: at the head an object removed since a snapshot
// answers ENOENT though its clones live on); calls back as rnbd_aio_start says (-ENOENT:
// no such object at all).
int rnbd_aio_list_snaps(rados_ioctx_t io, const char *oid, rnbd_snaps *s, rnbd_done_t done,
                        void *arg) {
  try {
    librados::ObjectReadOperation op;
    op.list_snaps(&s->set, &s->prval);
    return rnbd_aio_start(io, oid, s, &op, done, arg);
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
