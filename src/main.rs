fn main() {
    // A VM's jail intermediate re-executes nox to wait for qemu: nothing
    // else of nox runs in it.
    nox::vmm::jail::child::waiter();
    std::process::exit(nox::cli::main());
}
