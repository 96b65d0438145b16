// A write whose bytes librados sends from the caller's buffer instead of a copy. The C
// API's rados_write_op_write copies every byte into a buffer of its own before sending
// (a 1 MiB write: a 1 MiB memcpy per request, measured as the gap to rbd-nbd on 1 MiB
// writes, which hands librados its buffers as they are); the C++ API takes a bufferlist,
// and a bufferlist can point at memory it does not own (`static_from_mem`).
//
// Such memory must outlive every reference librados keeps to it, which is not always over
// when the write completes: the message may still sit in a connection's queue after an
// operation was cancelled (an osd op timeout, a deleted pool). librados' installed
// headers give no way to be told when the last reference goes (its deleter type is
// not defined there), but they do give the reference count: `rnbd_write_released` says
// whether only our own reference is left. The Rust side (write.rs) frees the buffer only
// then, and otherwise keeps it until a later look says so.
//
// Built by daemon/build.rs with the `ceph` feature; the asynchronous call and its
// callback are shim.hpp's.

#include "shim.hpp"

#include <cstdint>
#include <vector>

struct rnbd_write : rnbd_aio {
  // Our references to the caller's bytes (static buffers: nothing frees them here), one
  // bufferlist per contiguous run of extents.
  std::vector<librados::bufferlist> bls;
};

extern "C" {

rnbd_write *rnbd_write_new() { return new (std::nothrow) rnbd_write(); }

void rnbd_write_free(rnbd_write *s) { delete s; }

// Starts, on `oid` through `io` (with its write snapshot context), what the C API's
// set_alloc_hint(hint, hint) followed by a write(off, buf, len) per extent does, as ONE
// operation (applied atomically), sending the `n` buffers themselves, which must stay
// valid and unchanged until rnbd_write_released(s) is true. Extents are sorted by offset
// and do not overlap; each run of contiguous ones becomes one write of a bufferlist that
// chains their buffers (as librbd's scheduler appends merged writes' bufferlists).
// Calls back as rnbd_aio_start says.
int rnbd_aio_write_nocopy(rados_ioctx_t io, const char *oid, size_t n, const uint64_t *offs,
                          const char *const *bufs, const size_t *lens, uint64_t hint,
                          rnbd_write *s, rnbd_done_t done, void *arg) {
  try {
    librados::ObjectWriteOperation op;
    op.set_alloc_hint(hint, hint);
    std::vector<uint64_t> starts;
    uint64_t end = 0;
    for (size_t i = 0; i < n; i++) {
      auto b = librados::bufferlist::static_from_mem(const_cast<char *>(bufs[i]), lens[i]);
      if (!s->bls.empty() && offs[i] == end) {
        s->bls.back().append(b);
      } else {
        s->bls.push_back(std::move(b));
        starts.push_back(offs[i]);
      }
      end = offs[i] + lens[i];
    }
    for (size_t j = 0; j < s->bls.size(); j++) {
      op.write(starts[j], s->bls[j]);
    }
    return rnbd_aio_start(io, oid, s, &op, done, arg);
  } catch (const std::bad_alloc &) {
    return -ENOMEM;
  } catch (...) {
    return -EIO;
  }
}

// 1 when librados holds no reference to the bytes any more (ours is the only one left),
// so they may be freed; 0 while it still does.
int rnbd_write_released(const rnbd_write *s) {
  for (const auto &bl : s->bls) {
    for (const auto &p : bl.buffers()) {
      if (p.raw_nref() > 1) {
        return 0;
      }
    }
  }
  return 1;
}

}  // extern "C"
