//! Links the stack unwinder (libgcc's) into the `procpool` program rather than loading
//! `libgcc_s.so.1` at each start.
//!
//! Spawn and forkserver re-execute this program for every worker (or for the server), so
//! what it does before `main` is part of every pool's start. A dynamically linked Rust
//! program on a `*-linux-gnu` target loads `libgcc_s` only for the unwinder (panics and
//! backtraces); loading it costs a few more system calls and page faults, and its start-up
//! code asks the CPU for its features with `cpuid`, an instruction that a virtual machine
//! traps (about 8 us each on the machine of BENCHMARKS.md). Linked in from `libgcc_eh.a`,
//! the unwinder works the same (it finds every loaded object's unwind tables through
//! `dl_iterate_phdr`) and the program starts about 0.1-0.2 ms sooner there. The guide
//! ("Start methods") tells users how to do the same for their own programs.
//!
//! Nothing to do for a statically linked build (`+crt-static`, which links `libgcc_eh`
//! already) or other targets.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let static_crt = var("CARGO_CFG_TARGET_FEATURE")
        .split(',')
        .any(|f| f == "crt-static");
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu" && !static_crt
    {
        println!("cargo::rustc-link-lib=static=gcc_eh");
    }
}
