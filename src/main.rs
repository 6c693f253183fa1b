fn main() {
    std::process::exit(cgtproxy::cli::main());
}
