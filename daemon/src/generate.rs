//! `rados-nbd generate man DIR` / `rados-nbd generate completions SHELL DIR` (hidden): the
//! manual pages and shell completions the Debian package ships, produced from the clap CLI
//! definition itself so they can never drift from the real flags.

use std::path::{Path, PathBuf};

use clap::{Command, Subcommand};
use clap_complete::Shell;

use crate::error::{Error, ErrorKind};

/// Manual section: rados-nbd is a system administration tool / daemon.
pub const MAN_SECTION: &str = "8";

#[derive(Debug, Clone, Subcommand)]
pub enum GenerateCmd {
    /// Write rados-nbd.8 and one rados-nbd-COMMAND.8 per (visible) subcommand into DIR.
    Man { dir: PathBuf },
    /// Write the completion script for SHELL (bash, zsh, fish, elvish, powershell) into DIR.
    Completions { shell: Shell, dir: PathBuf },
}

/// Runs a `generate` request against `cli`, the full command definition (`Cli::command()`).
/// Prints the path of every file written.
pub fn run(what: GenerateCmd, cli: Command) -> Result<(), Error> {
    let files = match what {
        GenerateCmd::Man { dir } => man_pages(cli, &dir)?,
        GenerateCmd::Completions { shell, dir } => vec![completions(cli, shell, &dir)?],
    };
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

fn ensure_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))
}

/// Renders the manual pages into `dir`; returns their paths, the main page first.
pub fn man_pages(cli: Command, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    ensure_dir(dir)?;
    // A `help` subcommand page would only repeat the others.
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    let mut out = Vec::new();
    render_tree(&cli, dir, &mut out)?;
    Ok(out)
}

/// This command's page, then its visible subcommands', depth first (`object-map check` gets
/// rados-nbd-object-map-check.8).
fn render_tree(cmd: &Command, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    out.push(render_page(cmd.clone(), dir)?);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_tree(sub, dir, out)?;
    }
    Ok(())
}

fn render_page(cmd: Command, dir: &Path) -> Result<PathBuf, Error> {
    // The footer names the release only (`--version` also lists the optional parts built in).
    let version = env!("CARGO_PKG_VERSION");
    let man = clap_mangen::Man::new(cmd)
        .section(MAN_SECTION)
        .source(format!("rados-nbd {version}"))
        .manual("System Administration");
    let path = dir.join(man.get_filename());
    let mut buf = Vec::new();
    man.render(&mut buf)
        .map_err(|e| Error::io(format!("rendering {}", path.display()), e))?;
    std::fs::write(&path, buf).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}

/// Writes the completion script for `shell` into `dir` under the name that shell's loader
/// expects (bash: `rados-nbd.bash`, zsh: `_rados-nbd`, fish: `rados-nbd.fish`).
pub fn completions(cli: Command, shell: Shell, dir: &Path) -> Result<PathBuf, Error> {
    ensure_dir(dir)?;
    let mut cli = cli;
    let bin = cli.get_name().to_string();
    let path = clap_complete::generate_to(shell, &mut cli, bin.clone(), dir).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("writing {shell} completions into {}: {e}", dir.display()),
        )
    })?;
    if shell == Shell::Bash && bin.contains('-') {
        fix_bash_dashed_name(&path, &bin)?;
    }
    Ok(path)
}

