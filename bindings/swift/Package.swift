// swift-tools-version:5.9
// The Swift package over libldm's C ABI (include/ldm.h). Build the library first
// (cargo build --release -p ldm-capi, or scripts/install-capi.sh PREFIX); see README.md.
import PackageDescription

let package = Package(
    name: "Ldm",
    platforms: [.macOS(.v12), .iOS(.v15)],
    products: [
        .library(name: "Ldm", targets: ["Ldm"]),
    ],
    targets: [
        // The C module: include/ldm.h of this repository, linked with -lldm. When pkg-config
        // finds ldm.pc (scripts/install-capi.sh), its -L flag locates the library.
        .systemLibrary(name: "CLdm", path: "Sources/CLdm", pkgConfig: "ldm"),
        .target(name: "Ldm", dependencies: ["CLdm"]),
        .testTarget(name: "LdmTests", dependencies: ["Ldm"]),
    ]
)
