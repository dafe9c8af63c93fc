//! The `specula` binary's code: headless subcommands ([`cli`]) and the egui workbench ([`gui`]).

pub mod cli;
pub mod gui;
