//! `kling-batch`: run a batch of Kling generation jobs through the kling-tower stack.

use clap::Parser as _;
use kling_batch::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    // Warnings and errors on stderr; nothing else is set up to print them.
    kling_batch::log::install();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("kling-batch: cannot start the runtime: {e}\n"),
            );
            std::process::exit(cli::EXIT_SETUP);
        }
    };
    let code = runtime.block_on(cli::main(cli));
    // The tasks left (listeners, the ctrl-c watcher) are dropped, not waited for; the
    // journal one of them may hold is closed before `exit`, which runs no `Drop`, unless a
    // Ctrl-C asks to quit at once.
    if cli::shut_down(runtime) {
        std::process::exit(code);
    }
    std::process::exit(cli::EXIT_INTERRUPTED);
}
