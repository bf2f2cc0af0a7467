fn main() {
    std::process::exit(nox::cli::main());
}
