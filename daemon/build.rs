//! With the `ceph` feature, builds our C++ shim for librados' `list_snaps`
//! (src/store/ceph/list_snaps.cc; the C API has no equivalent), which needs librados' C++
//! headers (Debian: libradospp-dev).

fn main() {
    println!("cargo:rerun-if-changed=src/store/ceph/list_snaps.cc");
    if std::env::var_os("CARGO_FEATURE_CEPH").is_none() {
        return;
    }
    let r = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/store/ceph/list_snaps.cc")
        .warnings(true)
        .try_compile("rados_nbd_list_snaps");
    if let Err(e) = r {
        eprintln!(
            "building the `ceph` feature's C++ shim src/store/ceph/list_snaps.cc failed: {e}\n\
             it needs a C++ compiler and librados' C++ headers <rados/librados.hpp> \
             (Debian: apt-get install g++ libradospp-dev)"
        );
        std::process::exit(1);
    }
    // The shim calls librados' C++ API: link it after the static library (cc already
    // asked for the C++ runtime).
    println!("cargo:rustc-link-lib=rados");
}