/// clap_complete 4.6 names the bash case labels of subcommands from the binary name with '-'
/// turned into its subcommand separator (`rados__subcmd__nbd__subcmd__map`) but the variable
/// it matches them against with '-' turned into `__` (`rados__nbd__subcmd__map`): no
/// subcommand's flags would ever complete. Rewrite the labels to the form actually matched.
fn fix_bash_dashed_name(path: &Path, bin: &str) -> Result<(), Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let wrong = bin.replace('-', "__subcmd__");
    let right = bin.replace('-', "__");
    let fixed = text.replace(&format!("{wrong}__subcmd__"), &format!("{right}__subcmd__"));
    std::fs::write(path, fixed).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn toy() -> Command {
        Command::new("rados-nbd")
            .version("9.8.7")
            .about("Serve RBD images over NBD")
            .arg(
                Arg::new("store")
                    .long("store")
                    .global(true)
                    .help("Image store URI"),
            )
            .subcommand(
                Command::new("map")
                    .about("Attach an image to /dev/nbdX")
                    .arg(
                        Arg::new("read-only")
                            .long("read-only")
                            .action(ArgAction::SetTrue),
                    )
                    .arg(Arg::new("image").required(true)),
            )
            .subcommand(Command::new("unmap").about("Detach").arg(Arg::new("what")))
            .subcommand(
                Command::new("object-map")
                    .about("Object map tools")
                    .subcommand(Command::new("check").about("Compare map and objects")),
            )
            .subcommand(Command::new("generate").hide(true))
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rados-nbd-gen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let dir = scratch("man");
        let files = man_pages(toy(), &dir).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "rados-nbd.8",
                "rados-nbd-map.8",
                "rados-nbd-unmap.8",
                "rados-nbd-object-map.8",
                "rados-nbd-object-map-check.8"
            ]
        );
        let main = std::fs::read_to_string(dir.join("rados-nbd.8")).unwrap();
        assert!(
            main.starts_with(".ie") || main.contains(".TH rados-nbd 8"),
            "{main}"
        );
        // The footer names the release, not the command's longer `--version` text.
        let footer = format!("\"rados-nbd {}\"", env!("CARGO_PKG_VERSION"));
        assert!(main.contains(&footer), "{main}");
        assert!(!main.contains("\"rados-nbd 9.8.7\""), "{main}");
        assert!(main.contains("map"), "{main}");
        assert!(
            !main.contains("generate"),
            "hidden subcommand leaked: {main}"
        );
        let map = std::fs::read_to_string(dir.join("rados-nbd-map.8")).unwrap();
        assert!(map.contains("read\\-only"), "{map}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn completions_for_the_shells_we_ship() {
        let dir = scratch("comp");
        for (shell, file, marker) in [
            (Shell::Bash, "rados-nbd.bash", "complete -F"),
            (Shell::Zsh, "_rados-nbd", "#compdef rados-nbd"),
            (Shell::Fish, "rados-nbd.fish", "complete -c rados-nbd"),
        ] {
            let p = completions(toy(), shell, &dir).unwrap();
            assert_eq!(p, dir.join(file));
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.contains(marker), "{shell}: {text}");
            assert!(
                text.contains("read-only"),
                "{shell} lacks a subcommand flag"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Runs the generated bash completion the way bash would for `words`, returns COMPREPLY.
    fn bash_complete(script: &Path, words: &[&str]) -> Option<String> {
        let bash = Path::new("/bin/bash");
        if !bash.exists() {
            return None;
        }
        let cword = words.len() - 1;
        let prog = format!(
            "source {script}; f=$(complete -p rados-nbd | sed 's/.*-F \\([^ ]*\\).*/\\1/'); \
             COMP_WORDS=({words}); COMP_CWORD={cword}; \
             \"$f\" rados-nbd {cur} {prev}; echo \"${{COMPREPLY[*]}}\"",
            script = script.display(),
            words = words.join(" "),
            cur = words[cword],
            prev = words[cword - 1],
        );
        let out = std::process::Command::new(bash)
            .arg("-c")
            .arg(prog)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    #[test]
    fn bash_completes_subcommands_and_their_flags() {
        let dir = scratch("bash");
        let p = completions(toy(), Shell::Bash, &dir).unwrap();
        let Some(got) = bash_complete(&p, &["rados-nbd", "ma"]) else {
            return;
        };
        assert_eq!(got, "map");
        let got = bash_complete(&p, &["rados-nbd", "map", "--re"]).unwrap();
        assert_eq!(got, "--read-only");
        let got = bash_complete(&p, &["rados-nbd", "unmap", "--"]).unwrap();
        assert!(
            got.contains("--store") && !got.contains("--read-only"),
            "{got}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_directory_is_a_clear_error() {
        let e = man_pages(toy(), Path::new("/proc/rados-nbd-cannot-exist")).unwrap_err();
        assert!(
            e.to_string().contains("/proc/rados-nbd-cannot-exist"),
            "{e}"
        );
    }
}
