fn main() {
    println!("cargo::rerun-if-changed=probes/processes.d");
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "usdt-probes")]
    {
        // Generates $OUT_DIR/processes.rs containing
        // `pub(crate) mod processes { macro_rules! worker__spawn {..} .. }`.
        if let Err(e) = usdt::Builder::new("probes/processes.d").build() {
            panic!("usdt: failed to compile probes/processes.d: {e}");
        }
        // Linux + rust-lld (the default linker of x86_64-unknown-linux-gnu since
        // Rust 1.90): lld lays out the RELRO and .data segments so that the file
        // page holding the `.probes` semaphores is mapped twice at exec time.
        // The kernel's uprobe ref_ctr logic (what bpftrace uses to flip the
        // semaphores) then bumps the alias in the RELRO segment for processes
        // started AFTER the tracer attached (`bpftrace -c`, attach-then-start),
        // so those probes never fire. Page-aligning every segment in the file
        // removes the aliasing. (GNU ld ignores this -z option with a warning.)
        // NOTE: rustc-link-arg only applies to this package's own targets.
        if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
            println!("cargo::rustc-link-arg=-Wl,-z,separate-loadable-segments");
        }
    }
}
