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

struct rnbd_write : rnbd_aio {
  // Our reference to the caller's bytes (a static buffer: nothing frees them here).
  librados::bufferlist bl;
};

extern "C" {

rnbd_write *rnbd_write_new() { return new (std::nothrow) rnbd_write(); }

void rnbd_write_free(rnbd_write *s) { delete s; }

// Starts, on `oid` through `io` (with its write snapshot context), what the C API's
// set_alloc_hint(hint, hint) + write(off, buf, len) does, sending `buf` itself, which must
// stay valid and unchanged until rnbd_write_released(s) is true. Calls back as
// rnbd_aio_start says.
int rnbd_aio_write_nocopy(rados_ioctx_t io, const char *oid, uint64_t off, const char *buf,
                          size_t len, uint64_t hint, rnbd_write *s, rnbd_done_t done,
                          void *arg) {
  try {
    librados::ObjectWriteOperation op;
    op.set_alloc_hint(hint, hint);
    s->bl = librados::bufferlist::static_from_mem(const_cast<char *>(buf), len);
    // Shares the buffer (a reference, not a copy) with the operation.
    op.write(off, s->bl);
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
  if (s->bl.length() == 0) {
    return 1;
  }
  return s->bl.front().raw_nref() <= 1 ? 1 : 0;
}

}  // extern "C"
