#!/usr/bin/env bash
# Installs libldm for C, C++ and Swift users:
#   PREFIX/lib/libldm.so (.dylib on macOS) and libldm.a, PREFIX/include/ldm.h and ldm.hpp,
#   PREFIX/lib/pkgconfig/ldm.pc
# so that `cc app.c $(pkg-config --cflags --libs ldm)` works with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig
# (not needed for /usr/local or /usr).
#
# usage: scripts/install-capi.sh PREFIX
#   Builds the library first (cargo build --release -p ldm-capi). LDM_LIB_DIR=DIR installs the one
#   already built in DIR instead (e.g. target/debug); LDM_INSTALL_STATIC=0 leaves out libldm.a.
set -euo pipefail
prefix=${1:?usage: scripts/install-capi.sh PREFIX}
cd "$(dirname "$0")/.."

lib_dir=${LDM_LIB_DIR:-}
if [ -z "$lib_dir" ]; then
  cargo build --release --locked -p ldm-capi
  lib_dir=target/release
fi

case "$(uname -s)" in
  Darwin)
    dylib=libldm.dylib
    private_libs="-framework CoreFoundation -framework Security -framework SystemConfiguration -liconv -lSystem" ;;
  *)
    dylib=libldm.so
    private_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc" ;;
esac
[ -f "$lib_dir/$dylib" ] || { echo "install-capi.sh: $lib_dir/$dylib is missing (build it with cargo build --release -p ldm-capi)" >&2; exit 1; }

mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
prefix=$(cd "$prefix" && pwd)
cp "$lib_dir/$dylib" "$prefix/lib/"
if [ "${LDM_INSTALL_STATIC:-1}" != 0 ] && [ -f "$lib_dir/libldm.a" ]; then
  cp "$lib_dir/libldm.a" "$prefix/lib/"
fi
if [ "$dylib" = libldm.dylib ] && command -v install_name_tool >/dev/null; then
  install_name_tool -id "$prefix/lib/libldm.dylib" "$prefix/lib/libldm.dylib"
fi
cp include/ldm.h bindings/cpp/ldm.hpp "$prefix/include/"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@PRIVATE_LIBS@|$private_libs|" \
  bindings/ldm.pc.in > "$prefix/lib/pkgconfig/ldm.pc"
echo "installed libldm $version into $prefix (pkg-config file: $prefix/lib/pkgconfig/ldm.pc)"
