// A data read whose reply librados hands over as it arrived, instead of copying it. The
// C API's rados_aio_read (and rados_read_op_read) give the Objecter our buffer to fill:
// when the reply is as long as that buffer, the Objecter copies it in on the messenger
// thread (Objecter::handle_osd_op_reply, "copying resulting ... into existing buffer"),
// a 1 MiB memmove per 1 MiB read, seen in the guest's 1 MiB read profile against
// rbd-nbd, which hands librbd an empty bufferlist. The C++ API takes a bufferlist too:
// an empty one is given the reply's own buffers (claim_data, no copy), and the Rust side
// (read.rs) keeps this object alive as the NBD reply's bytes.
//
// Built by daemon/build.rs with the `ceph` feature; the asynchronous call and its
// callback are shim.hpp's.

#include "shim.hpp"

#include <cstdint>

struct rnbd_read : rnbd_aio {
  librados::bufferlist bl;
  const char *data = nullptr;

  int finish() override {
    // One buffer as the messenger received it: c_str() is its address. Should the reply
    // come in pieces, c_str() joins them (a copy only then).
    if (bl.length() > 0) {
      data = bl.c_str();
    }
    return 0;
  }
};

extern "C" {

rnbd_read *rnbd_read_new() { return new (std::nothrow) rnbd_read(); }

void rnbd_read_free(rnbd_read *s) { delete s; }

// Starts a read of up to `len` (> 0) bytes at `off` of `oid` through `io` (at the
// handle's read snapshot); calls back as rnbd_aio_start says.
int rnbd_aio_read(rados_ioctx_t io, const char *oid, uint64_t off, uint64_t len,
                  rnbd_read *s, rnbd_done_t done, void *arg) {
  if (len == 0) {
    // librados reads a length of 0 as "to the end of the object".
    return -EINVAL;
  }
  try {
    librados::ObjectReadOperation op;
    op.read(off, len, &s->bl, &s->prval);
    return rnbd_aio_start(io, oid, s, &op, done, arg);
  } catch (const std::bad_alloc &) {
    return -ENOMEM;
  } catch (...) {
    return -EIO;
  }
}

// After a successful completion: the bytes read (valid until rnbd_read_free), and how
// many (fewer than asked for at the object's end).
const char *rnbd_read_data(const rnbd_read *s) { return s->data; }

size_t rnbd_read_len(const rnbd_read *s) { return s->bl.length(); }

}  // extern "C"
