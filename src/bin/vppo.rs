//! The `vppo` command line (SPEC section 9).
fn main() {}
