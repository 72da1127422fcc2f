//! `etrn-loadtest`: placeholder until the load-testing issue lands. It exits with a clear
//! message rather than pretending to measure anything.
fn main() {
    eprintln!("etrn-loadtest: not implemented yet (see the load-testing issue); use Postfix's smtp-source meanwhile");
    std::process::exit(2);
}
