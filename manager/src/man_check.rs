//! man/umm.1 against the clap definitions, both ways: every visible subcommand and long
//! option clap defines is documented where a reader looks for it, and every option the page
//! documents for a subcommand exists. (Compiled only for tests.)

use clap::CommandFactory;

use crate::Cli;

/// One `.TP` item of the page: the `.SH` and `.SS` it is under, and its tag line.
struct Item {
    section: String,
    subsection: String,
    tag: String,
}

fn man_page() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../man/umm.1");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn items(page: &str) -> Vec<Item> {
    let (mut section, mut subsection) = (String::new(), String::new());
    let mut out = Vec::new();
    let mut lines = page.lines();
    while let Some(line) = lines.next() {
        if let Some(t) = line.strip_prefix(".SH ") {
            section = unroff(t);
            subsection.clear();
        } else if let Some(t) = line.strip_prefix(".SS ") {
            subsection = unroff(t);
        } else if line == ".TP" {
            if let Some(tag) = lines.next() {
                out.push(Item {
                    section: section.clone(),
                    subsection: subsection.clone(),
                    tag: unroff(tag),
                });
            }
        }
    }
    out
}

/// Roff to plain words: macro name, font escapes, quotes and `\-` dropped or resolved.
fn unroff(line: &str) -> String {
    let body = match line.strip_prefix('.') {
        Some(rest) => rest.split_once(' ').map_or("", |(_, b)| b),
        None => line,
    };
    body.replace("\\-", "-")
        .replace("\\fI", "")
        .replace("\\fB", "")
        .replace("\\fP", "")
        .replace("\\fR", "")
        .replace('"', "")
}

/// The `--long` options named in a tag.
fn tag_options(tag: &str) -> Vec<String> {
    tag.split([' ', ','])
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect()
}

/// Whether a subsection title ("Options of umm run", "Options of run, daemon and restore")
/// covers subcommand `sub`.
fn covers(subsection: &str, sub: &str) -> bool {
    subsection.starts_with("Options of") && subsection.split([' ', ',']).any(|w| w == sub)
}

fn visible_subcommands() -> Vec<clap::Command> {
    Cli::command()
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect()
}

fn long_options(cmd: &clap::Command) -> Vec<String> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "help" && *l != "version")
        .map(|l| format!("--{l}"))
        .collect()
}

#[test]
fn man_page_documents_every_subcommand() {
    let page = man_page();
    let items = items(&page);
    for sub in visible_subcommands() {
        let name = sub.get_name();
        assert!(
            items
                .iter()
                .any(|i| i.section == "COMMANDS" && i.tag == name),
            "man/umm.1: COMMANDS has no item for `umm {name}`"
        );
        let synopsis = format!(".B umm {}", name.replace('-', "\\-"));
        assert!(
            page.lines().any(|l| l == synopsis),
            "man/umm.1: SYNOPSIS has no `{synopsis}` line"
        );
    }
}

#[test]
fn man_page_documents_every_long_option_of_every_subcommand() {
    let items = items(&man_page());
    let mut missing = Vec::new();
    for sub in visible_subcommands() {
        for opt in long_options(&sub) {
            let documented = items.iter().any(|i| {
                i.section == "OPTIONS"
                    && covers(&i.subsection, sub.get_name())
                    && tag_options(&i.tag).contains(&opt)
            });
            if !documented {
                missing.push(format!("umm {} {opt}", sub.get_name()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "man/umm.1 OPTIONS lacks (put each under an `.SS Options of ...` naming the command): \
         {missing:?}"
    );
}

#[test]
fn man_page_documents_no_option_that_clap_lacks() {
    let subs = visible_subcommands();
    let mut stale = Vec::new();
    for item in items(&man_page()).iter().filter(|i| i.section == "OPTIONS") {
        for sub in subs
            .iter()
            .filter(|s| covers(&item.subsection, s.get_name()))
        {
            let known = long_options(sub);
            for opt in tag_options(&item.tag) {
                if !known.contains(&opt) {
                    stale.push(format!("umm {} {opt}", sub.get_name()));
                }
            }
        }
    }
    assert!(
        stale.is_empty(),
        "man/umm.1 documents options clap does not have: {stale:?}"
    );
}

#[test]
fn man_page_documents_the_global_flags() {
    let items = items(&man_page());
    for opt in ["--help", "--version"] {
        assert!(
            items.iter().any(|i| i.section == "OPTIONS"
                && i.subsection == "Global options"
                && tag_options(&i.tag).iter().any(|o| o == opt)),
            "man/umm.1: Global options lacks {opt}"
        );
    }
}

#[test]
fn the_checks_see_the_page_structure() {
    // Guards against a parser that finds nothing and so passes everything.
    let items = items(&man_page());
    assert!(items.iter().any(|i| i.section == "OPTIONS"
        && covers(&i.subsection, "daemon")
        && tag_options(&i.tag) == ["--socket"]));
    assert!(!covers("Options of umm restore", "run"));
    assert_eq!(
        tag_options(&unroff(".BR \\-o \", \" \\-\\-output \" \\fIDIR\\fP\"")),
        ["--output"]
    );
}
