//! `nasd generate man|bash|zsh DIR` (hidden): the man pages and the shell completions,
//! made from the clap definitions of the binary, for the Debian package
//! (`scripts/package.sh`). `main.rs` runs it before the config is loaded, because it
//! needs the top-level clap command (`--config` lives there) and no config.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// What to write: `man` (nasd.1 and one page per subcommand), `bash` (nasd.bash) or
    /// `zsh` (_nasd).
    #[arg(value_enum)]
    pub what: Generated,
    /// The directory the files are written to (created when missing).
    pub dir: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generated {
    Man,
    Bash,
    Zsh,
}

/// Writes the files of `args.what` for `command` (the binary's whole clap command) and
/// prints each path written.
pub fn run(command: clap::Command, args: &GenerateArgs) -> anyhow::Result<()> {
    for path in write(command, args.what, &args.dir)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// The files written, sorted.
pub fn write(
    mut command: clap::Command,
    what: Generated,
    dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = match what {
        Generated::Man => man_pages(command, dir)?,
        Generated::Bash | Generated::Zsh => {
            let shell = if what == Generated::Bash {
                clap_complete::Shell::Bash
            } else {
                clap_complete::Shell::Zsh
            };
            let name = command.get_name().to_string();
            vec![
                clap_complete::generate_to(shell, &mut command, name, dir)
                    .with_context(|| format!("writing {shell} completions to {}", dir.display()))?,
            ]
        }
    };
    written.sort();
    Ok(written)
}

/// `nasd.1` and `nasd-<sub>.1` (`nasd-nas-add.1`, ...) for every subcommand that is not
/// hidden; returns the pages in `dir`.
fn man_pages(command: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("writing man pages to {}", dir.display()))?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "1") {
            pages.push(path);
        }
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> clap::Command {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        #[command(name = "nasd", about = "test")]
        struct Cli {
            #[arg(long, global = true)]
            config: Option<PathBuf>,
            #[command(subcommand)]
            command: crate::cli::Command,
        }
        Cli::command()
    }

    #[test]
    fn man_pages_and_completions_cover_the_subcommands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let man = write(command(), Generated::Man, dir.path()).expect("man");
        let names: Vec<String> = man
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        for want in ["nasd.1", "nasd-run.1", "nasd-check.1", "nasd-nas-add.1"] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("generate")),
            "the hidden command has no page: {names:?}"
        );
        let top = std::fs::read_to_string(dir.path().join("nasd.1")).expect("nasd.1");
        assert!(top.contains("\\-\\-config"), "{top}");
        let bash = write(command(), Generated::Bash, dir.path()).expect("bash");
        assert_eq!(bash, vec![dir.path().join("nasd.bash")]);
        let text = std::fs::read_to_string(&bash[0]).expect("read");
        assert!(
            text.contains("complete ") && text.contains("nasd"),
            "{text}"
        );
        let zsh = write(command(), Generated::Zsh, dir.path()).expect("zsh");
        assert_eq!(zsh, vec![dir.path().join("_nasd")]);
        let text = std::fs::read_to_string(&zsh[0]).expect("read");
        assert!(text.starts_with("#compdef nasd"), "{text}");
    }
}
