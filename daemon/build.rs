//! With the `ceph` feature, builds our C++ shims for librados' `list_snaps`, `sparse_read`,
//! writes that send the caller's buffer and reads that keep the reply's, without a copy
//! (src/store/ceph/{list_snaps,sparse_read,write,read}.cc, sharing shim.hpp; the C API has
//! no equivalent), which need librados' C++ headers (Debian: libradospp-dev).

fn main() {
    println!("cargo:rerun-if-changed=src/store/ceph/list_snaps.cc");
    println!("cargo:rerun-if-changed=src/store/ceph/sparse_read.cc");
    println!("cargo:rerun-if-changed=src/store/ceph/write.cc");
    println!("cargo:rerun-if-changed=src/store/ceph/read.cc");
    println!("cargo:rerun-if-changed=src/store/ceph/shim.hpp");
    if std::env::var_os("CARGO_FEATURE_CEPH").is_none() {
        return;
    }
    let r = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/store/ceph/list_snaps.cc")
        .file("src/store/ceph/sparse_read.cc")
        .file("src/store/ceph/write.cc")
        .file("src/store/ceph/read.cc")
        .warnings(true)
        .try_compile("rados_nbd_list_snaps");
    if let Err(e) = r {
        eprintln!(
            "building the `ceph` feature's C++ shims src/store/ceph/*.cc failed: {e}\n\
             it needs a C++ compiler and librados' C++ headers <rados/librados.hpp> \
             (Debian: apt-get install g++ libradospp-dev)"
        );
        std::process::exit(1);
    }
    // The shim calls librados' C++ API: link it after the static library (cc already
    // asked for the C++ runtime).
    println!("cargo:rustc-link-lib=rados");
}
