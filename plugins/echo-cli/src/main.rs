//! A command plugin (it exports `wasi:cli/run`): prints its arguments and its
//! standard input as one JSON line, then exits with the code given by
//! `--exit N` (default 0). WASI 0.2 reports only success or failure, so the
//! host gets any non-zero code as 1. Used by the tests to check how command
//! plugins run.

use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut stdin = String::new();
    std::io::stdin()
        .read_to_string(&mut stdin)
        .expect("stdin is readable");

    let line = serde_json::json!({ "args": args, "stdin": stdin });
    println!("{line}");
    eprintln!("echo-cli: {} argument(s)", args.len());

    let exit_code = args
        .windows(2)
        .find(|pair| pair[0] == "--exit")
        .and_then(|pair| pair[1].parse::<i32>().ok())
        .unwrap_or(0);
    std::process::exit(exit_code);
}
