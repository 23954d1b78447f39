#![no_std]
// The XDP program is the `tether` binary target (src/main.rs), built for bpfel-unknown-none.
// This empty library lets lb-userspace declare a build-dependency on this crate, so cargo
// reruns its build script when the program's sources change.
