//! `umm report TRACE --svg OUT`: a picture of a --trace file (see report_svg.rs).

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A --trace file of umm run, daemon or restore (JSON lines).
    #[arg(value_name = "TRACE")]
    trace: PathBuf,
    /// Write the picture (fault heat map per process, restore fill progress, fault-latency
    /// histogram) to this SVG file.
    #[arg(long, value_name = "OUT")]
    svg: PathBuf,
}

pub fn main(args: ReportArgs) -> i32 {
    match report(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("umm: report: {e}");
            1
        }
    }
}

fn report(args: &ReportArgs) -> Result<(), String> {
    let name = args.trace.display().to_string();
    let file = File::open(&args.trace).map_err(|e| format!("cannot open {name}: {e}"))?;
    let data = crate::report_svg::read_trace(BufReader::new(file), &name)?;
    let title = args
        .trace
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or(name);
    let svg = crate::report_svg::render(&data, &format!("umm trace: {title}"));
    std::fs::write(&args.svg, svg).map_err(|e| format!("cannot write {}: {e}", args.svg.display()))
}
